"""The coordinator's round loop: sample, send, admit as replies arrive, aggregate, publish.

State lives in the project folder (SQLite + blobs + release folders), so the
loop can be killed at any point and `resume` picks up from the last published
release: an interrupted round is run again under a fresh nonce (updates signed
for the old nonce are refused as stale), an aggregated round whose release was
not yet written is published, and nothing is published twice.

This module is the transport and the bookkeeping: Flower messages, timeouts, late
replies, store writes and events (`events.py`). What a round decides (admission, the
examples cap, aggregation, the robust rules, the round's losses) is `round.Round`'s;
releases and the DP budget are `publishing.py`'s.
"""

from __future__ import annotations

import logging
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loracommons.coordinator import publishing
from loracommons.coordinator.config import RELEASE_KEY, ProjectConfig, load_config
from loracommons.coordinator.downlinks import Downlinks, refusal_reason
from loracommons.coordinator.events import (
    Finished,
    OnEvent,
    PrivacyBudgetSpent,
    Published,
    Resumed,
    RoundClosed,
    RoundOpened,
    UpdateHandled,
    Waiting,
)
from loracommons.coordinator.initial import decode_adapter, initial_adapter
from loracommons.coordinator.releases import reconcile
from loracommons.coordinator.round import Round, UpdateRecord
from loracommons.coordinator.rows import RoundRow
from loracommons.coordinator.store import Store, new_nonce
from loracommons.protocol.codec import encode_tensors, round_tensors
from loracommons.protocol.envelope import Envelope, sha256_hex
from loracommons.protocol.errors import ProtocolError, Reason
from loracommons.protocol.flower_app import read_envelope, task_content
from loracommons.protocol.flower_timing import quick_object_pulls
from loracommons.protocol.identity import SigningKey
from loracommons.protocol.pacing import Pacer

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
"""Longest wait between two asks for replies; just after the round's tasks go out, POLL_FLOOR s
(not less: each ask costs the SuperLink, which is then busy handing out the tasks)."""
POLL_FLOOR = 0.05
LATE_ROUNDS = 3
"""Rounds a straggler's message is still asked for (its reply then recorded as late); after that it
is forgotten, so a node that never answers costs each poll a bounded number of ids."""


@dataclass
class GlobalAdapter:
    data: bytes
    tensors: dict[str, np.ndarray]
    digest: str

    @classmethod
    def from_bytes(cls, data: bytes) -> GlobalAdapter:
        return cls(data, decode_adapter(data), sha256_hex(data))


