"""One exception family for everything that fails verification.

Verification raises; it never returns False. Each subclass names what failed,
and `reason` is a short stable code that the coordinator records per update.
"""

from __future__ import annotations

from enum import Enum


class ProtocolError(Exception):
    """Base of every verification failure."""

    reason = "protocol_error"


class TooLarge(ProtocolError):
    reason = "too_large"


class Malformed(ProtocolError):
    """Bytes that do not parse as the expected structure."""

    reason = "malformed"


class UnknownField(Malformed):
    reason = "unknown_field"


class MissingField(Malformed):
    reason = "missing_field"


class UnsupportedVersion(ProtocolError):
    reason = "unsupported_version"


class BadSignature(ProtocolError):
    reason = "bad_signature"


class BadKey(ProtocolError):
    reason = "bad_key"


class WrongProject(ProtocolError):
    reason = "wrong_project"


class WrongRound(ProtocolError):
    reason = "wrong_round"


class WrongNonce(ProtocolError):
    reason = "wrong_nonce"


class WrongBase(ProtocolError):
    """The update started from another global adapter, base model or LoRA config."""

    reason = "wrong_base"


class DigestMismatch(ProtocolError):
    reason = "digest_mismatch"


class BadTensor(ProtocolError):
    """Payload is not safetensors, or its tensors differ from the expected spec."""

    reason = "bad_tensor"


class NonFinite(BadTensor):
    reason = "non_finite"


class ChainError(ProtocolError):
    """A release does not follow the previous one (gap, reorder, fork)."""

    reason = "chain_broken"


class Rollback(ChainError):
    reason = "rollback"


class DownlinkMismatch(ProtocolError):
    """The global adapter a volunteer rebuilt from a task (received factors + factors regenerated
    from the project seed) does not match the task's digest: it trains nothing."""

    reason = "downlink_mismatch"


class BaseUnavailable(ProtocolError):
    """A delta downlink applies to a version the volunteer does not hold: it trains nothing and
    gets the whole adapter next time."""

    reason = "base_unavailable"


class UntrustedKey(ProtocolError):
    """Signed by a key other than the pinned one."""

    reason = "untrusted_key"


class Reason(str, Enum):
    """Every code recorded for an update's outcome: one table that the admission, the round
    loop, the store, the API and the dashboard read. `ProtocolError.reason` values are codes
    of this table too (a test keeps the two in step)."""

    ACCEPTED = "accepted"
    # verification of the bytes (ProtocolError subclasses above)
    PROTOCOL_ERROR = "protocol_error"
    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    UNKNOWN_FIELD = "unknown_field"
    MISSING_FIELD = "missing_field"
    UNSUPPORTED_VERSION = "unsupported_version"
    BAD_SIGNATURE = "bad_signature"
    BAD_KEY = "bad_key"
    WRONG_PROJECT = "wrong_project"
    WRONG_ROUND = "wrong_round"
    WRONG_NONCE = "wrong_nonce"
    WRONG_BASE = "wrong_base"
    DIGEST_MISMATCH = "digest_mismatch"
    BAD_TENSOR = "bad_tensor"
    NON_FINITE = "non_finite"
    CHAIN_BROKEN = "chain_broken"
    ROLLBACK = "rollback"
    UNTRUSTED_KEY = "untrusted_key"
    # admission policy
    BANNED = "banned"
    NOT_REGISTERED = "not_registered"
    DUPLICATE_SIGNER = "duplicate_signer"
    WRONG_DTYPE = "wrong_dtype"
    NO_EXAMPLES = "no_examples"
    NORM_TOO_LARGE = "norm_too_large"
    BAD_RANK = "bad_rank"
    RANK_MISMATCH = "rank_mismatch"
    RANK_NOT_SUPPORTED = "rank_not_supported"
    # the round's rules, applied once every update is in
    FREE_RIDER = "free_rider"
    KRUM_OUTLIER = "krum_outlier"
    CLIPPED = "clipped"
    WEIGHT_CAPPED = "weight_capped"
    # the round loop
    LATE = "late"
    STALE = "stale"
    REPLAYED = "replayed"
    FUTURE_BASE = "future_base"
    VOLUNTEER_ERROR = "volunteer_error"
    DOWNLINK_MISMATCH = "downlink_mismatch"
    BASE_UNAVAILABLE = "base_unavailable"
    INTERNAL_ERROR = "internal_error"

    def __str__(self) -> str:
        return self.value

    @property
    def doc(self) -> str:
        """One line saying what the code means, for the API, the dashboard and `status`."""
        return REASON_DOCS[self]


