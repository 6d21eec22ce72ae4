"""kill -9 of the coordinator at chosen and random points, and of its SuperLink, with volunteers running.

One project of (at least) ROUNDS rounds, two real `loracommons join` volunteers that run throughout, and a
sequence of coordinator starts; each but the last ends in a crash:

    admission   kill -9 within a second after the first update of a round was recorded, while the
                next reply is being admitted (admission slowed to 1 s per reply to widen the window)
    publishing  kill -9 within 1 s after the first release file of a round started to be written,
                while the release is written or renamed into place but not yet recorded (each file
                write and the final record slowed by 0.4 s: a 2 s window)
    random      kill -9 at a random time in the first 10 s after a round opened
    superlink   kill -9 of the SuperLink alone after a release: the coordinator must notice and stop
                with an error; the volunteers, not restarted, must reconnect to the next SuperLink
                (the project gets two more rounds than are done by then, so that one is left: on a
                loaded machine the earlier trials can get through more rounds than usual)
    final       a normal start that must finish every round

Delays come from a seeded RNG (LC_FAULT_SEED, else the time; the seed is in the results and in
failure messages). After every crash, at rest: no torn blob, every release folder verifies as a
chain from v1, the database records only releases that are on disk. At the end: one release per
round, no version lost or duplicated, the whole local chain with its files verifies.
"""

from __future__ import annotations

import os
import random
import re
import time
from functools import partial
from pathlib import Path

import pytest

