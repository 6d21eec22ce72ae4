"""Coordinator state: one SQLite database plus content-addressed blobs.

    store = Store("myproject")            # creates myproject/state.db and myproject/blobs/
    store.open_round(1, nonce, base_version=0, sampled=3)
    store.record_update(1, fingerprint, "admitted", examples=120, train_loss=1.9, ...)
    store.close_round(1, "aggregated", adapter_digest=store.blobs.put(adapter_bytes))

The database (`state.db`, WAL mode) holds volunteers, rounds, updates with their
admission outcome and reason, and releases. Every write is one transaction, so a
kill -9 leaves either the state before a call or the state after it. Blobs live at
`blobs/sha256/<hex>`; they are written to a temporary file in the same folder,
fsynced and renamed, so a final name never holds a partial file.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    select,
)

from loracommons.protocol.durable import TEMP_PREFIX, atomic_write
from loracommons.protocol.identity import KEY_TYPES, PublicKey, fingerprint_display

log = logging.getLogger(__name__)

ROUND_STATUSES = ("open", "aggregated", "skipped", "failed")
OUTCOMES = ("admitted", "rejected")
RECENT_UPDATES = 200  # updates listed by `status()`
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class StoreError(Exception):
    """A state operation that cannot be done as asked (unknown key, closed round...)."""


class BlobCorrupt(StoreError):
    """A blob's bytes no longer hash to its name."""


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class BlobStore:
    """Immutable byte strings named by their sha256, e.g. each version's global adapter."""

    def __init__(self, root: str | Path):
        self.root = Path(root) / "sha256"
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_temp()

    def clean_temp(self) -> int:
        """Remove temporary files left by a writer that was killed; returns how many."""
        removed = 0
        for leftover in self.root.glob(TEMP_PREFIX + "*"):
            leftover.unlink(missing_ok=True)
            removed += 1
        if removed:
            log.info("removed %d unfinished blob file(s) from %s", removed, self.root)
        return removed

    def path(self, digest: str) -> Path:
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise StoreError(f"blob name {str(digest)[:80]!r} is not a sha256 hex digest")
        return self.root / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self.path(digest)
        if path.is_file() and _file_sha256(path) == digest:
            return digest
        atomic_write(path, data)  # new, or repairs a damaged copy
        return digest

    def get(self, digest: str) -> bytes:
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"no blob {digest[:16]} in {self.root}") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise BlobCorrupt(f"blob {digest[:16]} is corrupt: its bytes hash to another digest")
        return data


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


metadata = MetaData()

volunteers = Table(
    "volunteers", metadata,
    Column("fingerprint", String(64), primary_key=True),
    Column("public_key", Text, nullable=True),  # unknown for a key banned before it was seen
    Column("display_name", Text, nullable=True),
    Column("registered", Boolean, nullable=False, default=False),
    Column("banned", Boolean, nullable=False, default=False),
    Column("first_seen", String(32), nullable=False),
    Column("rounds_contributed", Integer, nullable=False, default=0),
    Column("examples_contributed", Integer, nullable=False, default=0),
)

rounds = Table(
    "rounds", metadata,
    Column("round", Integer, primary_key=True),
    Column("started", String(32), nullable=False),
    Column("closed", String(32), nullable=True),
    Column("status", String(16), nullable=False),
    Column("nonce", String(128), nullable=False),
    Column("base_version", Integer, nullable=False),
    Column("base_adapter_digest", String(64), nullable=True),
    Column("adapter_digest", String(64), nullable=True),  # blob of the adapter this round produced
    Column("sampled", Integer, nullable=False, default=0),
    Column("admitted", Integer, nullable=False, default=0),
    Column("rejected", Integer, nullable=False, default=0),
    Column("train_loss", Float, nullable=True),
    Column("eval_loss", Float, nullable=True),
    Column("note", Text, nullable=False, default=""),
)

updates = Table(
    "updates", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("round", Integer, ForeignKey("rounds.round"), nullable=False, index=True),
    Column("fingerprint", String(64), nullable=True, index=True),  # None when unparseable
    Column("update_digest", String(64), nullable=True),
    Column("outcome", String(16), nullable=False),
    Column("reason", String(64), nullable=False, default=""),
    Column("message", Text, nullable=False, default=""),
    Column("examples", Integer, nullable=False, default=0),
    Column("train_loss", Float, nullable=True),
    Column("bytes", Integer, nullable=False, default=0),
    Column("received", String(32), nullable=False),
)