REASON_DOCS: dict[Reason, str] = {
    Reason.ACCEPTED: "passed every check",
    Reason.PROTOCOL_ERROR: "failed verification",
    Reason.TOO_LARGE: "manifest or payload above its size limit",
    Reason.MALFORMED: "bytes that do not parse as the expected structure",
    Reason.UNKNOWN_FIELD: "a field the protocol does not define",
    Reason.MISSING_FIELD: "a required field is missing",
    Reason.UNSUPPORTED_VERSION: "a format version this coordinator does not speak",
    Reason.BAD_SIGNATURE: "signature does not verify against the key in the manifest",
    Reason.BAD_KEY: "the signer's public key does not parse",
    Reason.WRONG_PROJECT: "signed for another project",
    Reason.WRONG_ROUND: "signed for another round",
    Reason.WRONG_NONCE: "signed for another nonce of this round (a replay)",
    Reason.WRONG_BASE: "trained from another global adapter, base model or LoRA configuration",
    Reason.DIGEST_MISMATCH: "payload does not match the digest signed in the manifest",
    Reason.BAD_TENSOR: "tensor names, shapes or dtypes differ from what the round expects",
    Reason.NON_FINITE: "a tensor holds NaN or Inf",
    Reason.CHAIN_BROKEN: "a release does not follow the previous one",
    Reason.ROLLBACK: "a release older than one already seen",
    Reason.UNTRUSTED_KEY: "signed by a key other than the pinned one",
    Reason.BANNED: "signer's key is banned from the project",
    Reason.NOT_REGISTERED: "allowlist project and the signer's key is not registered",
    Reason.DUPLICATE_SIGNER: "signer already has an update admitted this round",
    Reason.WRONG_DTYPE: "manifest claims a payload dtype the round does not use",
    Reason.NO_EXAMPLES: "update reports zero training examples",
    Reason.NORM_TOO_LARGE: "delta norm above the project's absolute max_norm",
    Reason.BAD_RANK: "declared LoRA rank below 1 or above the project's rank",
    Reason.RANK_MISMATCH: "tensors carry another number of rank components than the rank declared",
    Reason.RANK_NOT_SUPPORTED: "a rank below the project's, where its mode or a rule cannot fold one",
    Reason.FREE_RIDER: "delta norm far below the round's median (no real training)",
    Reason.KRUM_OUTLIER: "among the updates farthest from the others (Multi-Krum)",
    Reason.CLIPPED: "admitted, its delta scaled down to the round's clip bound",
    Reason.WEIGHT_CAPPED: "admitted, its claimed examples counted only up to the project's cap",
    Reason.LATE: "arrived after its round closed",
    Reason.STALE: "async: trained from a version more than max_staleness versions old",
    Reason.REPLAYED: "async: names a task whose update was already admitted (a replay)",
    Reason.FUTURE_BASE: "async: names a task or version the coordinator has not issued yet",
    Reason.VOLUNTEER_ERROR: "the volunteer's node reported an error instead of an update",
    Reason.DOWNLINK_MISMATCH: "the volunteer refused the round: the adapter it rebuilt from the task "
                              "does not match the task's digest (tampered factors or a wrong seed)",
    Reason.BASE_UNAVAILABLE: "the volunteer refused the round: it no longer holds the version a delta "
                             "downlink applies to (it gets the whole adapter next round)",
    Reason.INTERNAL_ERROR: "the coordinator failed handling it (a bug): logged with its traceback",
}
