"""Admission: decide, before touching a number, whether one update envelope may be aggregated.

Checks run cheapest first and stop at the first failure:

    size -> manifest + signature -> signer allowed (bans, allowlist, one per round)
    -> project, round, nonce, base adapter, base model, LoRA config -> dtype, examples
    -> declared rank -> payload digest -> tensor names/shapes/dtypes -> finite values
    -> delta norm bound

Nested ranks (ffa): a manifest may declare the rank r_i it trained (absent: the project's r).
It must be 1 <= r_i <= r (else `bad_rank`); below r only where the mode and every configured rule
fold smaller ranks (else `rank_not_supported`); and the payload must hold exactly r_i columns of
each B (else `rank_mismatch`): the window of the update's signed round and signer
(`protocol.lora.window_start`). Its delta norm is taken against those columns of the global.

`admit` is pure and never raises for a peer's bytes: every failure is a `Verdict`
with a stable reason code (`protocol.errors.Reason`; REASONS below are those admission adds).
Signature comes before the signer checks so that a forged manifest naming someone
else's key is recorded as a bad signature, not against that key.

    ctx = AdmissionContext(expected, mode, global_tensors, admitted=admitted_this_round)
    verdict = admit(envelope, ctx)
    if verdict.accepted: admitted_this_round.add(verdict.signer)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import wait
from dataclasses import dataclass, replace

import numpy as np

from loracommons.coordinator import background, rules
from loracommons.coordinator.config import ProjectConfig
from loracommons.coordinator.robust import delta_norm
from loracommons.protocol import modes
from loracommons.protocol.codec import TensorSpec, decode_tensors
from loracommons.protocol.envelope import (
    MAX_MANIFEST_BYTES,
    Envelope,
    Expected,
    UpdateManifest,
    check_claims,
    check_payload,
    open_envelope,
)
from loracommons.protocol.errors import BadTensor, NonFinite, ProtocolError, Reason
from loracommons.protocol.lora import take_window, window_start

log = logging.getLogger(__name__)

#: Reason codes admission adds to those of protocol.errors' exceptions, with their docs.
REASONS = {
    r.value: r.doc
    for r in (
        Reason.ACCEPTED,
        Reason.BANNED,
        Reason.NOT_REGISTERED,
        Reason.DUPLICATE_SIGNER,
        Reason.WRONG_DTYPE,
        Reason.NO_EXAMPLES,
        Reason.NORM_TOO_LARGE,
        Reason.BAD_RANK,
        Reason.RANK_MISMATCH,
        Reason.RANK_NOT_SUPPORTED,
        Reason.INTERNAL_ERROR,
    )
}


@dataclass(frozen=True)
class AdmissionContext:
    """Everything one round's admission needs. `admitted` may be a set the caller grows."""

    expected: Expected
    mode: str
    global_tensors: Mapping[str, np.ndarray]
    payload_dtype: str = "float32"
    membership: str = "open"
    allowlist: Collection[str] = frozenset()  # fingerprints (hex sha256)
    banned: Collection[str] = frozenset()
    admitted: Collection[str] = frozenset()  # signers already admitted this round
    max_norm: float = 0.0  # 0 = no absolute bound
    rank: int = 0  # the project's LoRA rank r (0: the global adapter's, the usual case)
    nested_refusal: str = ""  # why a rank below r cannot be folded here ("": it can; see rules)

    @property
    def project_rank(self) -> int:
        if self.rank:
            return self.rank
        return next((t.shape[0] for n, t in self.global_tensors.items() if ".lora_A." in n), 0)

    def at_rank(self, rank: int, start: int = 0) -> AdmissionContext:
        """The context for an update of declared rank `rank` whose window starts at `start`
        (`protocol.lora.window_start`): the spec and the global cut to that window."""
        if rank == self.project_rank:
            return self
        cut = take_window(self.global_tensors, rank, start)
        spec = TensorSpec({n: tuple(cut[n].shape) for n in self.expected.spec.shapes},
                          self.expected.spec.dtypes)
        return replace(self, expected=replace(self.expected, spec=spec), global_tensors=cut,
                       rank=self.project_rank)
    resolve: Callable[[UpdateManifest], AdmissionContext] | None = None
    """Async: the context of the task the manifest names (its claims, its base tensors for the
    norm), asked once the signer is allowed; raises `Refused` (stale, replayed, future base)."""


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str  # stable code (a `Reason`): "accepted", a ProtocolError.reason, or a key of REASONS
    message: str
    update_digest: str  # sha256 of the manifest bytes (also for rejected envelopes)
    signer: str | None = None  # fingerprint, once the signature verified
    manifest: UpdateManifest | None = None
    tensors: dict[str, np.ndarray] | None = None  # only when accepted: read-only views of the payload
    delta_norm: float | None = None
    weight_factor: float = 1.0  # on its weight in the mean (async: the staleness weight s(tau))

    def without_tensors(self) -> Verdict:
        """The record to keep once the tensors are aggregated (they pin the payload bytes)."""
        return replace(self, tensors=None)

    def record(self) -> dict:
        """Plain fields for a state store."""
        m = self.manifest
        return {
            "update_digest": self.update_digest,
            "accepted": self.accepted,
            "reason": self.reason,
            "message": self.message,
            "signer": self.signer,
            "examples": m.examples if m else None,
            "steps": m.steps if m else None,
            "train_loss": m.train_loss if m else None,
            "payload_bytes": m.payload_bytes if m else None,
            "delta_norm": self.delta_norm,
        }


