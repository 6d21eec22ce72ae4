"""Volunteers that die or dawdle mid-round, with real processes on 127.0.0.1.

One run of two rounds, four volunteers, `min_volunteers = 2`, a short round timeout:

    steady0, steady1  the real `loracommons join`
    killed            the real client, kill -9'd (node runner and SuperNode: the machine dies) while
                      it holds its round-1 task (it pauses before training so the kill can aim there)
    straggler         the real client sleeping TIMEOUT + 3 s before its first round's training

Round 1 must close at its timeout with the two steady volunteers; the straggler's round-1
update arrives during round 2 and is rejected as `late`, and its round-2 update is admitted.
"""

from __future__ import annotations

import signal
import time

import pytest

from loracommons.protocol import processes
from tests.e2e.procs import children, free_port, release_chain, status, wait_for
from tests.security.community import (
    Community,
    fingerprint,
    make_project,
    record_result,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

TIMEOUT_S = 22.0


def kill_machine(proc) -> None:  # noqa: ANN001
    """kill -9 a join process and the SuperNode it started (in its own session), as a power cut would."""
    for child in children(proc.pid):
        processes.kill_group(child)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def test_killed_volunteer_and_straggler(tmp_path, tiny_base, honest):
    project = make_project(tmp_path, tiny_base, round={"rounds": 2, "volunteers_per_round": 4,
                                                        "min_volunteers": 2, "timeout_s": TIMEOUT_S})
    community = Community(tmp_path)
    port, http_port = free_port(), free_port()
    keys = {"steady0": honest.keys[0], "steady1": honest.keys[1], "killed": honest.key("killed"),
            "straggler": honest.key("straggler")}
    try:
        coordinator = community.coordinator(project, port, http_port, wait_nodes=4)
        address = f"127.0.0.1:{port}"
        data = {"steady0": honest.data[0], "steady1": honest.data[1],
                "killed": honest.extra_data("killed", 50), "straggler": honest.extra_data("straggler", 51)}
        procs = {name: community.node(None, address, data[name], keys[name], name)
                 for name in ("steady0", "steady1")}
        # The doomed one holds its round-1 task (a few steps of training take a tenth of a second here,
        # too short to aim at): the real client pausing before it trains, killed during the pause.
        procs["killed"] = community.node("slow", address, data["killed"], keys["killed"], "killed",
                                         env={"LC_HOSTILE_SLEEP": "600"})
        procs["straggler"] = community.node("slow", address, data["straggler"], keys["straggler"],
                                            "straggler", env={"LC_HOSTILE_SLEEP": str(TIMEOUT_S + 3)})
        wait_for(lambda: "round 1: holding the task" in community.log("killed.log"), 240,
                 "the doomed volunteer to hold its round-1 task", interval=0.2, procs=[coordinator])
        kill_machine(procs["killed"])
        killed_at = time.monotonic()
        wait_for(lambda: coordinator.poll() is not None, 240, "two rounds to finish",
                 procs=[procs["steady0"], procs["steady1"], procs["straggler"]])
        assert coordinator.returncode == 0, community.log("coordinator.log")[-3000:]
        survivors_alive = all(procs[n].poll() is None for n in ("steady0", "steady1", "straggler"))
    finally:
        community.stop_all()
    info = status(project)
    rounds = {r["round"]: r for r in info["recent_rounds"]}
    assert [rounds[r]["status"] for r in (1, 2)] == ["aggregated", "aggregated"]
    assert rounds[1]["sampled"] == 4 and rounds[1]["admitted"] == 2  # closed at the timeout, 2 >= min
    updates = info["recent_updates"]
    by_key = {name: [(u["round"], u["reason"] or u["outcome"]) for u in updates
                     if u["fingerprint"] == fingerprint(key)] for name, key in keys.items()}
    assert by_key["steady0"] == by_key["steady1"] == [(1, "admitted"), (2, "admitted")]
    assert by_key["killed"] == []
    # its round-1 reply arrives during round 2 (recorded late there) and its round-2 update is
    # admitted; with rounds this quick either may be recorded first
    assert sorted(by_key["straggler"]) == [(2, "admitted"), (2, "late")], by_key["straggler"]
    late = next(u for u in updates if u["reason"] == "late")
    assert "round 1 arrived after that round closed" in late["message"]
    assert [m.round for m in release_chain(project)] == [1, 2]
    assert survivors_alive
    record_result("faults", "volunteer_killed_mid_round", {
        "tries": 1, "survived": True, "round_closed_at_timeout": True, "admitted": rounds[1]["admitted"],
        "releases": 2, "seconds_after_kill": round(time.monotonic() - killed_at, 1)})
    record_result("faults", "straggler", {"tries": 1, "late_rejected": True, "admitted_next_round": True,
                                          "outcomes": [r for _, r in by_key["straggler"]]})
