"""Read queries on one open connection, each returning the records of `rows.py`.

`Store` runs them inside its transactions, so that a write can read and change state
atomically and `status` sees one consistent snapshot.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, func, select

from loracommons.coordinator.blobs import StoreError
from loracommons.coordinator.rows import (
    ROUND_STATUSES,
    Contribution,
    ReleaseRow,
    RoundCounts,
    RoundRow,
    StoreStatus,
    UpdateCounts,
    VolunteerCounts,
    VolunteerRow,
    release_row,
    round_row,
    update_row,
    volunteer_row,
)
from loracommons.coordinator.schema import releases, rounds, updates, volunteers
from loracommons.protocol.identity import fingerprint_display

RECENT_ROUNDS = 10  # rounds listed by `status()`
RECENT_UPDATES = 200  # updates listed by `status()`


def volunteer(conn: Connection, fingerprint: str) -> VolunteerRow | None:
    row = conn.execute(select(volunteers).where(volunteers.c.fingerprint == fingerprint)).mappings().first()
    return volunteer_row(row) if row is not None else None


def latest_release(conn: Connection) -> ReleaseRow | None:
    row = conn.execute(select(releases).order_by(releases.c.version.desc()).limit(1)).mappings().first()
    return release_row(row) if row is not None else None


def round_by_number(conn: Connection, number: int) -> RoundRow | None:
    row = conn.execute(select(rounds).where(rounds.c.round == number)).mappings().first()
    return round_row(row) if row is not None else None


def status(conn: Connection) -> StoreStatus:
    """Counts by state, the latest release and the most recent rounds and updates."""
    by_status = _counts(conn.execute(select(rounds.c.status, func.count()).group_by(rounds.c.status)))
    open_row = conn.execute(select(rounds.c.round).where(rounds.c.status == "open")
                            .order_by(rounds.c.round.desc())).scalar()
    v = volunteers.c
    known, registered, banned, contributed = conn.execute(select(
        func.count(), func.count().filter(v.registered), func.count().filter(v.banned),
        func.count().filter(v.rounds_contributed > 0))).one()
    u = updates.c
    outcomes = _counts(conn.execute(select(u.outcome, func.count()).group_by(u.outcome)))
    reasons = _counts(conn.execute(select(u.reason, func.count()).where(u.outcome == "rejected")
                                   .group_by(u.reason).order_by(u.reason)))
    recent = conn.execute(select(rounds).order_by(rounds.c.round.desc())
                          .limit(RECENT_ROUNDS)).mappings().all()
    recent_updates = conn.execute(select(updates).order_by(u.id.desc())
                                  .limit(RECENT_UPDATES)).mappings().all()
    return StoreStatus(
        rounds=RoundCounts(total=sum(by_status.values()), last_closed=last_closed(conn), open=open_row,
                           by_status={s: by_status.get(s, 0) for s in ROUND_STATUSES}),
        volunteers=VolunteerCounts(known=known, registered=registered, banned=banned,
                                   contributed=contributed),
        updates=UpdateCounts(admitted=outcomes.get("admitted", 0), rejected=outcomes.get("rejected", 0),
                             rejected_by_reason=reasons),
        latest_release=latest_release(conn),
        recent_rounds=tuple(round_row(r) for r in reversed(recent)),
        recent_updates=tuple(update_row(r) for r in reversed(recent_updates)),
    )


def volunteers_admitted(conn: Connection, through_round: int) -> int:
    """Distinct keys with an admitted update in an aggregated round up to `through_round`."""
    u = updates.c
    r = rounds.c
    aggregated = select(r.round).where(r.status == "aggregated", r.round <= through_round)
    return int(conn.execute(select(func.count(func.distinct(u.fingerprint))).where(
        u.outcome == "admitted", u.fingerprint.is_not(None), u.round.in_(aggregated))).scalar() or 0)


def contributions(conn: Connection, limit: int) -> list[Contribution]:
    """Every key that sent an update (banned keys left out), most admitted updates first."""
    u, v = updates.c, volunteers.c
    admitted = func.count().filter(u.outcome == "admitted")
    examples = func.coalesce(func.sum(u.examples).filter(u.outcome == "admitted"), 0)
    rows = conn.execute(
        select(u.fingerprint, v.display_name, admitted, func.count().filter(u.outcome == "rejected"),
               examples, func.max(u.received), func.min(u.received),
               func.avg(u.staleness).filter(u.outcome == "admitted"))
        .join(volunteers, v.fingerprint == u.fingerprint).where(~v.banned)
        .group_by(u.fingerprint, v.display_name)
        .order_by(admitted.desc(), examples.desc(), func.max(u.received).desc(), u.fingerprint)
        .limit(limit)).all()
    reasons: dict[str, dict[str, int]] = {}
    for fingerprint, reason, n in conn.execute(
            select(u.fingerprint, u.reason, func.count()).where(
                u.outcome == "rejected", u.fingerprint.in_([r[0] for r in rows]))
            .group_by(u.fingerprint, u.reason).order_by(u.reason)):
        reasons.setdefault(fingerprint, {})[reason] = int(n)
    return [Contribution(fingerprint=fp, display_name=name, admitted=int(a), rejected=int(r),
                         examples=int(ex), last_seen=seen, rejected_by_reason=reasons.get(fp, {}),
                         first_seen=first, mean_staleness=None if stale is None else float(stale))
            for fp, name, a, r, ex, seen, first, stale in rows]


def rejections_by_round(conn: Connection, first_round: int = 1) -> dict[int, dict[str, int]]:
    """Round -> {reason code: rejected updates}, for rounds from `first_round` with a rejection."""
    u = updates.c
    out: dict[int, dict[str, int]] = {}
    for number, reason, n in conn.execute(
            select(u.round, u.reason, func.count()).where(u.outcome == "rejected", u.round >= first_round)
            .group_by(u.round, u.reason).order_by(u.round, u.reason)):
        out.setdefault(int(number), {})[str(reason)] = int(n)
    return out


def _counts(rows: Iterable[Sequence[Any]]) -> dict[str, int]:
    """`SELECT key, count(*) ... GROUP BY key` as a dict."""
    return {str(row[0]): int(row[1]) for row in rows}


def last_closed(conn: Connection) -> int:
    return conn.execute(select(func.max(rounds.c.round)).where(rounds.c.status != "open")).scalar() or 0


def normalize_fingerprint(fingerprint: str) -> str:
    """Lowercase hex without separators, or StoreError (a fingerprint or its prefix)."""
    text = str(fingerprint).strip().lower().replace("-", "").replace(":", "")
    if text.startswith("sha256"):
        raise StoreError("give the hex fingerprint (`loracommons identity show`), not the SHA256: form")
    if not text or not re.fullmatch(r"[0-9a-f]{1,64}", text):
        raise StoreError(f"{str(fingerprint)[:80]!r} is not a hex fingerprint")
    return text


def resolve_fingerprint(conn: Connection, fingerprint_or_prefix: str) -> str:
    """A known volunteer's full fingerprint from a unique prefix of at least 4 hex digits."""
    want = normalize_fingerprint(fingerprint_or_prefix)
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
