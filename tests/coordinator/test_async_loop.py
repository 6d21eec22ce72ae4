"""The async loop against a stand-in Grid, on a real store and real release folders.

Each node answers its task after a number of polls (its speed), or never (it left); nodes may
appear later (they joined). A crash is an exception out of the grid mid-buffer; a new coordinator
on the same folder then resumes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest

from loracommons.coordinator.async_rounds import AsyncCoordinator, pack_envelope, unpack_envelope
from loracommons.coordinator.config import ProjectConfig
from loracommons.coordinator.events import Event
from loracommons.coordinator.initial import POINTER
from loracommons.coordinator.releases import load_chain
from loracommons.coordinator.store import Store
from loracommons.protocol import PublicKey, verify_chain
from loracommons.protocol.codec import encode_tensors
from loracommons.protocol.downlink import Downlink, Held, rebuild
from loracommons.protocol.envelope import Envelope
from loracommons.protocol.errors import Reason
from loracommons.protocol.flower_app import envelope_content, read_downlink, read_task
from loracommons.protocol.identity import SigningKey

from .conftest import Signer, make_global, make_update
from .test_rounds_loop import task_identity  # noqa: F401 (fixture: Flower's Message needs a run id)


class Crash(Exception):
    """Stands for kill -9: the loop stops where it is, nothing is cleaned up."""


@dataclass
class Node:
    polls: int  # polls before its reply is there (1 = the next one)
    key: SigningKey = field(default_factory=SigningKey.generate)
    answers: bool = True
    joins_at: int = 0  # the poll from which the node is connected
    seconds: float | None = None  # if set: its reply is there this long after its task (not polls)


class Grid:
    def __init__(self, cfg: ProjectConfig, nodes: dict[int, Node], crash_when=None,  # noqa: ANN001
                 initial: dict | None = None):
        self.cfg, self.nodes, self.crash_when = cfg, nodes, crash_when
        self.initial = initial or {}  # version 0: what a node regenerates A from (ffa sends B only)
        self.held: dict[str, Held] = {}  # what each digest rebuilt to (the nodes' delta bases)
        self.pending: dict[str, tuple[int, Envelope]] = {}  # mid -> (poll it is ready, envelope)
        self.pushed: list[tuple[int, dict]] = []  # (node, task)
        self.due: dict[str, float] = {}  # mid -> when its reply is there (nodes timed in seconds)
        self.poll, self._next = 0, 0
        self.rng = np.random.default_rng(1)

    def get_node_ids(self) -> list[int]:
        return [i for i, n in self.nodes.items() if n.joins_at <= self.poll]

    def push_messages(self, messages) -> list[str]:  # noqa: ANN001
        ids = []
        for message in messages:
            self._next += 1
            mid, node = f"m{self._next}", self.nodes[message.metadata.dst_node_id]
            task_json, adapter, _ = read_task(message.content)
            task = json.loads(task_json)
            self.pushed.append((message.metadata.dst_node_id, task))
            if node.answers:
                base = self.rebuild(task, adapter, read_downlink(message.content))
                signer = Signer(self.cfg, base, round=task["round"], nonce=task["nonce"])
                env = signer.envelope(make_update(base, "ffa", self.rng), key=node.key, examples=10,
                                      base_adapter_digest=task["base_adapter_digest"])
                self.pending[mid] = (self.poll + node.polls, env)
                if node.seconds is not None:
                    self.due[mid] = time.monotonic() + node.seconds
            ids.append(mid)
        return ids

    def rebuild(self, task: dict, data: bytes, header: bytes | None) -> dict:
        """The global as a volunteer rebuilds it from the task's downlink (checked by digest)."""
        link = Downlink.from_bytes(header) if header is not None else Downlink()
        digest = task["base_adapter_digest"]
        base = rebuild(link, data, mode=task["mode"], digest=digest, max_bytes=64 << 20,
                       held=self.held.get(link.delta_from), regenerate=lambda: self.initial)
        self.held[digest] = Held(digest, base)
        return base

    def pull_messages(self, ids) -> list:  # noqa: ANN001
        self.poll += 1
        out = []
        for mid in sorted(ids, key=lambda m: int(m[1:])):
            ready = self.pending.get(mid)
            if mid in self.due:
                ready = ready if self.due[mid] <= time.monotonic() else None
            if ready is not None and (mid in self.due or ready[0] <= self.poll):
                env = self.pending.pop(mid)[1]
                content = envelope_content(env.manifest, env.payload, env.signature)
                out.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid),
                                           has_error=lambda: False, content=content))
        if self.crash_when is not None and self.crash_when():
            raise Crash
        return out


