"""The async schedule's loop (FedBuff): every volunteer kept busy, a new version every K updates.

    whenever a connected node has no task in flight: record a task (fresh nonce, next serial) on the
        latest version and push it (unless the version is about to close: see `_holds`)
    poll replies; offer each to the open version's `Buffer` (admission against the task it names,
        staleness checked and weighted); record it, its task marked used in the same transaction
    once `buffer_size` updates are admitted: close the version as a sync round closes (rules,
        aggregation, store, a release every `publish_every` versions) and open the next one

A task unanswered for `timeout_s` (or past `max_staleness` versions) is expired and its node gets
another: a node that leaves costs the buffer nothing, one that joins gets a task at the next poll.

Crash safety: each admitted update's envelope is a blob named in its row. After a kill -9, `resume`
publishes what was aggregated and not released (`Coordinator.resume`); the version left open is
rebuilt by offering its admitted updates again from their blobs (their tasks say they were admitted,
`restoring` lets exactly those through once), and the tasks the dead process sent are expired: their
replies went to its Flower run. Nothing admitted is lost or folded twice; no version is published twice.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from loracommons.coordinator.buffer import Buffer
from loracommons.coordinator.downlinks import refusal_reason
from loracommons.coordinator.events import Finished, RoundOpened, TaskSent, UpdateHandled, Waiting
from loracommons.coordinator.initial import decode_adapter
from loracommons.coordinator.round import UpdateRecord
from loracommons.coordinator.rounds import POLL_FLOOR, POLL_SECONDS, Coordinator, GlobalAdapter
from loracommons.coordinator.rows import TaskRow
from loracommons.coordinator.store import new_nonce
from loracommons.protocol.envelope import Envelope
from loracommons.protocol.errors import ProtocolError, Reason
from loracommons.protocol.flower_app import read_envelope, task_content
from loracommons.protocol.flower_timing import quick_object_pulls
from loracommons.protocol.pacing import Pacer

log = logging.getLogger(__name__)

_ENVELOPE_MAGIC = b"LCENV1"


def pack_envelope(env: Envelope) -> bytes:
    """An envelope as one blob: magic, three lengths, the three parts."""
    parts = (env.manifest, env.payload, env.signature)
    return _ENVELOPE_MAGIC + struct.pack(">3Q", *map(len, parts)) + b"".join(parts)


def unpack_envelope(data: bytes) -> Envelope:
    head = len(_ENVELOPE_MAGIC) + 24
    if not data.startswith(_ENVELOPE_MAGIC) or len(data) < head:
        raise ValueError("not a packed envelope")
    sizes = struct.unpack(">3Q", data[len(_ENVELOPE_MAGIC):head])
    if sum(sizes) != len(data) - head:
        raise ValueError("packed envelope sizes do not add up")
    a, b = head + sizes[0], head + sizes[0] + sizes[1]
    return Envelope(data[head:a], data[a:b], data[b:])


@dataclass
class InFlight:
    node: int
    task: TaskRow
    sent: float  # time.monotonic()


@dataclass
class AsyncCoordinator(Coordinator):
    """`Coordinator` with the async loop; resume, closing a version and publishing are shared."""

    RESUME_NOTE = "the open version continues with the updates it had admitted"
    _flights: dict[str, InFlight] = field(default_factory=dict)  # message id -> task
    _expired: dict[str, InFlight] = field(default_factory=dict)  # still asked for, to refuse with a reason
    _bases: OrderedDict[str, Mapping[str, np.ndarray]] = field(default_factory=OrderedDict)
    _task_seconds: dict[int, float] = field(default_factory=dict)  # node -> its last task, sent to reply
    _free_since: dict[int, float] = field(default_factory=dict)  # node -> when its last reply came

    def run(self, grid) -> None:  # noqa: ANN001 (flwr Grid)
        quick_object_pulls("flwr.superlink.grid.http_grid")
        v = self.resume()
        expired = self.store.expire_tasks()  # sent by a dead process: replies went to its run
        if expired:
            log.info("%d task(s) of an earlier run expired", expired)
        total = self.cfg.round.rounds
        buffer = self._open(v, len(grid.get_node_ids())) if total == 0 or v <= total else None
        pace = Pacer(POLL_FLOOR, POLL_SECONDS)
        waiting = False
        while buffer is not None and not self.stop.is_set():
            nodes = sorted(grid.get_node_ids())
            if not nodes and not self._flights and not waiting:
                self.on_event(Waiting(0, 1))
            waiting = not nodes
            if self._dispatch(grid, v, nodes, buffer):
                pace.restart()
            replies = grid.pull_messages(set(self._flights) | set(self._expired))
            if replies:
                pace.restart()
            v, buffer = self._take(replies, v, buffer, len(nodes))
            self._expire(v)
            if buffer is not None:
                self.stop.wait(pace.interval())
        self.store.expire_tasks([f.task.nonce for f in self._flights.values()])
        self._flights.clear()
        if self._publish_due(final=True):
            self.publish()
        self.on_event(Finished(v - 1))

    def _take(self, replies: list, v: int, buffer: Buffer | None,
              connected: int) -> tuple[int, Buffer | None]:
        """Offer each reply to the open version; close it and open the next every buffer_size."""
        total = self.cfg.round.rounds
        for reply in replies:
            mid = reply.metadata.reply_to_message_id
            flight = self._flights.pop(mid, None) or self._expired.pop(mid, None)
            if flight is None:
                continue
            now = time.monotonic()
            self._task_seconds[flight.node] = now - flight.sent
            self._free_since[flight.node] = now
            if buffer is None:  # the last version closed: nothing left to admit into
                self.store.expire_tasks([flight.task.nonce])
                continue
            self._receive(v, buffer, flight, reply)
            if buffer.admitted >= self.cfg.round.buffer_size:
                self._close(v, buffer)
                v += 1
                buffer = self._open(v, connected) if total == 0 or v <= total else None
        return v, buffer

    # -- versions ---------------------------------------------------------------

    def _open(self, v: int, connected: int) -> Buffer:
        """The buffer of version v: a new round row, or the one a crash left open, refilled."""
        current = self.global_adapter
        assert current is not None
        row = self.store.round(v)
        if row is None or row.status != "open":
            latest = self.store.latest_release()
            row = self.store.open_round(v, new_nonce(), base_version=latest.version if latest else 0,
                                        base_adapter_digest=current.digest)
            self.on_event(RoundOpened(v, 0, connected))
        membership = self.cfg.project.membership
        buffer = Buffer(
            self.cfg, v, current.tensors, current.digest, row.nonce,
            tasks=self.store.task, bases=self._base_tensors, last_serial=self.store.last_task_serial,
            allowlist=self.store.registered_fingerprints() if membership == "allowlist" else frozenset(),
            banned=self.store.banned_fingerprints(), spill_dir=self.spill_dir,
        )
        self._refill(v, buffer)
        return buffer

    def _refill(self, v: int, buffer: Buffer) -> None:
        """Fold again what version v admitted before a restart (nothing, for a new version)."""
        for update in self.store.round_updates(v):
            if update.outcome != "admitted" or not update.update_digest:
                continue
            try:
                envelope = unpack_envelope(self.store.blobs.get(update.envelope_digest or ""))
                record = buffer.offer(envelope, restoring=True)
                reason, message = record.reason, record.message
            except Exception as exc:  # a missing or torn blob: refused with the reason, not lost silently
                record, reason, message = None, Reason.INTERNAL_ERROR, f"not restorable: {exc}"
            if record is None or not record.accepted:
                self.store.reject_admitted(v, update.update_digest, str(reason),
                                           f"refused when the version was rebuilt after a restart: {message}")

    def _base_tensors(self, digest: str) -> Mapping[str, np.ndarray] | None:
        """A recent version's adapter by digest (the bases of stale updates), a few kept decoded."""
        if digest in self._bases:
            self._bases.move_to_end(digest)
            return self._bases[digest]
        if not self.store.blobs.has(digest):
            return None
        tensors = decode_adapter(self.store.blobs.get(digest))
        self._bases[digest] = tensors
        while len(self._bases) > self.cfg.round.max_staleness + 1:
            self._bases.popitem(last=False)
        return tensors

    # -- tasks ------------------------------------------------------------------

    def _dispatch(self, grid, v: int, nodes: list[int], buffer: Buffer) -> int:  # noqa: ANN001
        """A task on the latest version for every node with none in flight and none held back
        (`_holds`); returns how many."""
        busy = {flight.node for flight in self._flights.values()}
        now = time.monotonic()
        free = [node for node in nodes if node not in busy and not self._holds(node, buffer, now)]
        if not free:
            return 0
        for node in free:
            self._free_since.pop(node, None)
        current = self.global_adapter
        assert current is not None
        rows = [self.store.record_task(new_nonce(), v, node, current.digest) for node in free]
        messages = [self._task_message(row, current, node) for row, node in zip(rows, free, strict=True)]
        now = time.monotonic()
        for mid, row, node in zip(grid.push_messages(messages), rows, free, strict=True):
            if not mid:
                self.store.expire_tasks([row.nonce])
                continue
            self._flights[mid] = InFlight(node, row, now)
            self.on_event(TaskSent(row.serial, v, node))
        return len(free)

    def _holds(self, node: int, buffer: Buffer, now: float) -> bool:
        """Whether a node that has just replied waits for the open version to close.

        It waits, at most `hold_fraction` of its last task's time since its reply, while the tasks
        in flight are expected (each node's last task time) to bring the buffer to `buffer_size`
        within that wait: then its next task trains on the new version instead of one about to be
        replaced, which would count it tau = 1 stale. With equal speeds this keeps every update
        fresh (FedBuff on a barrier nobody waits long at); a volunteer far slower than the rest is
        never waited for. A node with no task time yet (its first task) is never held."""
        fraction = self.cfg.round.hold_fraction
        took, since = self._task_seconds.get(node), self._free_since.get(node)
        if fraction <= 0 or took is None or since is None:
            return False
        deadline = since + fraction * took
        if now >= deadline:
            return False
        needed = self.cfg.round.buffer_size - buffer.admitted
        soon = sum(1 for f in self._flights.values()
                   if f.node in self._task_seconds and f.sent + self._task_seconds[f.node] <= deadline)
        return soon >= needed

    def _task_message(self, row: TaskRow, current: GlobalAdapter, node: int):  # noqa: ANN202 (flwr Message)
        """The Flower message of one task (its serial as the task's round, its own nonce), the global
        as that node can take it (`coordinator/downlinks.py`, as in sync)."""
        from flwr.app import Message

        task = self.cfg.task(row.serial, row.nonce, row.base_adapter_digest, progress=row.version,
                             base_version=row.base_version)
        link, data = self.links.for_node(node, current.digest, current.tensors)
        return Message(task_content(task.to_bytes(), data, self._notes.pop(node, None), link.to_bytes()),
                       dst_node_id=node, message_type="train", group_id=str(row.serial))

    def _expire(self, v: int) -> None:
        """Forget tasks unanswered for timeout_s or too stale to be admitted: their nodes get new ones."""
        now, rnd = time.monotonic(), self.cfg.round
        gone = [mid for mid, f in self._flights.items()
                if now - f.sent > rnd.timeout_s or v - f.task.version > rnd.max_staleness]
        self._expired = {mid: f for mid, f in self._expired.items() if now - f.sent <= 2 * rnd.timeout_s}
        if not gone:
            return
        flights = {mid: self._flights.pop(mid) for mid in gone}
        self.store.expire_tasks([f.task.nonce for f in flights.values()])
        for flight in flights.values():
            self.links.failed(flight.node, None)
            self._notes[flight.node] = {"round": flight.task.serial, "outcome": "missed",
                                        "reason": "no reply before the task expired"}
        # a reply that still comes (until 2 x timeout_s after the task was sent) is refused with its
        # reason, stale or late, rather than ignored
        self._expired.update(flights)

    # -- replies ----------------------------------------------------------------

    def _receive(self, v: int, buffer: Buffer, flight: InFlight, reply) -> None:  # noqa: ANN001
        """Admit one reply into version v; whatever it holds, the loop goes on."""
        try:
            if reply.has_error():
                reason = reply.error.reason or f"error code {reply.error.code}"
                self.store.expire_tasks([flight.task.nonce])
                refusal = refusal_reason(reason)  # a downlink it could not rebuild: sent whole next time
                self.links.failed(flight.node, refusal)
                self._record_update(v, UpdateRecord.failed(refusal or Reason.VOLUNTEER_ERROR, reason[:500]),
                                    None, None)
                self._notes[flight.node] = {"round": flight.task.serial, "outcome": "failed",
                                            "reason": reason[:200]}
                return
            try:
                envelope = Envelope(*read_envelope(reply.content, buffer.max_payload_bytes))
            except ProtocolError as exc:
                self._record_update(v, UpdateRecord.failed(exc.reason, str(exc)), None, None)
                return
            record = buffer.offer(envelope)
            task = buffer.last_task if record.accepted else None
            if task is not None:  # it rebuilt that version and trained from it: a delta base next time
                self.links.answered(flight.node, task.base_adapter_digest)
            blob = self.store.blobs.put(pack_envelope(envelope)) if task is not None else None
            self._record_update(v, record, blob, task)
            self._notes[flight.node] = record.note(flight.task.serial)
        except Exception as exc:  # a bug must not end the loop for everyone else
            log.exception("handling a reply of version %d failed", v)
            try:
                self.store.record_update(v, None, "rejected", reason=Reason.INTERNAL_ERROR,
                                         message=str(exc)[:500])
            except Exception:
                log.exception("could not record the failure")

    def _record_update(self, v: int, record: UpdateRecord, blob: str | None, task: TaskRow | None) -> None:
        self.store.record_update(v, record.signer, record.outcome, **record.store_fields(),
                                 envelope_digest=blob, task_nonce=task.nonce if task else None)
        self.on_event(UpdateHandled(v, record.accepted, str(record.reason), (record.signer or "")[:16],
                                    record.staleness))