@dataclass
class Coordinator:
    project_dir: Path
    cfg: ProjectConfig
    store: Store
    key: SigningKey
    stop: threading.Event = field(default_factory=threading.Event)
    on_event: OnEvent = lambda event: None  # noqa: E731
    rng: random.Random = field(default_factory=random.SystemRandom)
    global_adapter: GlobalAdapter | None = None
    _notes: dict[int, dict] = field(default_factory=dict)  # node id -> outcome of its last update
    _late: dict[str, tuple[int, int]] = field(default_factory=dict)  # message id -> (round, node)
    RESUME_NOTE = "interrupted round will run again"
    downlinks: Downlinks | None = None  # what each node holds and is sent (made on first use)

    @classmethod
    def open(cls, project_dir: str | Path, **kwargs) -> Coordinator:  # noqa: ANN003
        project_dir = Path(project_dir)
        cfg = load_config(project_dir)
        return cls(project_dir, cfg, Store(project_dir), SigningKey.load(project_dir / RELEASE_KEY), **kwargs)

    @property
    def spill_dir(self) -> Path:
        """Where a round's held updates wait for median/Krum rules (one subfolder per round)."""
        return self.project_dir / "tmp"

    # -- resume --------------------------------------------------------------

    def resume(self) -> int:
        """Bring state in line after any crash; returns the next round number."""
        report = reconcile(self.project_dir, self.store, self.key)
        # Updates a killed round had spilled to disk: that round runs again from scratch.
        shutil.rmtree(self.spill_dir, ignore_errors=True)
        if report.adopted or report.removed:
            log.warning("reconciled releases: adopted %s, removed %s", report.adopted, report.removed)
        last = self.store.last_aggregated_round()
        if last is not None and last.adapter_digest:
            data = self.store.blobs.get(last.adapter_digest)
        else:
            data = initial_adapter(self.project_dir, self.cfg, self.store)
        self._set_global(data)
        if self._publish_due(final=False):
            self.publish()
        open_round = self.store.current_round()
        next_round = open_round.round if open_round else self.store.last_closed_round() + 1
        if open_round:
            self.on_event(Resumed(next_round, self.RESUME_NOTE))
        return next_round

    def _set_global(self, data: bytes) -> None:
        """The global tasks name from now on, its values rounded to the downlink dtype (stored as a
        blob too), so that what is sent, checked by digest and trained from is one adapter."""
        adapter = GlobalAdapter.from_bytes(data)
        if self.cfg.round.downlink_dtype != "float32":
            rounded = encode_tensors(round_tensors(adapter.tensors, self.cfg.round.downlink_dtype), "float32")
            if rounded != data:
                self.store.blobs.put(rounded)
                adapter = GlobalAdapter.from_bytes(rounded)
        self.global_adapter = adapter

    @property
    def links(self) -> Downlinks:
        if self.downlinks is None:
            cfg = self.cfg
            self.downlinks = Downlinks(cfg.aggregation.mode, cfg.round.downlink_dtype, self.store.blobs)
        return self.downlinks

    def _task_for(self, node: int, rnd: Round, current: GlobalAdapter):  # noqa: ANN202 (flwr RecordDict)
        """One node's task content: the round task, its note, and the global as that node can take
        it (`coordinator/downlinks.py`: packed; B only in ffa; a delta against what it holds)."""
        link, data = self.links.for_node(node, current.digest, current.tensors)
        return task_content(rnd.task_bytes, data, self._notes.pop(node, None), link.to_bytes())

    # -- the loop --------------------------------------------------------------

    def run(self, grid) -> None:  # noqa: ANN001 (flwr Grid)
        quick_object_pulls("flwr.superlink.grid.http_grid")  # replies are read as soon as they are whole
        r = self.resume()
        total = self.cfg.round.rounds
        while not self.stop.is_set() and (total == 0 or r <= total):
            if not self.privacy_budget_left():
                self.on_event(PrivacyBudgetSpent(**self.privacy_metrics()))
                break
            nodes = self.wait_for_nodes(grid)
            if nodes is None:
                break
            self.run_round(grid, r, nodes)
            r += 1
        if self._publish_due(final=True):
            self.publish()
        self.on_event(Finished(r - 1))

    def wait_for_nodes(self, grid) -> list[int] | None:  # noqa: ANN001
        need = self.cfg.round.min_volunteers
        announced = False
        while not self.stop.is_set():
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= need:
                return nodes
            if not announced:
                self.on_event(Waiting(len(nodes), need))
                announced = True
            self.stop.wait(1.0)
        return None

    def run_round(self, grid, r: int, nodes: list[int]) -> RoundRow | dict:  # noqa: ANN001
        from flwr.app import Message

        cfg, current = self.cfg, self.global_adapter
        assert current is not None
        sampled = self.rng.sample(nodes, min(len(nodes), cfg.round.volunteers_per_round))
        nonce = new_nonce()
        latest = self.store.latest_release()
        self.store.open_round(r, nonce, base_version=latest.version if latest else 0,
                              sampled=len(sampled), base_adapter_digest=current.digest)
        self.on_event(RoundOpened(r, len(sampled), len(nodes)))
        membership = cfg.project.membership
        rnd = Round(
            cfg, r, nonce, current.tensors, current.digest,
            allowlist=self.store.registered_fingerprints() if membership == "allowlist" else frozenset(),
            banned=self.store.banned_fingerprints(), spill_dir=self.spill_dir,
        )
        messages = [
            Message(self._task_for(node, rnd, current), dst_node_id=node, message_type="train",
                    group_id=str(r))
            for node in sampled
        ]
        waiting = {mid: node for mid, node in zip(grid.push_messages(messages), sampled, strict=True) if mid}
        deadline = time.monotonic() + cfg.round.timeout_s
        pace = Pacer(POLL_FLOOR, POLL_SECONDS)  # asks our own local SuperLink: quick asks are cheap
        while waiting and time.monotonic() < deadline:
            if self.stop.is_set():
                return {"round": r, "status": "interrupted"}
            for reply in grid.pull_messages(set(waiting) | set(self._late)):
                mid = reply.metadata.reply_to_message_id
                if mid in self._late:
                    self._record_late(r, reply, *self._late.pop(mid))
                elif mid in waiting:
                    self._handle(r, waiting.pop(mid), reply, rnd)
            if waiting:
                self.stop.wait(pace.interval())
        for mid, node in waiting.items():  # stragglers: their replies are refused if they come
            self._late[mid] = (r, node)
            self._notes[node] = {"round": r, "outcome": "missed", "reason": "no reply before the timeout"}
            self.links.failed(node, None)
        self._late = {mid: late for mid, late in self._late.items() if late[0] > r - LATE_ROUNDS}
        return self._close(r, rnd)

    def _handle(self, r: int, node: int, reply, rnd: Round) -> None:  # noqa: ANN001 (flwr Message)
        """Admit one reply; whatever it holds, the round goes on."""
        try:
            if reply.has_error():
                reason = reply.error.reason or f"error code {reply.error.code}"
                refusal = refusal_reason(reason)  # a downlink it could not rebuild: sent whole next time
                self.links.failed(node, refusal)
                self._record(r, UpdateRecord.failed(refusal or Reason.VOLUNTEER_ERROR, reason[:500]))
                self._notes[node] = {"round": r, "outcome": "failed", "reason": reason[:200]}
                return
            try:
                envelope = Envelope(*read_envelope(reply.content, rnd.max_payload_bytes))
            except ProtocolError as exc:
                self._record(r, UpdateRecord.failed(exc.reason, str(exc)))
                return
            record = rnd.offer(envelope)
            if record.accepted:  # it rebuilt this global and trained from it: a delta base next time
                self.links.answered(node, rnd.expected.base_adapter_digest)
            self._record(r, record)
            self._notes[node] = record.note(r)
        except Exception as exc:  # a bug must not end the round for everyone else
            log.exception("handling a reply of round %d failed", r)
            try:
                self.store.record_update(r, None, "rejected", reason=Reason.INTERNAL_ERROR,
                                         message=str(exc)[:500])
            except Exception:
                log.exception("could not record the failure")

    def _record(self, r: int, record: UpdateRecord) -> None:
        self.store.record_update(r, record.signer, record.outcome, **record.store_fields())
        self.on_event(UpdateHandled(r, record.accepted, str(record.reason), (record.signer or "")[:16]))

    def _record_late(self, r: int, reply, old_round: int, node: int) -> None:  # noqa: ANN001
        signer = None
        if not reply.has_error():
            try:
                from loracommons.protocol.envelope import open_envelope

                limit = self.cfg.limits.max_payload_bytes
                manifest, public = open_envelope(Envelope(*read_envelope(reply.content, limit)),
                                                 max_payload_bytes=limit)
                signer = public.fingerprint
            except Exception:  # refused as late whatever it holds: no reply may stop the loop
                log.debug("late reply did not open", exc_info=True)
        self.store.record_update(r, signer, "rejected", reason=Reason.LATE,
                                 message=f"update for round {old_round} arrived after that round closed")
        self.on_event(UpdateHandled(r, False, Reason.LATE))

    def _close(self, r: int, rnd: Round) -> RoundRow:
        outcome = rnd.close()
        for rejection in outcome.rejected:
            self.store.reject_admitted(r, rejection.update_digest, rejection.reason, rejection.message)
        for note in outcome.annotations:  # admitted, but neutralized: status shows which and why
            self.store.annotate_admitted(r, note.update_digest, note.reason, note.message)
        if outcome.tensors is None:
            row = self.store.close_round(r, "skipped", note=outcome.message, train_loss=outcome.train_loss,
                                         eval_loss=outcome.eval_loss)
            self.on_event(RoundClosed(r, "skipped", note=outcome.message))
            return row
        data = encode_tensors(round_tensors(outcome.tensors, self.cfg.round.downlink_dtype), "float32")
        digest = self.store.blobs.put(data)
        # Claimed losses count through their median (Round.close): no one volunteer sets the figures.
        row = self.store.close_round(r, "aggregated", adapter_digest=digest, note=outcome.note,
                                     train_loss=outcome.train_loss, eval_loss=outcome.eval_loss)
        self.global_adapter = GlobalAdapter.from_bytes(data)
        self.on_event(RoundClosed(r, "aggregated", row.admitted, row.rejected, row.train_loss, row.eval_loss))
        if self._publish_due(final=False):
            self.publish()
        return row

    # -- releases (coordinator/publishing.py) -----------------------------------

    def privacy_metrics(self, extra_rounds: int = 0) -> dict[str, float]:
        return publishing.privacy_metrics(self.cfg, self.store, extra_rounds)

    def privacy_budget_left(self) -> bool:
        return publishing.budget_left(self.cfg, self.store)

    def _publish_due(self, final: bool) -> bool:
        return publishing.due(self.cfg, self.store, final)

    def publish(self) -> None:
        """Publish the latest aggregated adapter as the next signed release."""
        self.on_event(Published(*publishing.publish(self.project_dir, self.cfg, self.store, self.key)))
