"""One round on the coordinator side, without Flower and without the state store.

`Round` is everything `Coordinator.run_round` does between sending the task and writing
the outcome: admit each envelope, count its claimed examples only up to the project's
cap, fold (or hold) the accepted ones in `RoundAggregator`, and at `close` apply the
round's rules. It answers with frozen records: what the store must keep, what the
volunteer's note says. It never raises for a peer's bytes. Transport (Flower messages,
timeouts, late replies), the store, events and publishing stay with the caller, so the
benches and tests drive the same round the coordinator runs.

    rnd = Round(cfg, r, nonce, tensors, digest, banned=..., allowlist=..., spill_dir=...)
    ... send rnd.task_bytes and the adapter; for each reply:
    record = rnd.offer(Envelope(*read_envelope(content, rnd.max_payload_bytes)))
    result = rnd.close()   # new tensors or None with the reason, rejections, clip annotations
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loracommons.coordinator.admission import Verdict, admit, context_for, expected_for
from loracommons.coordinator.aggregation import Rejection, RoundAggregator
from loracommons.coordinator.config import ProjectConfig
from loracommons.protocol.envelope import Envelope
from loracommons.protocol.errors import Reason

log = logging.getLogger(__name__)

LOSS_CEILING = 100.0
"""Highest loss per token a claim counts as (nats; a uniform guess over a 150k vocabulary is ~12)."""


def robust_loss(claims: Iterable[float | None]) -> float | None:
    """The round's figure from what volunteers claim: each claim clamped to [0, LOSS_CEILING], then
    the median, so that no single volunteer among honest ones sets it (None without a claim)."""
    values = [min(max(v, 0.0), LOSS_CEILING) for v in claims if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


@dataclass(frozen=True)
class UpdateRecord:
    """The outcome of one offered envelope: one row of the store, one volunteer note."""

    accepted: bool
    reason: str
    """The outcome code (a `Reason`): "accepted" or why it was refused; the note and events say this."""
    message: str
    update_digest: str | None = None
    signer: str | None = None  # fingerprint, once the signature verified
    public_key: str | None = None  # the manifest's signer key, for the store's volunteer row
    examples: int = 0  # claimed examples, counted only up to `[aggregation] max_examples_weight`
    capped: bool = False  # the claim was above the cap (the message says so)
    train_loss: float | None = None
    eval_loss: float | None = None  # the signer's loss of the round's starting adapter on its held-out data
    nbytes: int = 0  # payload bytes as received
    delta_norm: float | None = None
    weight: float = 0.0  # weight in the round's mean (0 when refused)
    staleness: int | None = None  # async: versions closed since the update's base (None under sync)

    @property
    def outcome(self) -> str:
        return "admitted" if self.accepted else "rejected"

    @property
    def store_reason(self) -> str:
        """The store's reason column: empty for a plain admission, `weight_capped` for a capped one."""
        if not self.accepted:
            return self.reason
        return Reason.WEIGHT_CAPPED if self.capped else ""

    def store_fields(self) -> dict:
        """Keyword arguments of `Store.record_update` after (round, signer, outcome)."""
        return {
            "reason": self.store_reason,
            "message": self.message,
            "update_digest": self.update_digest,
            "examples": self.examples,
            "train_loss": self.train_loss,
            "nbytes": self.nbytes,
            "public_key": self.public_key,
            "staleness": self.staleness,
        }

    def note(self, round: int) -> dict:
        """What the volunteer is told about this update with its next task."""
        return {
            "round": round,
            "outcome": self.outcome,
            "reason": str(self.reason),
            "digest": (self.update_digest or "")[:16],
        }

    @classmethod
    def failed(cls, reason: str, message: str) -> UpdateRecord:
        """A reply that carried no envelope to admit (an error reply, unreadable records)."""
        return cls(False, reason, message)


@dataclass(frozen=True)
class Annotation:
    """An update aggregated but neutralized (clipped): recorded so that status shows which and why."""

    update_digest: str
    reason: str
    message: str


@dataclass(frozen=True)
class RoundResult:
    """What `Round.close` decided; the store writes it, the coordinator publishes `tensors`."""

    tensors: dict[str, np.ndarray] | None  # the new global adapter; None = keep the previous version
    reason: str  # why tensors is None ("too_few"), else ""
    message: str
    aggregated: tuple[str, ...]  # update digests folded in
    rejected: tuple[Rejection, ...]  # admitted updates the rules refused at the end
    annotations: tuple[Annotation, ...]  # aggregated updates scaled down to the clip bound
    clip_bound: float | None  # the bound they were scaled to (None when nothing was clipped)
    metrics: dict[str, float] = field(default_factory=dict)
    train_loss: float | None = None  # `robust_loss` of the claims of the updates kept
    eval_loss: float | None = None  # `robust_loss` of their evaluations of the round's starting adapter

    @property
    def status(self) -> str:
        return "skipped" if self.tensors is None else "aggregated"

    @property
    def note(self) -> str:
        """The round's note in the store: why it was skipped, or its metrics."""
        if self.tensors is None:
            return self.message
        return ", ".join(f"{k}={v:.4g}" for k, v in sorted(self.metrics.items()))