def project(tmp_path, rng, **round_keys) -> tuple[ProjectConfig, dict]:
    cfg = ProjectConfig.from_dict({"round": {
        "schedule": "async", "buffer_size": 2, "max_staleness": 3, "min_volunteers": 1, "rounds": 4,
        "timeout_s": 60.0, "publish_every": 1, **round_keys}})
    g = make_global(rng)
    store = Store(tmp_path)
    digest = store.blobs.put(encode_tensors(g))
    store.close()
    (tmp_path / POINTER).write_text(json.dumps({"sha256": digest}))
    key = SigningKey.generate("coordinator")
    key.save(tmp_path / "release_key")
    return cfg, g


def coordinator(tmp_path, cfg: ProjectConfig, events: list | None = None) -> AsyncCoordinator:
    key = SigningKey.load(tmp_path / "release_key")
    sink = events.append if events is not None else (lambda e: None)
    return AsyncCoordinator(tmp_path, cfg, Store(tmp_path), key, on_event=sink)


def chain_versions(tmp_path) -> list[int]:
    key = PublicKey.load(tmp_path / "release_key.pub")
    return [m.version for m in verify_chain(load_chain(tmp_path), key)]


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch):
    from loracommons.coordinator import async_rounds

    monkeypatch.setattr(async_rounds, "POLL_FLOOR", 0.001)
    monkeypatch.setattr(async_rounds, "POLL_SECONDS", 0.002)
    # the stand-in grid pulls no Flower objects; the real patch of Flower's puller would outlive the test
    monkeypatch.setattr(async_rounds, "quick_object_pulls", lambda *a: None)


def test_versions_come_from_whoever_answers_and_a_slow_node_is_not_waited_for(tmp_path, rng):
    cfg, g = project(tmp_path, rng)
    events: list[Event] = []
    coord = coordinator(tmp_path, cfg, events)
    grid = Grid(cfg, {1: Node(1), 2: Node(1), 3: Node(3)}, initial=g)
    coord.run(grid)
    store = coord.store
    rows = store.rounds()
    assert [r.status for r in rows] == ["aggregated"] * 4 and [r.admitted for r in rows] == [2, 2, 2, 2]
    assert chain_versions(tmp_path) == [1, 2, 3, 4]
    updates = [u for r in rows for u in store.round_updates(r.round)]
    # the slow node's updates arrive stale, weighted down, not refused
    stale = [u.staleness for u in updates if u.fingerprint == grid.nodes[3].key.public.fingerprint]
    assert stale and all(s is not None and s >= 1 for s in stale), stale
    assert {e.name for e in events} >= {"task_sent", "round_open", "round_closed", "published", "finished"}
    # every task had its own nonce and serial
    serials = [t["round"] for _, t in grid.pushed]
    assert len(set(serials)) == len(serials) and len({t["nonce"] for _, t in grid.pushed}) == len(serials)
    store.close()


def test_a_node_that_leaves_and_one_that_joins_late(tmp_path, rng, monkeypatch):
    from loracommons.coordinator import async_rounds

    cfg, g = project(tmp_path, rng, rounds=3, timeout_s=0.3)
    coord = coordinator(tmp_path, cfg)
    nodes = {1: Node(1), 2: Node(1, answers=False), 3: Node(1, joins_at=3)}
    grid = Grid(cfg, nodes, initial=g)
    # the loop's clock advances 0.15 s per poll, whatever the machine's speed: the silent node's
    # task expires after two polls (timeout_s 0.3), long before the 3 versions are done
    monkeypatch.setattr(async_rounds, "time", SimpleNamespace(monotonic=lambda: grid.poll * 0.15,
                                                              time=async_rounds.time.time))
    coord.run(grid)
    rows = coord.store.rounds()
    assert [r.status for r in rows] == ["aggregated"] * 3
    admitted = [u.fingerprint for r in rows for u in coord.store.round_updates(r.round)
                if u.outcome == "admitted"]
    assert nodes[3].key.public.fingerprint in admitted  # the late joiner contributed
    assert nodes[2].key.public.fingerprint not in admitted
    assert sum(1 for node, _ in grid.pushed if node == 3) >= 1
    # the silent node's task expired after timeout_s and it was given another
    assert [node for node, _ in grid.pushed].count(2) >= 2
    with sqlite3.connect(tmp_path / "state.db") as db:
        expired = "SELECT count(*) FROM tasks WHERE node_id = '2' AND status = 'expired'"
        assert db.execute(expired).fetchone()[0] >= 1
    coord.store.close()