from loracommons.coordinator.releases import verify_local_chain
from loracommons.coordinator.store import Store
from loracommons.protocol import PublicKey, processes
from tests.e2e.procs import free_port, release_chain, status, wait_for
from tests.security.community import (
    Community,
    make_project,
    record_result,
    torn_blobs,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

ROUNDS = 4
#: name, coordinator launcher delays, event that arms the kill, range of the random wait after it (s)
TRIALS = [
    ("admission", {"admit_delay": 1.0}, "update", (0.0, 1.0)),
    ("publishing", {"publish_delay": 0.4}, "test_release_write", (0.0, 1.0)),
    ("random", {}, "round_open", (0.0, 10.0)),
]
_EVENT = re.compile(r"^\d\d:\d\d:\d\d (\w+) ?(.*)$")


def events(community: Community, log: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for line in community.log(log).splitlines() if (m := _EVENT.match(line))]


def fired(community: Community, log: str, event: str) -> bool:
    return any(name == event for name, _ in events(community, log))


def at_rest(project: Path) -> dict:
    """What a crash left: checked before the next start repairs anything."""
    store = Store(project)
    try:
        recorded = store.releases()
        open_round = store.current_round()
        open_updates = len(store.round_updates(open_round.round)) if open_round else None
    finally:
        store.close()
    chain = release_chain(project)  # every v* folder, verified from v1 against the release key
    on_disk = [m.version for m in chain]
    assert [r.version for r in recorded] == list(range(1, len(recorded) + 1))
    assert set(r.version for r in recorded) <= set(on_disk), (recorded, on_disk)
    assert torn_blobs(project) == []
    releases = project / "releases"
    leftovers = sorted(p.name for p in releases.glob(".*")) if releases.exists() else []
    return {"recorded_versions": [r.version for r in recorded], "folders": on_disk,
            "unrecorded_folders": sorted(set(on_disk) - {r.version for r in recorded}),
            "release_temp_dirs": leftovers, "open_round": open_round.round if open_round else None,
            "open_round_updates": open_updates}


def aggregated_rounds(project: Path) -> int:
    store = Store(project)
    try:
        return sum(1 for row in store.rounds() if row.status == "aggregated")
    finally:
        store.close()


def set_rounds(project: Path, rounds: int) -> None:
    import tomllib

    from loracommons.coordinator.config import ProjectConfig, write_default_toml

    obj = tomllib.loads((project / "project.toml").read_text())
    obj["round"]["rounds"] = rounds
    write_default_toml(project / "project.toml", ProjectConfig.from_dict(obj))


@pytest.fixture(scope="module")
def crash_run(tmp_path_factory, tiny_base, honest) -> dict:
    seed = int(os.environ.get("LC_FAULT_SEED") or time.time())
    rng = random.Random(seed)
    workdir = tmp_path_factory.mktemp("crash")
    project = make_project(workdir, tiny_base, round={"rounds": ROUNDS, "volunteers_per_round": 2,
                                                       "min_volunteers": 2, "timeout_s": 60.0})
    community = Community(workdir)
    port, http_port = free_port(), free_port()
    out: dict = {"seed": seed, "trials": []}
    volunteers = []
    try:
        for index, (name, delays, trigger, (low, high)) in enumerate(TRIALS):
            log = f"coordinator{index}.log"
            coordinator = community.coordinator(project, port, http_port, log=log, **delays)
            if not volunteers:
                volunteers = [community.node(None, f"127.0.0.1:{port}", honest.data[i], honest.keys[i],
                                             f"vol{i}") for i in range(2)]
            wait_for(partial(fired, community, log, trigger), 240,
                     f"{trigger} before the {name} kill (seed {seed})", interval=0.05,
                     procs=[coordinator, *volunteers])
            wait = rng.uniform(low, high)
            time.sleep(wait)
            community.kill9(coordinator)
            state = at_rest(project)
            state.update(trial=name, wait_s=round(wait, 3),
                         events=[event for event, _ in events(community, log)][-4:])
            out["trials"].append(state)

        # The SuperLink dies while the volunteers wait for the next round.
        out["rounds"] = rounds = max(ROUNDS, aggregated_rounds(project) + 2)
        set_rounds(project, rounds)
        coordinator = community.coordinator(project, port, http_port, log="coordinator-superlink.log")
        wait_for(partial(fired, community, "coordinator-superlink.log", "published"), 240,
                 f"a release before the SuperLink kill (seed {seed})", procs=[coordinator, *volunteers])
        superlink = int((project / "flower" / "superlink.pid").read_text())
        processes.kill_group(superlink)
        wait_for(lambda: coordinator.poll() is not None, 60, "the coordinator to notice its SuperLink died")
        out["superlink"] = {"coordinator_exit": coordinator.returncode, "state": at_rest(project),
                            "log_tail": community.log("coordinator-superlink.log")[-400:]}

        final = community.coordinator(project, port, http_port, log="coordinator-final.log")
        wait_for(lambda: final.poll() is not None, 400, f"the resumed run to finish (seed {seed})",
                 procs=volunteers)
        out["final_exit"] = final.returncode
        out["final_log"] = community.log("coordinator-final.log")[-3000:]
        out["volunteers_alive"] = all(v.poll() is None for v in volunteers)
        out["volunteer_logs"] = [community.log(f"vol{i}.log")[-2000:] for i in range(2)]
    finally:
        community.stop_all()
    out["project"] = project
    out["status"] = status(project)
    return out


def test_every_crash_leaves_a_verifiable_state(crash_run):
    names = [t["trial"] for t in crash_run["trials"]]
    assert names == [name for name, *_ in TRIALS]
    trials = {t["trial"]: t for t in crash_run["trials"]}  # at_rest() asserted the invariants
    # The kills landed where they were aimed: a round half admitted, a release half published.
    assert trials["admission"]["open_round"] is not None, trials["admission"]
    publishing = trials["publishing"]
    assert publishing["release_temp_dirs"] or publishing["unrecorded_folders"], publishing
    record_result("faults", "coordinator_kill9", {
        "tries": len(crash_run["trials"]), "seed": crash_run["seed"],
        "trials": [{k: t[k] for k in ("trial", "wait_s", "recorded_versions", "unrecorded_folders",
                                      "release_temp_dirs", "open_round", "open_round_updates")}
                   for t in crash_run["trials"]]})


def test_superlink_crash_stops_the_coordinator_and_volunteers_reconnect(crash_run):
    superlink = crash_run["superlink"]
    assert superlink["coordinator_exit"] == 1 and "SuperLink exited" in superlink["log_tail"], superlink
    assert crash_run["volunteers_alive"], crash_run["volunteer_logs"]  # never restarted by the test
    rounds = {r["round"]: r for r in crash_run["status"]["recent_rounds"]}
    assert rounds[crash_run["rounds"]]["admitted"] == 2  # both volunteers came back by themselves
    record_result("faults", "superlink_restart", {
        "tries": 1, "coordinator_exit": superlink["coordinator_exit"], "volunteers_reconnected": True,
        "survived": True})


def test_resume_loses_and_duplicates_no_release(crash_run):
    project = crash_run["project"]
    assert crash_run["final_exit"] == 0, crash_run["final_log"]
    info = crash_run["status"]
    total = crash_run["rounds"]
    assert info["rounds"]["by_status"] == {"open": 0, "aggregated": total, "skipped": 0, "failed": 0}
    manifests = verify_local_chain(project, PublicKey.load(project / "keys" / "release_key.pub"))
    assert [m.version for m in manifests] == list(range(1, total + 1))
    assert [m.round for m in manifests] == list(range(1, total + 1))  # one release per round
    store = Store(project)
    try:
        recorded = store.releases()
    finally:
        store.close()
    assert [(r.version, r.round) for r in recorded] == [(v, v) for v in range(1, total + 1)]
    assert torn_blobs(project) == []
    assert not [p for p in (project / "blobs" / "sha256").iterdir() if p.name.startswith(".tmp-")]
    assert not list((project / "releases").glob(".*"))
    assert not (project / "tmp").exists() or not any((project / "tmp").iterdir())
    record_result("faults", "resume_after_crashes", {
        "tries": len(crash_run["trials"]) + 1, "releases": len(manifests), "rounds": total,
        "lost": 0, "duplicated": 0, "torn_blobs": 0})