class Round:
    """One round: `offer` every envelope as it arrives, then `close` once."""

    one_per_signer = True
    """At most one admitted update per key (the async buffer allows one per task instead)."""

    def __init__(
        self,
        cfg: ProjectConfig,
        number: int,
        nonce: str,
        global_tensors: Mapping[str, np.ndarray],
        global_digest: str,
        *,
        allowlist: Collection[str] = frozenset(),
        banned: Collection[str] = frozenset(),
        spill_dir: str | Path | None = None,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.cfg, self.number, self.nonce = cfg, number, nonce
        self.task = cfg.task(number, nonce, global_digest)
        self.task_bytes = self.task.to_bytes()
        self.expected = expected_for(cfg, number, nonce, global_tensors, global_digest)
        self._admitted: set[str] = set()
        self._ctx = context_for(
            cfg, self.expected, global_tensors, allowlist=allowlist, banned=banned, admitted=self._admitted
        )
        if spill_dir is not None:
            Path(spill_dir).mkdir(parents=True, exist_ok=True)
        self.aggregator = RoundAggregator(cfg, global_tensors, spill_dir=spill_dir, rng=rng,
                                          one_per_signer=self.one_per_signer)
        self._claims: dict[str, tuple[float, float | None]] = {}  # digest -> (train, eval) of accepted
        self._closed = False

    @property
    def max_payload_bytes(self) -> int:
        """The largest payload this round reads (unpack replies no further than this)."""
        return self.expected.max_payload_bytes

    @property
    def buffers(self) -> bool:
        """Whether the round's rules hold every update until `close`."""
        return self.aggregator.buffers

    def offer(self, envelope: Envelope) -> UpdateRecord:
        """Admit one envelope and fold (or hold) it when accepted. Never raises for its bytes."""
        if self._closed:
            raise RuntimeError(f"round {self.number} is closed")
        try:
            return self._offer(envelope)
        except Exception as exc:  # a bug must not end the round for everyone else
            log.exception("handling an update of round %d failed", self.number)
            return UpdateRecord.failed(Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"[:500])

    def _offer(self, envelope: Envelope) -> UpdateRecord:
        verdict = admit(envelope, self._ctx)
        manifest = verdict.manifest
        message, examples = verdict.message, manifest.examples if manifest else 0
        cap = self.cfg.aggregation.max_examples_weight
        capped = examples > cap
        if capped:  # the claim buys no weight, credit or say in the round's train loss
            message, examples = f"{message}; claims {examples} examples, counted as {cap}", cap
        weight = 0.0
        if verdict.accepted:
            assert verdict.signer is not None and manifest is not None  # an accepted verdict has both
            self._admitted.add(verdict.signer)
            prepared = self._prepared(verdict)
            self.aggregator.offer(prepared)
            weight = self.aggregator.weight(manifest.examples) * prepared.weight_factor
            self._claims[verdict.update_digest] = (manifest.train_loss, manifest.eval_loss)
        payload = envelope.payload
        return UpdateRecord(
            accepted=verdict.accepted,
            reason=verdict.reason,
            message=message,
            update_digest=verdict.update_digest,
            signer=verdict.signer,
            public_key=manifest.signer if manifest else None,
            examples=examples,
            capped=capped,
            train_loss=manifest.train_loss if manifest else None,
            eval_loss=manifest.eval_loss if manifest else None,
            nbytes=len(payload) if isinstance(payload, bytes) else 0,
            delta_norm=verdict.delta_norm,
            weight=weight,
        )

    def _prepared(self, verdict: Verdict) -> Verdict:
        """The accepted verdict as the aggregator folds it (the async buffer rebases stale ones)."""
        return verdict

    def close(self) -> RoundResult:
        """Apply the round's rules and aggregate; the held updates are released."""
        if self._closed:
            raise RuntimeError(f"round {self.number} is already closed")
        self._closed = True
        outcome = self.aggregator.finish()
        clipped = {d: s for d, s in outcome.clip_scales.items() if s < 1}
        bound = outcome.metrics.get("clip_bound", self.cfg.privacy.clip_norm) if clipped else None
        annotations = tuple(
            Annotation(d, Reason.CLIPPED, f"delta scaled by {s:.3g} to the clip bound {bound:.4g}")
            for d, s in clipped.items()
        )
        refused = {rejection.update_digest for rejection in outcome.rejected}
        kept = [claim for digest, claim in self._claims.items() if digest not in refused]
        return RoundResult(
            tensors=outcome.tensors,
            reason=outcome.reason,
            message=outcome.message,
            aggregated=outcome.aggregated,
            rejected=outcome.rejected,
            annotations=annotations,
            clip_bound=bound,
            metrics=dict(outcome.metrics),
            train_loss=robust_loss(train for train, _ in kept),
            eval_loss=robust_loss(evaluation for _, evaluation in kept),
        )
