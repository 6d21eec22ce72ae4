"""What the store returns: one frozen record per table row, and the `status` summary.

Records are plain values read in one transaction; changing state goes through `Store`.
`StoreStatus.to_json()` is what `coordinator status --json` prints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from loracommons.protocol.identity import fingerprint_display

ROUND_STATUSES = ("open", "aggregated", "skipped", "failed")
OUTCOMES = ("admitted", "rejected")


def utc_now() -> str:
    """The current time as ISO 8601 UTC to the second, as every row stores it."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class VolunteerRow:
    fingerprint: str  # 64 hex digits
    public_key: str | None  # OpenSSH; None for a key banned before it was seen
    display_name: str | None
    registered: bool
    banned: bool
    first_seen: str
    rounds_contributed: int
    examples_contributed: int

    @property
    def short(self) -> str:
        """The fingerprint's short display form (`3f2a-91bc-0d44-e7a1`)."""
        return fingerprint_display(self.fingerprint)


@dataclass(frozen=True)
class RoundRow:
    round: int
    started: str
    closed: str | None
    status: str  # one of ROUND_STATUSES
    nonce: str
    base_version: int
    base_adapter_digest: str | None
    adapter_digest: str | None  # blob of the adapter this round produced
    sampled: int
    admitted: int
    rejected: int
    train_loss: float | None
    eval_loss: float | None
    note: str


@dataclass(frozen=True)
class UpdateRow:
    id: int
    round: int
    fingerprint: str | None  # None when the reply did not parse
    update_digest: str | None
    outcome: str  # one of OUTCOMES
    reason: str  # a protocol.errors.Reason code, "" for a plain admission
    message: str
    examples: int
    train_loss: float | None
    nbytes: int
    received: str
    staleness: int | None = None  # async: versions closed since its base
    envelope_digest: str | None = None  # async: its envelope's blob while its version is open


@dataclass(frozen=True)
class TaskRow:
    """An async task: what a reply naming `nonce` (and `serial` as its round) trained from."""

    nonce: str
    serial: int
    version: int
    base_version: int
    base_adapter_digest: str
    node_id: int
    sent: str
    status: str  # sent, used, expired
    update_digest: str | None


@dataclass(frozen=True)
class ReleaseRow:
    version: int
    round: int
    manifest_digest: str
    adapter_digest: str | None
    created: str
    path: str  # relative to the project folder


@dataclass(frozen=True)
class Contribution:
    """One key's record from its updates: what it sent and what became of it (the dashboard's row)."""

    fingerprint: str
    display_name: str | None
    admitted: int  # updates admitted, in any round
    rejected: int
    examples: int  # examples of its admitted updates
    last_seen: str  # when its latest update arrived
    rejected_by_reason: dict[str, int]  # reason code -> count, sorted by code
    first_seen: str = ""  # when its first update arrived
    mean_staleness: float | None = None  # async: mean staleness of its admitted updates

    @property
    def short(self) -> str:
        return fingerprint_display(self.fingerprint)

    @property
    def updates_per_hour(self) -> float | None:
        """Throughput: admitted updates per hour between its first and its latest update (None
        until they are a minute apart)."""
        try:
            span = (datetime.fromisoformat(self.last_seen.replace("Z", "+00:00"))
                    - datetime.fromisoformat(self.first_seen.replace("Z", "+00:00"))).total_seconds()
        except ValueError:
            return None
        return self.admitted * 3600.0 / span if span >= 60 else None


def volunteer_row(row: Mapping[Any, Any]) -> VolunteerRow:
    return VolunteerRow(**row)


def round_row(row: Mapping[Any, Any]) -> RoundRow:
    return RoundRow(**row)


def release_row(row: Mapping[Any, Any]) -> ReleaseRow:
    return ReleaseRow(**row)


def update_row(row: Mapping[Any, Any]) -> UpdateRow:
    values = dict(row)
    values["nbytes"] = values.pop("bytes")
    return UpdateRow(**values)


@dataclass(frozen=True)
class RoundCounts:
    total: int
    last_closed: int  # 0 before the first round closes
    open: int | None  # the round left open, if any
    by_status: dict[str, int]  # every status of ROUND_STATUSES


@dataclass(frozen=True)
class VolunteerCounts:
    known: int
    registered: int
    banned: int
    contributed: int


@dataclass(frozen=True)
class UpdateCounts:
    admitted: int
    rejected: int
    rejected_by_reason: dict[str, int]  # reason code -> count, sorted by code


_RECENT_ROUND_KEYS = ("round", "status", "started", "closed", "sampled", "admitted", "rejected",
                      "train_loss", "eval_loss", "note")
_RECENT_UPDATE_KEYS = ("round", "fingerprint", "outcome", "reason", "message", "examples", "update_digest",
                       "staleness")


@dataclass(frozen=True)
class StoreStatus:
    """Everything `coordinator status` shows."""

    rounds: RoundCounts
    volunteers: VolunteerCounts
    updates: UpdateCounts
    latest_release: ReleaseRow | None
    recent_rounds: tuple[RoundRow, ...]  # oldest first
    # Each update's outcome and reason (Reason.CLIPPED or Reason.WEIGHT_CAPPED on an admitted one
    # that a rule neutralized), oldest first.
    recent_updates: tuple[UpdateRow, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "rounds": asdict(self.rounds),
            "volunteers": asdict(self.volunteers),
            "updates": asdict(self.updates),
            "latest_release": asdict(self.latest_release) if self.latest_release is not None else None,
            "recent_rounds": [{k: getattr(r, k) for k in _RECENT_ROUND_KEYS} for r in self.recent_rounds],
            "recent_updates": [{k: getattr(u, k) for k in _RECENT_UPDATE_KEYS} for u in self.recent_updates],
        }
