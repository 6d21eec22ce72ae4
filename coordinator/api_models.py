"""The JSON bodies of the coordinator's HTTP API (pydantic: they also make the OpenAPI schema).

The dashboard renders the same bodies (`from_store`), so the page shows what the API serves.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from loracommons.coordinator.rows import Contribution, RoundRow
from loracommons.coordinator.store import Store
from loracommons.protocol.identity import fingerprint_display


class ProjectOut(BaseModel):
    id: str
    name: str
    base_model: str
    base_model_revision: str = ""
    mode: str | None = None
    membership: str | None = None
    public_key: str | None = None  # the coordinator's release key, OpenSSH
    fingerprint: str | None = None  # of that key: what downloaders pin
    fleet_address: str | None = None
    latest_version: int | None = None


class ReleaseOut(BaseModel):
    version: int
    round: int
    created: str
    manifest_digest: str
    metrics: dict[str, Any]


class ReleaseDocument(BaseModel):
    """`release.json`: the canonical manifest text and its base64 Ed25519 signature."""

    manifest: str
    signature: str


class RoundOut(BaseModel):
    round: int
    status: str
    started: str
    closed: str | None
    base_version: int
    sampled: int
    admitted: int
    rejected: int
    train_loss: float | None
    eval_loss: float | None  # federated: robust median of the volunteers' held-out loss on the base adapter
    note: str
    rejected_by_reason: dict[str, int] = {}  # reason code (protocol.errors.Reason) -> updates

    @classmethod
    def from_row(cls, row: RoundRow, reasons: dict[str, int]) -> RoundOut:
        fields = {k: getattr(row, k) for k in cls.model_fields if k != "rejected_by_reason"}
        return cls(**fields, rejected_by_reason=reasons)

    @classmethod
    def all_from_store(cls, store: Store) -> list[RoundOut]:
        reasons = store.rejections_by_round()
        return [cls.from_row(r, reasons.get(r.round, {})) for r in store.rounds()]


class VolunteerOut(BaseModel):
    fingerprint: str  # short display form of the key's fingerprint
    display_name: str | None
    rounds_contributed: int
    examples_contributed: int


class ContributionOut(BaseModel):
    """One key's updates: admitted, rejected (by reason), examples admitted, last update received."""

    fingerprint: str  # short display form
    display_name: str | None
    admitted: int
    rejected: int
    examples: int
    last_seen: str
    rejected_by_reason: dict[str, int]
    mean_staleness: float | None = None  # async: versions behind, on average, of its admitted updates
    updates_per_hour: float | None = None  # throughput: admitted updates per hour since its first

    @classmethod
    def from_row(cls, c: Contribution) -> ContributionOut:
        return cls(fingerprint=c.short, display_name=c.display_name, admitted=c.admitted, rejected=c.rejected,
                   examples=c.examples, last_seen=c.last_seen, rejected_by_reason=c.rejected_by_reason,
                   mean_staleness=c.mean_staleness, updates_per_hour=c.updates_per_hour)


class ReplyOut(BaseModel):
    fingerprint: str | None  # short display form; None when the reply did not parse
    outcome: str
    reason: str
    examples: int
    received: str
    staleness: int | None = None  # async: versions closed since the update's base


class OpenRoundOut(BaseModel):
    """The round in progress: how many volunteers were sent the task and who has replied so far."""

    round: int
    started: str
    base_version: int
    sampled: int
    replied: int
    admitted: int
    rejected: int
    waiting: int  # sampled volunteers not heard from yet (still training or gone)
    replies: list[ReplyOut]

    @classmethod
    def from_store(cls, store: Store) -> OpenRoundOut | None:
        row = store.current_round()
        if row is None:
            return None
        replies = [ReplyOut(fingerprint=fingerprint_display(u.fingerprint) if u.fingerprint else None,
                            outcome=u.outcome, reason=u.reason, examples=u.examples, received=u.received,
                            staleness=u.staleness)
                   for u in store.round_updates(row.round)]
        admitted = sum(r.outcome == "admitted" for r in replies)
        senders = {r.fingerprint for r in replies if r.fingerprint}
        return cls(round=row.round, started=row.started, base_version=row.base_version, sampled=row.sampled,
                   replied=len(replies), admitted=admitted, rejected=len(replies) - admitted,
                   waiting=max(row.sampled - len(senders), 0), replies=replies)


class Health(BaseModel):
    status: str