releases = Table(
    "releases", metadata,
    Column("version", Integer, primary_key=True),
    Column("round", Integer, nullable=False),
    Column("manifest_digest", String(64), nullable=False, unique=True),
    Column("adapter_digest", String(64), nullable=True),
    Column("created", String(32), nullable=False),
    Column("path", Text, nullable=False),  # relative to the project folder
)


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
        self._engine = create_engine(
            f"sqlite:///{self.path}",
            connect_args={"check_same_thread": False, "timeout": 30},
        )
        event.listen(self._engine, "connect", _on_connect)
        event.listen(self._engine, "begin", _on_begin)
        metadata.create_all(self._engine)

    def close(self) -> None:
        self._engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write transaction, taken with BEGIN IMMEDIATE so read-then-write is atomic."""
        with self._engine.connect().execution_options(lc_immediate=True) as conn:
            with conn.begin():
                yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            with conn.begin():
                yield conn

    # -- volunteers -------------------------------------------------------

    def register_volunteer(self, public_key: PublicKey | str, name: str | None = None) -> dict:
        """Register (or re-register, updating the name) a volunteer key."""
        key = public_key if isinstance(public_key, PublicKey) else PublicKey.from_openssh(public_key)
        if key.key_type != KEY_TYPES["volunteer"]:
            raise StoreError(f"volunteer keys are {KEY_TYPES['volunteer']}, got {key.key_type}")
        with self._write() as conn:
            row = _volunteer(conn, key.fingerprint)
            if row is None:
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
            return dict(_volunteer(conn, key.fingerprint))

    def resolve_fingerprint(self, fingerprint_or_prefix: str) -> str:
        """A known volunteer's full fingerprint from a unique prefix (dashes allowed)."""
        with self._read() as conn:
            return _resolve(conn, fingerprint_or_prefix)

    def ban(self, fingerprint_or_prefix: str) -> str:
        """Ban a volunteer; returns the full fingerprint.

        A unique prefix of a known key is enough. A full 64-hex fingerprint that was
        never seen is banned ahead of time.
        """
        want = _normalize(fingerprint_or_prefix)
        with self._write() as conn:
            if len(want) == 64 and _volunteer(conn, want) is None:
                conn.execute(volunteers.insert().values(
                    fingerprint=want, public_key=None, display_name=None, registered=False,
                    banned=True, first_seen=utc_now(), rounds_contributed=0, examples_contributed=0))
                return want
            fingerprint = _resolve(conn, want)
            conn.execute(volunteers.update().where(volunteers.c.fingerprint == fingerprint)
                         .values(banned=True))
            return fingerprint

    def unban(self, fingerprint_or_prefix: str) -> str:
        with self._write() as conn:
            fingerprint = _resolve(conn, fingerprint_or_prefix)
            conn.execute(volunteers.update().where(volunteers.c.fingerprint == fingerprint)
                         .values(banned=False))
            return fingerprint

    def volunteer(self, fingerprint: str) -> dict | None:
        with self._read() as conn:
            row = _volunteer(conn, fingerprint)
            return dict(row) if row is not None else None

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

    def leaderboard(self, limit: int = 1000) -> list[dict]:
        """Volunteers who contributed, most examples first; banned keys left out."""
        with self._read() as conn:
            rows = conn.execute(
                select(volunteers).where(volunteers.c.rounds_contributed > 0, ~volunteers.c.banned)
                .order_by(volunteers.c.examples_contributed.desc(), volunteers.c.rounds_contributed.desc(),
                          volunteers.c.fingerprint).limit(limit)).mappings()
            return [{"fingerprint": r["fingerprint"], "short": fingerprint_display(r["fingerprint"]),
                     "display_name": r["display_name"], "rounds_contributed": r["rounds_contributed"],
                     "examples_contributed": r["examples_contributed"]} for r in rows]

    # -- rounds and updates -----------------------------------------------

    def open_round(self, round: int, nonce: str, *, base_version: int, sampled: int = 0,
                   base_adapter_digest: str | None = None) -> dict:
        """Start round `round`. Re-opening a round left open (or failed) by a crash starts it
        over: the unfinished attempt's updates are dropped, since none of them was aggregated."""
        with self._write() as conn:
            row = _round(conn, round)
            if row is not None and row["status"] in ("aggregated", "skipped"):
                raise StoreError(f"round {round} is already closed ({row['status']})")
            last = conn.execute(select(func.max(rounds.c.round))
                                .where(rounds.c.status != "open")).scalar() or 0
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
            return dict(_round(conn, round))

    def set_sampled(self, round: int, sampled: int) -> None:
        with self._write() as conn:
            conn.execute(rounds.update().where(rounds.c.round == round).values(sampled=sampled))

    def record_update(self, round: int, fingerprint: str | None, outcome: str, *, reason: str = "",
                      message: str = "", update_digest: str | None = None, examples: int = 0,
                      train_loss: float | None = None, nbytes: int = 0,
                      public_key: str | None = None, received: str | None = None) -> int:
        """Record one reply and its admission outcome; returns the update id."""
        if outcome not in OUTCOMES:
            raise StoreError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        if outcome == "rejected" and not reason:
            raise StoreError("a rejected update needs a reason code")
        with self._write() as conn:
            row = _round(conn, round)
            if row is None or row["status"] != "open":
                state = "unknown" if row is None else row["status"]
                raise StoreError(f"round {round} is not open ({state}); update not recorded")
            if fingerprint is not None:
                fingerprint = _normalize(fingerprint)
                if len(fingerprint) != 64:
                    raise StoreError(f"fingerprint {fingerprint[:80]!r} is not 64 hex digits")
                if _volunteer(conn, fingerprint) is None:
                    conn.execute(volunteers.insert().values(
                        fingerprint=fingerprint, public_key=public_key, display_name=None,
                        registered=False, banned=False, first_seen=utc_now(),
                        rounds_contributed=0, examples_contributed=0))
            result = conn.execute(updates.insert().values(
                round=round, fingerprint=fingerprint, update_digest=update_digest, outcome=outcome,
                reason=reason, message=message[:2000], examples=int(examples),
                train_loss=_finite(train_loss), bytes=int(nbytes), received=received or utc_now()))
            return int(result.inserted_primary_key[0])

    def reject_admitted(self, round: int, update_digest: str, reason: str, message: str = "") -> None:
        """Turn an admitted update of an open round into a rejection (e.g. refused by a robust
        rule at aggregation time), before the round closes and credits contributors."""
        if not reason:
            raise StoreError("a rejected update needs a reason code")
        with self._write() as conn:
            row = _round(conn, round)
            if row is None or row["status"] != "open":
                raise StoreError(f"round {round} is not open; its updates can no longer change")
            changed = conn.execute(updates.update().where(
                updates.c.round == round, updates.c.update_digest == update_digest,
                updates.c.outcome == "admitted").values(outcome="rejected", reason=reason,
                                                        message=message[:2000])).rowcount
            if not changed:
                raise StoreError(f"round {round} has no admitted update {str(update_digest)[:16]}")

    def annotate_admitted(self, round: int, update_digest: str, reason: str, note: str) -> None:
        """Mark an admitted update of an open round as neutralized (e.g. clipped) without rejecting it:
        `reason` is a short code, `note` is appended to its message."""
        with self._write() as conn:
            row = _round(conn, round)
            if row is None or row["status"] != "open":
                raise StoreError(f"round {round} is not open; its updates can no longer change")
            found = conn.execute(select(updates.c.id, updates.c.message).where(
                updates.c.round == round, updates.c.update_digest == update_digest,
                updates.c.outcome == "admitted")).first()
            if found is None:
                raise StoreError(f"round {round} has no admitted update {str(update_digest)[:16]}")
            message = f"{found.message}; {note}" if found.message else note
            conn.execute(updates.update().where(updates.c.id == found.id)
                         .values(reason=reason, message=message[:2000]))

    def has_admitted(self, round: int, fingerprint: str) -> bool:
        """Whether this key already has an admitted update in the round (one per key per round)."""
        with self._read() as conn:
            return conn.execute(select(func.count()).select_from(updates).where(
                updates.c.round == round, updates.c.fingerprint == fingerprint,
                updates.c.outcome == "admitted")).scalar() > 0

    def round_updates(self, round: int) -> list[dict]:
        with self._read() as conn:
            rows = conn.execute(select(updates).where(updates.c.round == round)
                                .order_by(updates.c.id)).mappings()
            return [dict(r) for r in rows]

    def close_round(self, round: int, status: str, *, eval_loss: float | None = None, note: str = "",
                    adapter_digest: str | None = None, train_loss: float | None = None) -> dict:
        """Close a round; idempotent when it is already closed with the same status.

        Counts come from the recorded updates. For an `aggregated` round each admitted key is
        credited once (rounds and examples) in the same transaction that closes the round, so
        a crash can neither lose nor double the credit. `train_loss` defaults to the
        example-weighted mean over admitted updates.
        """
        if status not in ROUND_STATUSES or status == "open":
            raise StoreError(f"a round closes as aggregated, skipped or failed, not {status!r}")
        with self._write() as conn:
            row = _round(conn, round)
            if row is None:
                raise StoreError(f"round {round} was never opened")
            if row["status"] != "open":
                if row["status"] == status:
                    return dict(row)
                raise StoreError(f"round {round} is already closed as {row['status']}, not {status}")
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
            return dict(_round(conn, round))

    def round(self, round: int) -> dict | None:
        with self._read() as conn:
            row = _round(conn, round)
            return dict(row) if row is not None else None

    def rounds(self) -> list[dict]:
        with self._read() as conn:
            return [dict(r) for r in conn.execute(select(rounds).order_by(rounds.c.round)).mappings()]

    def current_round(self) -> dict | None:
        """The round left open (by a crash, or still running), if any."""
        with self._read() as conn:
            row = conn.execute(select(rounds).where(rounds.c.status == "open")
                               .order_by(rounds.c.round.desc()).limit(1)).mappings().first()
            return dict(row) if row is not None else None

    def last_closed_round(self) -> int:
        """Number of the last round closed in any way (0 before the first); the next is this + 1."""
        with self._read() as conn:
            return conn.execute(select(func.max(rounds.c.round))
                                .where(rounds.c.status != "open")).scalar() or 0

    def last_aggregated_round(self) -> dict | None:
        """The last round that produced a new global adapter (its blob in `adapter_digest`)."""
        with self._read() as conn:
            row = conn.execute(select(rounds).where(rounds.c.status == "aggregated")
                               .order_by(rounds.c.round.desc()).limit(1)).mappings().first()
            return dict(row) if row is not None else None

    def unreleased_aggregate(self) -> dict | None:
        """The last aggregated round when it is newer than the latest release, else None.

        After a crash between closing a round and publishing it, resume publishes this.
        """
        last = self.last_aggregated_round()
        latest = self.latest_release()
        if last is None or (latest is not None and latest["round"] >= last["round"]):
            return None
        return last

    # -- releases ---------------------------------------------------------

    def add_release(self, version: int, round: int, manifest_digest: str, *, created: str, path: str,
                    adapter_digest: str | None = None) -> dict:
        """Record a published release. Versions are consecutive from 1; recording the same
        release twice is a no-op, a different release under a taken version an error."""
        with self._write() as conn:
            existing = conn.execute(select(releases).where(releases.c.version == version)).mappings().first()
            if existing is not None:
                if existing["manifest_digest"] == manifest_digest:
                    return dict(existing)
                raise StoreError(f"release version {version} is already recorded with another manifest")
            latest = conn.execute(select(func.max(releases.c.version))).scalar() or 0
            if version != latest + 1:
                raise StoreError(f"release version {version} does not follow the latest version {latest}")
            conn.execute(releases.insert().values(
                version=version, round=round, manifest_digest=manifest_digest,
                adapter_digest=adapter_digest, created=created, path=path))
            return dict(conn.execute(select(releases).where(releases.c.version == version)).mappings().one())

    def next_release_version(self) -> int:
        latest = self.latest_release()
        return latest["version"] + 1 if latest is not None else 1

    def latest_release(self) -> dict | None:
        with self._read() as conn:
            row = _latest_release(conn)
            return dict(row) if row is not None else None

    def release(self, version: int) -> dict | None:
        with self._read() as conn:
            row = conn.execute(select(releases).where(releases.c.version == version)).mappings().first()
            return dict(row) if row is not None else None

    def releases(self) -> list[dict]:
        with self._read() as conn:
            return [dict(r) for r in conn.execute(select(releases).order_by(releases.c.version)).mappings()]

    # -- summary ----------------------------------------------------------

    def status(self) -> dict:
        """Everything `coordinator status --json` prints."""
        with self._read() as conn:
            by_status = dict(conn.execute(select(rounds.c.status, func.count())
                                          .group_by(rounds.c.status)).all())
            last_closed = conn.execute(select(func.max(rounds.c.round))
                                       .where(rounds.c.status != "open")).scalar() or 0
            open_row = conn.execute(select(rounds.c.round).where(rounds.c.status == "open")
                                    .order_by(rounds.c.round.desc())).scalar()
            v = volunteers.c
            counts = conn.execute(select(
                func.count(), func.count().filter(v.registered), func.count().filter(v.banned),
                func.count().filter(v.rounds_contributed > 0))).one()
            outcomes = dict(conn.execute(select(updates.c.outcome, func.count())
                                         .group_by(updates.c.outcome)).all())
            reasons = dict(conn.execute(select(updates.c.reason, func.count())
                                        .where(updates.c.outcome == "rejected")
                                        .group_by(updates.c.reason).order_by(updates.c.reason)).all())
            latest = _latest_release(conn)
            recent = conn.execute(select(rounds).order_by(rounds.c.round.desc()).limit(10)).mappings().all()
            u = updates.c
            recent_updates = conn.execute(
                select(u.round, u.fingerprint, u.outcome, u.reason, u.message, u.examples, u.update_digest)
                .order_by(u.id.desc()).limit(RECENT_UPDATES)).mappings().all()
        return {
            "rounds": {"total": sum(by_status.values()), "last_closed": last_closed, "open": open_row,
                       "by_status": {s: by_status.get(s, 0) for s in ROUND_STATUSES}},
            "volunteers": {"known": counts[0], "registered": counts[1], "banned": counts[2],
                           "contributed": counts[3]},
            "updates": {"admitted": outcomes.get("admitted", 0), "rejected": outcomes.get("rejected", 0),
                        "rejected_by_reason": reasons},
            "latest_release": dict(latest) if latest is not None else None,
            "recent_rounds": [_round_summary(r) for r in reversed(recent)],
            # Each update's outcome and reason ("clipped" or "weight_capped" on an admitted one
            # that a rule neutralized), oldest first.
            "recent_updates": [dict(r) for r in reversed(recent_updates)],
        }