def test_kill_mid_buffer_then_resume_loses_and_duplicates_nothing(tmp_path, rng):
    cfg, g = project(tmp_path, rng, buffer_size=3, rounds=4)
    first = coordinator(tmp_path, cfg)
    store = first.store

    def mid_buffer() -> bool:  # version 2 open with one admitted update
        row = store.round(2)
        return row is not None and row.status == "open" and any(
            u.outcome == "admitted" for u in store.round_updates(2))

    with pytest.raises(Crash):
        first.run(Grid(cfg, {1: Node(1), 2: Node(2), 3: Node(3)}, initial=g, crash_when=mid_buffer))
    kept = [u.update_digest for u in store.round_updates(2) if u.outcome == "admitted"]
    assert kept and store.round(2).status == "open"
    store.close()

    events: list[Event] = []
    second = coordinator(tmp_path, cfg, events)
    second.run(Grid(cfg, {1: Node(1), 2: Node(2), 3: Node(3)}, initial=g))
    rows = second.store.rounds()
    assert [r.round for r in rows] == [1, 2, 3, 4] and all(r.status == "aggregated" for r in rows)
    assert all(r.admitted == 3 for r in rows)
    after = [u.update_digest for u in second.store.round_updates(2) if u.outcome == "admitted"]
    assert set(kept) <= set(after) and len(after) == len(set(after)) == 3
    assert chain_versions(tmp_path) == [1, 2, 3, 4]
    assert [e.version for e in events if e.name == "published"] == [2, 3, 4]
    assert any(e.name == "resume" for e in events)
    second.store.close()


def test_packed_envelopes_round_trip():
    env = Envelope(b"m" * 3, b"p" * 10, b"s" * 5)
    assert unpack_envelope(pack_envelope(env)) == env
    with pytest.raises(ValueError):
        unpack_envelope(pack_envelope(env)[:-1])


def test_reasons_are_documented():
    for reason in (Reason.STALE, Reason.REPLAYED, Reason.FUTURE_BASE):
        assert reason.doc.startswith("async")


def test_a_reply_after_its_task_expired_is_refused_with_its_reason(tmp_path, rng):
    cfg, g = project(tmp_path, rng, rounds=8, max_staleness=1)
    coord = coordinator(tmp_path, cfg)
    grid = Grid(cfg, {1: Node(1), 2: Node(1), 3: Node(4)}, initial=g)
    coord.run(grid)
    slow = grid.nodes[3].key.public.fingerprint
    store = coord.store
    refused = [(u.reason, u.staleness) for r in store.rounds() for u in store.round_updates(r.round)
               if u.fingerprint == slow]
    assert refused and all(reason == Reason.STALE and tau > 1 for reason, tau in refused), refused
    coord.store.close()


@pytest.mark.parametrize("hold", [1.0, 0.0])
def test_a_node_done_just_before_the_version_closes_waits_for_it(tmp_path, rng, hold):
    """Nearly equal speeds: the first node back would otherwise get a task on a version the others
    are about to replace (its update then 1 stale). Held for at most `hold_fraction` of its task
    time, every update is fresh once each node's task time is known (from the third version: the
    first node back from its first task is not held); with 0 some are stale."""
    cfg, g = project(tmp_path, rng, buffer_size=3, hold_fraction=hold, rounds=4)
    coord = coordinator(tmp_path, cfg)
    grid = Grid(cfg, {1: Node(1, seconds=0.3), 2: Node(1, seconds=0.35), 3: Node(1, seconds=0.4)},
                initial=g)
    coord.run(grid)
    store = coord.store
    assert [r.status for r in store.rounds()] == ["aggregated"] * 4
    later = [u.staleness or 0 for r in store.rounds()[2:] for u in store.round_updates(r.round)]
    if hold:
        assert later == [0] * 6, later
    else:
        assert any(later), later
    store.close()


def test_a_free_node_is_held_only_for_a_version_about_to_close(tmp_path, rng):
    """`_holds` on hand-made flights: held while the flights expected within its wait fill the buffer,
    never past the wait, never before its first task's time is known."""
    from loracommons.coordinator.async_rounds import InFlight

    cfg, _ = project(tmp_path, rng, buffer_size=3, hold_fraction=0.5)
    coord = coordinator(tmp_path, cfg)
    buffer = SimpleNamespace(admitted=1)
    task = SimpleNamespace(version=1)
    coord._task_seconds = {1: 10.0, 2: 10.0, 3: 10.0}
    coord._free_since = {1: 100.0}
    coord._flights = {"a": InFlight(2, task, 92.0), "b": InFlight(3, task, 94.0)}  # due at 102, 104
    assert coord._holds(1, buffer, now=101.0)  # both due before 105: the version closes soon
    assert not coord._holds(1, buffer, now=105.0)  # never past half its task time
    coord._flights["b"] = InFlight(3, task, 96.0)  # due at 106: after its wait ends
    assert not coord._holds(1, buffer, now=101.0)
    buffer.admitted = 2  # one more closes it, and one is due at 102
    assert coord._holds(1, buffer, now=101.0)
    coord._free_since = {}
    assert not coord._holds(1, buffer, now=101.0)  # not just back from a task
    del coord._task_seconds[1]
    coord._free_since = {1: 100.0}
    assert not coord._holds(1, buffer, now=101.0)  # its first task: no time known
    coord.store.close()