def update_spec(global_tensors: Mapping[str, np.ndarray], mode: str, dtype: str) -> TensorSpec:
    """Names and shapes an update must carry in `mode`, in exactly `dtype`."""
    names = modes.get(mode).sent_names(global_tensors)
    return TensorSpec({n: tuple(global_tensors[n].shape) for n in names}, frozenset({dtype}))


def expected_for(
    config: ProjectConfig,
    round: int,
    nonce: str,
    global_tensors: Mapping[str, np.ndarray],
    base_adapter_digest: str,
) -> Expected:
    """The round's `Expected`; the payload limit is the tighter of the config's and the spec's size."""
    dtype = config.limits.payload_dtype
    spec = update_spec(global_tensors, config.aggregation.mode, dtype)
    task = config.task(round, nonce, base_adapter_digest)
    claims = task.claims()
    return Expected(
        project_id=claims["project_id"],
        round=round,
        nonce=nonce,
        base_adapter_digest=base_adapter_digest,
        base_model_id=claims["base_model_id"],
        base_model_revision=claims["base_model_revision"],
        lora_config_digest=claims["lora_config_digest"],
        spec=spec,
        max_payload_bytes=min(config.limits.max_payload_bytes, spec.payload_bytes(dtype)),
    )


def context_for(
    config: ProjectConfig,
    expected: Expected,
    global_tensors: Mapping[str, np.ndarray],
    *,
    allowlist: Collection[str] = frozenset(),
    banned: Collection[str] = frozenset(),
    admitted: Collection[str] = frozenset(),
) -> AdmissionContext:
    return AdmissionContext(
        expected=expected,
        mode=config.aggregation.mode,
        global_tensors=global_tensors,
        payload_dtype=config.limits.payload_dtype,
        membership=config.project.membership,
        allowlist=allowlist,
        banned=banned,
        admitted=admitted,
        max_norm=config.aggregation.max_norm,
        nested_refusal=rules.nested_ranks_refusal(config),
    )


class _Reject(Exception):
    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Refused(_Reject):
    """What an `AdmissionContext.resolve` raises: the update names no task it may be admitted for."""


def _digest(env: Envelope) -> str:
    try:
        return env.digest
    except TypeError:
        return ""


def admit(env: Envelope, ctx: AdmissionContext) -> Verdict:
    """Run every check on one envelope; a rejection is a Verdict, never an exception."""
    digest = _digest(env)
    signer: str | None = None
    manifest: UpdateManifest | None = None
    try:
        if not all(isinstance(x, bytes) for x in (env.manifest, env.payload, env.signature)):
            raise _Reject(Reason.MALFORMED, "envelope parts must be bytes")
        if len(env.manifest) > MAX_MANIFEST_BYTES:
            raise _Reject(
                Reason.TOO_LARGE, f"manifest is {len(env.manifest)} bytes, limit {MAX_MANIFEST_BYTES}"
            )
        manifest, key = open_envelope(env, max_payload_bytes=ctx.expected.max_payload_bytes)
        signer = key.fingerprint
        _check_signer(signer, ctx)
        if ctx.resolve is not None:
            ctx = ctx.resolve(manifest)
        check_claims(manifest, ctx.expected)
        if manifest.payload_dtype != ctx.payload_dtype:
            raise _Reject(
                Reason.WRONG_DTYPE,
                f"payload dtype {manifest.payload_dtype!r}, round uses {ctx.payload_dtype!r}",
            )
        if manifest.examples < 1:
            raise _Reject(Reason.NO_EXAMPLES, "update reports 0 training examples")
        # The norm doubles as the finiteness check: computed from float32 values it is finite
        # exactly when every value is (see robust.delta_norm), so the payload is read once less.
        tensors, norm = _payload_of_rank(env, manifest, ctx, _declared_rank(manifest, ctx), signer)
        if not math.isfinite(norm):
            bad = next((n for n, t in tensors.items() if not np.isfinite(t).all()), "?")
            raise NonFinite(f"tensor {bad!r} holds NaN or Inf")
        if ctx.max_norm and not norm <= ctx.max_norm:
            raise _Reject(Reason.NORM_TOO_LARGE, f"delta norm {norm:.4g} exceeds max_norm {ctx.max_norm:.4g}")
    except ProtocolError as exc:
        return Verdict(False, exc.reason, str(exc), digest, signer, manifest)
    except _Reject as exc:
        return Verdict(False, exc.reason, str(exc), digest, signer, manifest)
    except Exception as exc:  # a bug must not stop the round; it is logged and recorded
        log.exception("admission failed on update %s", digest[:16])
        return Verdict(False, Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}", digest, signer, manifest)
    return Verdict(True, Reason.ACCEPTED, f"delta norm {norm:.4g}", digest, signer, manifest, tensors, norm)


