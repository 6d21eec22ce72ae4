"""One exception family for everything that fails verification.

Verification raises; it never returns False. Each subclass names what failed,
and `reason` is a short stable code that the coordinator records per update.
"""


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


class UntrustedKey(ProtocolError):
    """Signed by a key other than the pinned one."""

    reason = "untrusted_key"
