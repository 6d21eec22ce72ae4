"""The async schedule (issue 13) on real processes: a SuperLink, the coordinator and `loracommons join`.

community   two honest volunteers; hostile nodes that replay their first update, sign for another
            project, name a task never issued (a base from the future), or hold their first task
            until it is stale; a volunteer that joins after version 2; one honest volunteer stopped
            mid-version. Every refusal is recorded with its reason, versions keep coming, the chain
            verifies.
kill -9     two honest volunteers, a buffer of 3; the coordinator is killed right after an update was
            admitted into an open version (mid-buffer), then started again: that version is rebuilt
            with the updates it had, every version is aggregated once, one release per version, the
            chain verifies.
"""

from __future__ import annotations

import re
import time
from functools import partial
from pathlib import Path

import pytest

from loracommons.coordinator.store import Store
from tests.e2e.procs import free_port, read_json, release_chain, wait_for
from tests.security.community import Community, make_project, torn_blobs

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

_EVENT = re.compile(r"^\d\d:\d\d:\d\d (\w+) ?(.*)$")


def events(community: Community, log: str) -> list[tuple[str, dict]]:
    out = []
    for line in community.log(log).splitlines():
        if m := _EVENT.match(line):
            out.append((m.group(1), dict(kv.split("=", 1) for kv in m.group(2).split() if "=" in kv)))
    return out


def published(community: Community, log: str) -> int:
    return max((int(d["version"]) for name, d in events(community, log) if name == "published"), default=0)


def reasons(project: Path) -> dict[str, list]:
    """Reason code -> (fingerprint, staleness) of every update recorded."""
    store = Store(project)
    try:
        out: dict[str, list] = {}
        for row in store.rounds():
            for u in store.round_updates(row.round):
                out.setdefault(u.reason or u.outcome, []).append((u.fingerprint, u.staleness))
        return out
    finally:
        store.close()


def versions(project: Path) -> list[tuple[int, str, int]]:
    store = Store(project)
    try:
        return [(r.round, r.status, r.admitted) for r in store.rounds()]
    finally:
        store.close()


def test_async_community_refusals_late_join_and_leave(tmp_path, tiny_base, honest):
    from tests.security.community import fingerprint

    total = 16  # room for the late joiner's first task (it loads the model first) before the end
    project = make_project(tmp_path, tiny_base, round={
        "schedule": "async", "buffer_size": 2, "min_volunteers": 2, "max_staleness": 1, "rounds": total,
        "timeout_s": 60.0, "publish_every": 1})
    community = Community(tmp_path)
    port, http_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    try:
        coordinator = community.coordinator(project, port, http_port)
        honest_nodes = [community.node(None, address, honest.data[i], honest.keys[i], f"honest{i}")
                        for i in range(2)]
        hostile = {mode: honest.key(mode) for mode in ("replay", "wrong_project", "future_base", "slow")}
        for mode, key in hostile.items():
            community.node(mode, address, honest.extra_data(mode, 7), key, mode,
                           env={"LC_HOSTILE_SLEEP": "25"})
        procs = [coordinator, *honest_nodes]
        wait_for(lambda: published(community, "coordinator.log") >= 2, 400, "version 2", procs=procs)
        late_key = honest.key("late")
        late = community.node(None, address, honest.extra_data("late", 9), late_key, "late")
        wait_for(lambda: published(community, "coordinator.log") >= 4, 400, "version 4", procs=procs)
        community.stop(honest_nodes[1])  # leaves, possibly mid-task: nothing waits for it
        sent = partial(read_json, tmp_path / "late.json")
        wait_for(lambda: (sent() or {}).get("rounds_sent", 0) >= 1, 400, "the late joiner's first update",
                 procs=[coordinator, late])
        assert published(community, "coordinator.log") < total, "the run ended before the late joiner sent"
        wait_for(lambda: any(name == "finished" for name, _ in events(community, "coordinator.log")), 500,
                 "the last version", procs=[coordinator])
    finally:
        community.stop_all()
    rows = versions(project)
    assert [r[:2] for r in rows] == [(v, "aggregated") for v in range(1, total + 1)], rows
    assert [m.version for m in release_chain(project)] == list(range(1, total + 1))
    seen = reasons(project)
    signers = {code: {fp for fp, _ in rows} for code, rows in seen.items()}
    assert fingerprint(hostile["replay"]) in signers.get("replayed", set()), seen.keys()
    assert fingerprint(hostile["wrong_project"]) in signers.get("wrong_project", set()), seen.keys()
    assert fingerprint(hostile["future_base"]) in signers.get("future_base", set()), seen.keys()
    stale = [tau for fp, tau in seen.get("stale", []) if fp == fingerprint(hostile["slow"])]
    assert stale and all(tau > 1 for tau in stale), seen.get("stale")
    admitted = set().union(*(signers.get(code, set()) for code in ("admitted", "clipped", "weight_capped")))
    assert fingerprint(late_key) in admitted  # joined late, got a task at once, contributed
    assert torn_blobs(project) == []


def test_async_kill9_mid_buffer_then_resume(tmp_path, tiny_base, honest):
    total = 5
    project = make_project(tmp_path, tiny_base, round={
        "schedule": "async", "buffer_size": 3, "min_volunteers": 2, "max_staleness": 3, "rounds": total,
        "timeout_s": 60.0, "publish_every": 1})
    community = Community(tmp_path)
    port, http_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"

    def mid_buffer() -> int | None:
        accepted: dict[int, int] = {}
        for name, d in events(community, "coordinator0.log"):
            if name == "update" and d.get("accepted") == "True":
                accepted[int(d["round"])] = accepted.get(int(d["round"]), 0) + 1
        return next((v for v, n in accepted.items() if v >= 2 and n < 3), None)

    try:
        first = community.coordinator(project, port, http_port, log="coordinator0.log")
        volunteers = [community.node(None, address, honest.data[i], honest.keys[i], f"vol{i}")
                      for i in range(2)]
        version = wait_for(mid_buffer, 400, "an update admitted into version >= 2", interval=0.02,
                           procs=[first, *volunteers])
        community.kill9(first)
        store = Store(project)
        try:
            open_row = store.current_round()
            kept = [u.update_digest for u in store.round_updates(version) if u.outcome == "admitted"]
        finally:
            store.close()
        assert open_row is not None and open_row.round == version and kept, (open_row, kept)
        released = [m.version for m in release_chain(project)]
        assert released == list(range(1, len(released) + 1))
        time.sleep(1)
        second = community.coordinator(project, port, http_port, log="coordinator1.log")
        wait_for(lambda: any(name == "finished" for name, _ in events(community, "coordinator1.log")), 500,
                 "the last version after the restart", procs=[second, *volunteers])
        assert any(name == "resume" for name, _ in events(community, "coordinator1.log"))
    finally:
        community.stop_all()
    rows = versions(project)
    assert rows == [(v, "aggregated", 3) for v in range(1, total + 1)], rows
    assert [m.version for m in release_chain(project)] == list(range(1, total + 1))
    store = Store(project)
    try:
        after = [u.update_digest for u in store.round_updates(version) if u.outcome == "admitted"]
        assert set(kept) <= set(after) and len(after) == len(set(after)) == 3
        assert [r.version for r in store.releases()] == list(range(1, total + 1))
    finally:
        store.close()
    assert torn_blobs(project) == []