def _declared_rank(manifest: UpdateManifest, ctx: AdmissionContext) -> int:
    """The rank the update declares, if this round can fold it."""
    r = ctx.project_rank
    if manifest.rank is None:
        return r
    if not 1 <= manifest.rank <= r:
        raise _Reject(Reason.BAD_RANK,
                      f"declared rank {manifest.rank} is outside 1..{r} (the project's rank)")
    if manifest.rank < r and ctx.nested_refusal:
        raise _Reject(
            Reason.RANK_NOT_SUPPORTED,
            f"declared rank {manifest.rank} is below the project's {r}: {ctx.nested_refusal}; "
            f"train at rank {r} (join without --max-rank)",
        )
    return manifest.rank


def _payload_of_rank(
    env: Envelope, manifest: UpdateManifest, ctx: AdmissionContext, rank: int, signer: str
) -> tuple[dict[str, np.ndarray], float]:
    """`_payload_and_norm` at the declared rank, against the global's columns of the signer's window;
    a payload shaped as another rank's is a `rank_mismatch`."""
    try:
        start = window_start(manifest.round, rank, ctx.project_rank, signer)
        return _payload_and_norm(env, manifest, ctx.at_rank(rank, start))
    except BadTensor:
        carried = _rank_carried(env.payload, ctx)
        if carried is None or carried == rank:
            raise
        raise _Reject(
            Reason.RANK_MISMATCH, f"update carries {carried} rank components, declares rank {rank}"
        ) from None


def _rank_carried(payload: bytes, ctx: AdmissionContext) -> int | None:
    """The rank whose tensor shapes the payload has (None: no rank's). Called only once the payload's
    digest matched its signed manifest, so these are the bytes the signer sent."""
    try:
        tensors = decode_tensors(payload, max_bytes=ctx.expected.max_payload_bytes, require_finite=False)
    except ProtocolError:
        return None
    if set(tensors) != set(ctx.expected.spec.shapes):
        return None
    widths = {t.shape[-1] if ".lora_B." in n else t.shape[0] for n, t in tensors.items() if t.ndim == 2}
    if len(widths) != 1:
        return None
    width = widths.pop()
    full = ctx.expected.spec.shapes
    for name, t in tensors.items():  # every other dimension as the project's
        cut = list(full[name])
        cut[-1 if ".lora_B." in name else 0] = width
        if tuple(t.shape) != tuple(cut):
            return None
    return width


def _norm_of_bytes(payload: bytes, ctx: AdmissionContext) -> float:
    tensors = decode_tensors(payload, max_bytes=ctx.expected.max_payload_bytes, require_finite=False)
    return delta_norm(tensors, ctx.global_tensors, ctx.mode)


def _payload_and_norm(
    env: Envelope, manifest: UpdateManifest, ctx: AdmissionContext
) -> tuple[dict[str, np.ndarray], float]:
    """`check_payload`, and the delta norm taken on the helper thread meanwhile.

    The helper reads the same bytes while this thread hashes them; its norm counts only once
    `check_payload` has proved them the signed, well-formed payload (else it is waited for and
    dropped, so that no work outlives the verdict)."""
    # The product geometry (exact) goes through BLAS, whose own threads would fight the hashing.
    thread = background.helper() if modes.get(ctx.mode).norm == "parameter" else None
    if thread is None:
        tensors = check_payload(env, manifest, ctx.expected, require_finite=False)
        return tensors, delta_norm(tensors, ctx.global_tensors, ctx.mode)
    job = thread.submit(_norm_of_bytes, env.payload, ctx)
    try:
        tensors = check_payload(env, manifest, ctx.expected, require_finite=False)
    finally:
        wait([job])
    error = job.exception()
    if error is not None:  # cannot happen for a payload that passed check_payload: a bug
        raise error
    return tensors, job.result()


def _check_signer(fingerprint: str, ctx: AdmissionContext) -> None:
    if fingerprint in ctx.banned:
        raise _Reject(Reason.BANNED, f"key {fingerprint[:16]} is banned")
    if ctx.membership == "allowlist" and fingerprint not in ctx.allowlist:
        raise _Reject(Reason.NOT_REGISTERED, f"key {fingerprint[:16]} is not registered with this project")
    if fingerprint in ctx.admitted:
        raise _Reject(Reason.DUPLICATE_SIGNER, f"key {fingerprint[:16]} already has an update in this round")