def _round_summary(row: Mapping) -> dict:
    keys = ("round", "status", "started", "closed", "sampled", "admitted", "rejected", "train_loss",
            "eval_loss", "note")
    return {k: row[k] for k in keys}


def _on_connect(dbapi_conn: Any, _record: Any) -> None:
    # SQLAlchemy emits BEGIN itself (see _on_begin); the driver must not open transactions.
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _on_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("lc_immediate") else "BEGIN")


def _normalize(fingerprint: str) -> str:
    text = str(fingerprint).strip().lower().replace("-", "").replace(":", "")
    if text.startswith("sha256"):
        raise StoreError("give the hex fingerprint (`loracommons identity show`), not the SHA256: form")
    if not text or not re.fullmatch(r"[0-9a-f]{1,64}", text):
        raise StoreError(f"{str(fingerprint)[:80]!r} is not a hex fingerprint")
    return text


def _volunteer(conn: Connection, fingerprint: str) -> Mapping | None:
    return conn.execute(select(volunteers).where(volunteers.c.fingerprint == fingerprint)).mappings().first()


def _latest_release(conn: Connection) -> Mapping | None:
    return conn.execute(select(releases).order_by(releases.c.version.desc()).limit(1)).mappings().first()


def _round(conn: Connection, number: int) -> Mapping | None:
    return conn.execute(select(rounds).where(rounds.c.round == number)).mappings().first()


def _resolve(conn: Connection, fingerprint_or_prefix: str) -> str:
    want = _normalize(fingerprint_or_prefix)
    if len(want) < 4:
        raise StoreError(f"fingerprint prefix {want!r} is too short; give at least 4 hex digits")
    matches = conn.execute(select(volunteers.c.fingerprint)
                           .where(volunteers.c.fingerprint.startswith(want, autoescape=True))
                           .limit(3)).scalars().all()
    if not matches:
        raise StoreError(f"no known volunteer has a fingerprint starting with {want}")
    if len(matches) > 1:
        shown = ", ".join(fingerprint_display(m) for m in matches[:2])
        raise StoreError(f"fingerprint prefix {want} is ambiguous ({shown}, ...); give more digits")
    return matches[0]


def new_nonce() -> str:
    """A fresh random round nonce."""
    return secrets.token_hex(16)
