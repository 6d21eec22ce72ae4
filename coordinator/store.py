"""Coordinator state: one SQLite database plus content-addressed blobs.

    store = Store("myproject")            # creates myproject/state.db and myproject/blobs/
    store.open_round(1, nonce, base_version=0, sampled=3)
    store.record_update(1, fingerprint, "admitted", examples=120, train_loss=1.9, ...)
    store.close_round(1, "aggregated", adapter_digest=store.blobs.put(adapter_bytes))

The database (`state.db`, tables in `schema.py`) holds volunteers, rounds, updates with
their admission outcome and reason, and releases; reads return the frozen records of
`rows.py`. Every write is one transaction, so a kill -9 leaves either the state before a
call or the state after it. Blobs (`blobs.py`) are named by their sha256 and never hold a
partial file.

Past ~400 lines because it is one short transaction per thing the coordinator records or asks;
the schema, the read queries, the rows and the blobs are already apart.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, func, select

from loracommons.coordinator import queries as q
from loracommons.coordinator.blobs import BlobCorrupt, BlobStore, StoreError
from loracommons.coordinator.rows import (
    OUTCOMES,
    ROUND_STATUSES,
    Contribution,
    ReleaseRow,
    RoundRow,
    StoreStatus,
    TaskRow,
    UpdateRow,
    VolunteerRow,
    release_row,
    round_row,
    update_row,
    utc_now,
    volunteer_row,
)
from loracommons.coordinator.schema import (
    IMMEDIATE,
    open_engine,
    releases,
    rounds,
    tasks,
    updates,
    volunteers,
)
from loracommons.protocol.identity import KEY_TYPES, PublicKey

__all__ = ["BlobCorrupt", "BlobStore", "Store", "StoreError", "new_nonce"]

log = logging.getLogger(__name__)

_Row = TypeVar("_Row")

MESSAGE_CHARS = 2000  # an update's message is cut to this length


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


class Store:
    """The coordinator's durable state in `DIR/state.db` and `DIR/blobs/`."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "state.db"
        self.blobs = BlobStore(self.dir / "blobs")
        self._engine = open_engine(str(self.path))

    def close(self) -> None:
        self._engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write transaction, taken with BEGIN IMMEDIATE so read-then-write is atomic."""
        with self._engine.connect().execution_options(**{IMMEDIATE: True}) as conn:
            with conn.begin():
                yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            with conn.begin():
                yield conn

    # -- volunteers -------------------------------------------------------

    def register_volunteer(self, public_key: PublicKey | str, name: str | None = None) -> VolunteerRow:
        """Register (or re-register, updating the name) a volunteer key."""
        key = public_key if isinstance(public_key, PublicKey) else PublicKey.from_openssh(public_key)
        if key.key_type != KEY_TYPES["volunteer"]:
            raise StoreError(f"volunteer keys are {KEY_TYPES['volunteer']}, got {key.key_type}")
        with self._write() as conn:
            if q.volunteer(conn, key.fingerprint) is None:
                conn.execute(volunteers.insert().values(
                    fingerprint=key.fingerprint, public_key=key.openssh, display_name=name,
                    registered=True, banned=False, first_seen=utc_now(),
                    rounds_contributed=0, examples_contributed=0))
            else:
                values: dict[str, Any] = {"registered": True, "public_key": key.openssh}
                if name is not None:
                    values["display_name"] = name
                conn.execute(volunteers.update()
                             .where(volunteers.c.fingerprint == key.fingerprint).values(**values))
            return _must(q.volunteer(conn, key.fingerprint))

    def ban(self, fingerprint_or_prefix: str) -> str:
        """Ban a volunteer; returns the full fingerprint.

        A unique prefix of a known key is enough. A full 64-hex fingerprint that was
        never seen is banned ahead of time.
        """
        want = q.normalize_fingerprint(fingerprint_or_prefix)
        with self._write() as conn:
            if len(want) == 64 and q.volunteer(conn, want) is None:
                conn.execute(volunteers.insert().values(
                    fingerprint=want, public_key=None, display_name=None, registered=False,
                    banned=True, first_seen=utc_now(), rounds_contributed=0, examples_contributed=0))
                return want
            fingerprint = q.resolve_fingerprint(conn, want)
            conn.execute(volunteers.update().where(volunteers.c.fingerprint == fingerprint)
                         .values(banned=True))
            return fingerprint

    def unban(self, fingerprint_or_prefix: str) -> str:
        with self._write() as conn:
            fingerprint = q.resolve_fingerprint(conn, fingerprint_or_prefix)
            conn.execute(volunteers.update().where(volunteers.c.fingerprint == fingerprint)
                         .values(banned=False))
            return fingerprint

    def volunteer(self, fingerprint: str) -> VolunteerRow | None:
        with self._read() as conn:
            return q.volunteer(conn, fingerprint)

    def banned_fingerprints(self) -> frozenset[str]:
        with self._read() as conn:
            rows = conn.execute(select(volunteers.c.fingerprint).where(volunteers.c.banned))
            return frozenset(r[0] for r in rows)

    def registered_fingerprints(self) -> frozenset[str]:
        """Registered and not banned: who may contribute to an allowlist project."""
        with self._read() as conn:
            rows = conn.execute(select(volunteers.c.fingerprint)
                                .where(volunteers.c.registered, ~volunteers.c.banned))
            return frozenset(r[0] for r in rows)

    def registered_public_keys(self) -> list[str]:
        """OpenSSH public keys of registered, unbanned volunteers (for SuperNode auth)."""
        with self._read() as conn:
            rows = conn.execute(select(volunteers.c.public_key)
                                .where(volunteers.c.registered, ~volunteers.c.banned,
                                       volunteers.c.public_key.is_not(None))
                                .order_by(volunteers.c.fingerprint))
            return [r[0] for r in rows]

    def leaderboard(self, limit: int = 1000) -> list[VolunteerRow]:
        """Volunteers who contributed, most examples first; banned keys left out."""
        v = volunteers.c
        with self._read() as conn:
            rows = conn.execute(
                select(volunteers).where(v.rounds_contributed > 0, ~v.banned)
                .order_by(v.examples_contributed.desc(), v.rounds_contributed.desc(), v.fingerprint)
                .limit(limit)).mappings()
            return [volunteer_row(r) for r in rows]

    def contributions(self, limit: int = 200) -> list[Contribution]:
        """Each key's updates admitted and rejected (with reasons), examples and last update."""
        with self._read() as conn:
            return q.contributions(conn, limit)

    def volunteers_admitted(self, through_round: int) -> int:
        with self._read() as conn:
            return q.volunteers_admitted(conn, through_round)

    # -- rounds and updates -----------------------------------------------

    def open_round(self, round: int, nonce: str, *, base_version: int, sampled: int = 0,
                   base_adapter_digest: str | None = None) -> RoundRow:
        """Start round `round`. Re-opening a round left open (or failed) by a crash starts it
        over: the unfinished attempt's updates are dropped, since none of them was aggregated."""
        with self._write() as conn:
            row = q.round_by_number(conn, round)
            if row is not None and row.status in ("aggregated", "skipped"):
                raise StoreError(f"round {round} is already closed ({row.status})")
            last = q.last_closed(conn)
            if round <= last and row is None:
                raise StoreError(f"round {round} is not after the last closed round {last}")
            values = dict(started=utc_now(), closed=None, status="open", nonce=nonce,
                          base_version=base_version, base_adapter_digest=base_adapter_digest,
                          adapter_digest=None, sampled=sampled, admitted=0, rejected=0,
                          train_loss=None, eval_loss=None, note="")
            if row is None:
                conn.execute(rounds.insert().values(round=round, **values))
            else:
                dropped = conn.execute(updates.delete().where(updates.c.round == round)).rowcount
                log.info("round %d restarted; %d update(s) of the unfinished attempt dropped", round, dropped)
                conn.execute(rounds.update().where(rounds.c.round == round).values(**values))
            return _must(q.round_by_number(conn, round))

    def record_update(self, round: int, fingerprint: str | None, outcome: str, *, reason: str = "",
                      message: str = "", update_digest: str | None = None, examples: int = 0,
                      train_loss: float | None = None, nbytes: int = 0,
                      public_key: str | None = None, received: str | None = None,
                      staleness: int | None = None, envelope_digest: str | None = None,
                      task_nonce: str | None = None) -> int:
        """Record one reply and its admission outcome; returns the update id.

        Async: `task_nonce` of an admitted update marks its task used in the same transaction, so
        that a crash can neither admit it twice nor forget that it was admitted."""
        if outcome not in OUTCOMES:
            raise StoreError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        if outcome == "rejected" and not reason:
            raise StoreError("a rejected update needs a reason code")
        with self._write() as conn:
            row = q.round_by_number(conn, round)
            if row is None or row.status != "open":
                state = "unknown" if row is None else row.status
                raise StoreError(f"round {round} is not open ({state}); update not recorded")
            if fingerprint is not None:
                fingerprint = q.normalize_fingerprint(fingerprint)
                if len(fingerprint) != 64:
                    raise StoreError(f"fingerprint {fingerprint[:80]!r} is not 64 hex digits")
                if q.volunteer(conn, fingerprint) is None:
                    conn.execute(volunteers.insert().values(
                        fingerprint=fingerprint, public_key=public_key, display_name=None,
                        registered=False, banned=False, first_seen=utc_now(),
                        rounds_contributed=0, examples_contributed=0))
            result = conn.execute(updates.insert().values(
                round=round, fingerprint=fingerprint, update_digest=update_digest, outcome=outcome,
                reason=reason, message=message[:MESSAGE_CHARS], examples=int(examples),
                train_loss=_finite(train_loss), bytes=int(nbytes), received=received or utc_now(),
                staleness=staleness, envelope_digest=envelope_digest))
            if task_nonce is not None and outcome == "admitted":
                unused = (tasks.c.nonce == task_nonce, tasks.c.status != "used")
                used = conn.execute(tasks.update().where(*unused)
                                    .values(status="used", update_digest=update_digest)).rowcount
                if not used:
                    raise StoreError(f"task {task_nonce[:16]} is unknown or already used")
            return int(_must(result.inserted_primary_key)[0])

    def reject_admitted(self, round: int, update_digest: str, reason: str, message: str = "") -> None:
        """Turn an admitted update of an open round into a rejection (e.g. refused by a robust
        rule at aggregation time), before the round closes and credits contributors."""
        if not reason:
            raise StoreError("a rejected update needs a reason code")
        with self._write() as conn:
            row = q.round_by_number(conn, round)
            if row is None or row.status != "open":
                raise StoreError(f"round {round} is not open; its updates can no longer change")
            changed = conn.execute(updates.update().where(
                updates.c.round == round, updates.c.update_digest == update_digest,
                updates.c.outcome == "admitted").values(outcome="rejected", reason=reason,
                                                        message=message[:MESSAGE_CHARS])).rowcount
            if not changed:
                raise StoreError(f"round {round} has no admitted update {str(update_digest)[:16]}")

    def annotate_admitted(self, round: int, update_digest: str, reason: str, note: str) -> None:
        """Mark an admitted update of an open round as neutralized (e.g. clipped) without rejecting it:
        `reason` is a short code, `note` is appended to its message."""
        with self._write() as conn:
            row = q.round_by_number(conn, round)
            if row is None or row.status != "open":
                raise StoreError(f"round {round} is not open; its updates can no longer change")
            found = conn.execute(select(updates.c.id, updates.c.message).where(
                updates.c.round == round, updates.c.update_digest == update_digest,
                updates.c.outcome == "admitted")).first()
            if found is None:
                raise StoreError(f"round {round} has no admitted update {str(update_digest)[:16]}")
            message = f"{found.message}; {note}" if found.message else note
            conn.execute(updates.update().where(updates.c.id == found.id)
                         .values(reason=reason, message=message[:MESSAGE_CHARS]))

    def has_admitted(self, round: int, fingerprint: str) -> bool:
        """Whether this key already has an admitted update in the round (one per key per round)."""
        with self._read() as conn:
            count = conn.execute(select(func.count()).select_from(updates).where(
                updates.c.round == round, updates.c.fingerprint == fingerprint,
                updates.c.outcome == "admitted")).scalar()
            return bool(count)

    def rejections_by_round(self, first_round: int = 1) -> dict[int, dict[str, int]]:
        with self._read() as conn:
            return q.rejections_by_round(conn, first_round)

    def round_updates(self, round: int) -> list[UpdateRow]:
        with self._read() as conn:
            rows = conn.execute(select(updates).where(updates.c.round == round)
                                .order_by(updates.c.id)).mappings()
            return [update_row(r) for r in rows]

    def close_round(self, round: int, status: str, *, eval_loss: float | None = None, note: str = "",
                    adapter_digest: str | None = None, train_loss: float | None = None) -> RoundRow:
        """Close a round; idempotent when it is already closed with the same status.

        Counts come from the recorded updates. For an `aggregated` round each admitted key is
        credited once (rounds and examples) in the same transaction that closes the round, so
        a crash can neither lose nor double the credit. `train_loss` defaults to the
        example-weighted mean over admitted updates.
        """
        if status not in ROUND_STATUSES or status == "open":
            raise StoreError(f"a round closes as aggregated, skipped or failed, not {status!r}")
        with self._write() as conn:
            row = q.round_by_number(conn, round)
            if row is None:
                raise StoreError(f"round {round} was never opened")
            if row.status != "open":
                if row.status == status:
                    return row
                raise StoreError(f"round {round} is already closed as {row.status}, not {status}")
            admitted = conn.execute(select(updates.c.fingerprint, updates.c.examples, updates.c.train_loss)
                                    .where(updates.c.round == round, updates.c.outcome == "admitted")).all()
            rejected = conn.execute(select(func.count()).select_from(updates).where(
                updates.c.round == round, updates.c.outcome == "rejected")).scalar()
            if train_loss is None:
                weighted = [(ex, loss) for _, ex, loss in admitted if loss is not None]
                total = sum(max(ex, 0) for ex, _ in weighted)
                if weighted and total > 0:
                    train_loss = sum(max(ex, 0) * loss for ex, loss in weighted) / total
                elif weighted:
                    train_loss = sum(loss for _, loss in weighted) / len(weighted)
            if status == "aggregated":
                for fingerprint, examples, _ in admitted:
                    if fingerprint is None:
                        continue
                    conn.execute(volunteers.update().where(volunteers.c.fingerprint == fingerprint).values(
                        rounds_contributed=volunteers.c.rounds_contributed + 1,
                        examples_contributed=volunteers.c.examples_contributed + max(int(examples), 0)))
            conn.execute(rounds.update().where(rounds.c.round == round).values(
                status=status, closed=utc_now(), admitted=len(admitted), rejected=rejected,
                train_loss=_finite(train_loss), eval_loss=_finite(eval_loss), note=note,
                adapter_digest=adapter_digest))
            return _must(q.round_by_number(conn, round))

    def round(self, round: int) -> RoundRow | None:
        with self._read() as conn:
            return q.round_by_number(conn, round)

    def rounds(self) -> list[RoundRow]:
        with self._read() as conn:
            return [round_row(r) for r in conn.execute(select(rounds).order_by(rounds.c.round)).mappings()]

    def current_round(self) -> RoundRow | None:
        """The round left open (by a crash, or still running), if any."""
        with self._read() as conn:
            row = conn.execute(select(rounds).where(rounds.c.status == "open")
                               .order_by(rounds.c.round.desc()).limit(1)).mappings().first()
            return round_row(row) if row is not None else None

    def last_closed_round(self) -> int:
        """Number of the last round closed in any way (0 before the first); the next is this + 1."""
        with self._read() as conn:
            return conn.execute(select(func.max(rounds.c.round))
                                .where(rounds.c.status != "open")).scalar() or 0

    def last_aggregated_round(self) -> RoundRow | None:
        """The last round that produced a new global adapter (its blob in `adapter_digest`)."""
        with self._read() as conn:
            row = conn.execute(select(rounds).where(rounds.c.status == "aggregated")
                               .order_by(rounds.c.round.desc()).limit(1)).mappings().first()
            return round_row(row) if row is not None else None

    def unreleased_aggregate(self) -> RoundRow | None:
        """The last aggregated round when it is newer than the latest release, else None.

        After a crash between closing a round and publishing it, resume publishes this.
        """
        last = self.last_aggregated_round()
        latest = self.latest_release()
        if last is None or (latest is not None and latest.round >= last.round):
            return None
        return last

    # -- async tasks ------------------------------------------------------

    def record_task(self, nonce: str, version: int, node_id: int, base_adapter_digest: str) -> TaskRow:
        """Record a task before it is sent: the next serial, on the version before `version` (open)."""
        with self._write() as conn:
            row = q.round_by_number(conn, version)
            if row is None or row.status != "open":
                raise StoreError(f"version {version} is not open; no task can be sent for it")
            serial = (conn.execute(select(func.max(tasks.c.serial))).scalar() or 0) + 1
            conn.execute(tasks.insert().values(
                nonce=nonce, serial=serial, version=version, base_version=version - 1,
                base_adapter_digest=base_adapter_digest, node_id=str(int(node_id)), sent=utc_now(),
                status="sent", update_digest=None))
            conn.execute(rounds.update().where(rounds.c.round == version)
                         .values(sampled=rounds.c.sampled + 1))
            return _must(_task(conn, nonce))

    def task(self, nonce: str) -> TaskRow | None:
        with self._read() as conn:
            return _task(conn, nonce)

    def last_task_serial(self) -> int:
        with self._read() as conn:
            return conn.execute(select(func.max(tasks.c.serial))).scalar() or 0

    def expire_tasks(self, nonces: list[str] | None = None) -> int:
        """Mark unanswered tasks expired (those named, or every one still sent); returns how many."""
        with self._write() as conn:
            where = [tasks.c.status == "sent"]
            if nonces is not None:
                where.append(tasks.c.nonce.in_(nonces))
            return int(conn.execute(tasks.update().where(*where).values(status="expired")).rowcount)

    # -- releases ---------------------------------------------------------

    def add_release(self, version: int, round: int, manifest_digest: str, *, created: str, path: str,
                    adapter_digest: str | None = None) -> ReleaseRow:
        """Record a published release. Versions are consecutive from 1; recording the same
        release twice is a no-op, a different release under a taken version an error."""
        with self._write() as conn:
            existing = conn.execute(select(releases).where(releases.c.version == version)).mappings().first()
            if existing is not None:
                if existing["manifest_digest"] == manifest_digest:
                    return release_row(existing)
                raise StoreError(f"release version {version} is already recorded with another manifest")
            latest = conn.execute(select(func.max(releases.c.version))).scalar() or 0
            if version != latest + 1:
                raise StoreError(f"release version {version} does not follow the latest version {latest}")
            conn.execute(releases.insert().values(
                version=version, round=round, manifest_digest=manifest_digest,
                adapter_digest=adapter_digest, created=created, path=path))
            return release_row(conn.execute(select(releases).where(releases.c.version == version))
                               .mappings().one())

    def next_release_version(self) -> int:
        latest = self.latest_release()
        return latest.version + 1 if latest is not None else 1

    def latest_release(self) -> ReleaseRow | None:
        with self._read() as conn:
            return q.latest_release(conn)

    def release(self, version: int) -> ReleaseRow | None:
        with self._read() as conn:
            row = conn.execute(select(releases).where(releases.c.version == version)).mappings().first()
            return release_row(row) if row is not None else None

    def releases(self) -> list[ReleaseRow]:
        with self._read() as conn:
            rows = conn.execute(select(releases).order_by(releases.c.version)).mappings()
            return [release_row(r) for r in rows]

    # -- summary ----------------------------------------------------------

    def status(self) -> StoreStatus:
        """Everything `coordinator status` shows, read in one transaction."""
        with self._read() as conn:
            return q.status(conn)


def _must(row: _Row | None) -> _Row:
    """A row the same transaction just wrote, which must therefore be there."""
    if row is None:  # pragma: no cover - only if SQLite lost a write inside one transaction
        raise StoreError("a row written in this transaction is missing")
    return row


def _task(conn: Connection, nonce: str) -> TaskRow | None:
    row = conn.execute(select(tasks).where(tasks.c.nonce == nonce)).mappings().first()
    return TaskRow(**{**row, "node_id": int(row["node_id"])}) if row is not None else None


def new_nonce() -> str:
    """A fresh random round nonce."""
    return secrets.token_hex(16)
