"""The signed update envelope: what a volunteer sends, and its verification.

An envelope is three byte strings that travel unchanged:

    manifest   canonical JSON (fields of `UpdateManifest`)
    payload    the update tensors as safetensors
    signature  signer's signature over DOMAIN + sha256(manifest)

The manifest carries sha256(payload), so one signature covers both.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from loracommons.protocol.canonical import canonical_json, parse_json
from loracommons.protocol.codec import DTYPES, TensorSpec, decode_tensors
from loracommons.protocol.errors import (
    DigestMismatch,
    Malformed,
    MissingField,
    TooLarge,
    UnknownField,
    UnsupportedVersion,
    WrongBase,
    WrongNonce,
    WrongProject,
    WrongRound,
)
from loracommons.protocol.identity import PublicKey, SigningKey

FORMAT_VERSION = 1
DOMAIN = b"loracommons/update/v1\x00"
MAX_MANIFEST_BYTES = 16 * 1024
MAX_SIGNATURE_BYTES = 256


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


#: Integers a manifest may carry: what SQLite and numpy hold (a 400-digit number is refused here,
#: not by whatever stores or converts it later).
MAX_INT = 2**63 - 1


def _check_type(name: str, kind: object, value: object) -> None:
    if kind == "int" and (not isinstance(value, int) or isinstance(value, bool) or abs(value) > MAX_INT):
        raise Malformed(f"manifest field {name!r} must be an integer of at most 63 bits")
    if kind == "str" and not isinstance(value, str):
        raise Malformed(f"manifest field {name!r} must be a string")
    if kind == "float" and (
        isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value)
    ):
        raise Malformed(f"manifest field {name!r} must be a finite number")


def _finite(value: float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer too large for a float
        return False


#: The evaluation claim's fields, which come together or not at all.
EVAL_FIELDS = {"eval_loss": "float", "eval_tokens": "int"}
#: Manifest fields a sender may leave out, with their type as `_check_type` names it.
OPTIONAL_FIELDS = {**EVAL_FIELDS, "rank": "int"}


def _check_eval(obj: dict) -> None:
    """The evaluation claim comes whole or not at all: a finite loss >= 0 over >= 1 token."""
    present = [name for name in EVAL_FIELDS if name in obj]
    if not present:
        return
    if len(present) != len(EVAL_FIELDS):
        missing = next(name for name in EVAL_FIELDS if name not in obj)
        raise MissingField(f"manifest carries {present[0]!r} without {missing!r}")
    if obj["eval_loss"] < 0:
        raise Malformed("manifest field 'eval_loss' is negative")
    if obj["eval_tokens"] < 1:
        raise Malformed("manifest field 'eval_tokens' must be at least 1 with an eval_loss")


@dataclass(frozen=True)
class UpdateManifest:
    """What an update claims about itself. Every field is signed."""

    format_version: int
    project_id: str
    round: int
    nonce: str  # hex, fresh per round, chosen by the coordinator
    base_adapter_digest: str  # sha256 of the global adapter payload it started from
    base_model_id: str
    base_model_revision: str
    lora_config_digest: str
    examples: int
    steps: int
    train_loss: float
    payload_sha256: str
    payload_bytes: int
    payload_dtype: str
    signer: str  # OpenSSH public key line
    eval_loss: float | None = None
    """Loss per labelled token of the global adapter the update started from, on the signer's own
    held-out split, scored before training (federated evaluation). Absent with `eval_tokens`."""
    eval_tokens: int = 0
    """Labelled tokens that loss was measured on (0: no evaluation)."""
    rank: int | None = None
    """The LoRA rank r_i the signer trained (nested ranks, `Mode.nested_ranks`): its update carries the
    r_i columns of each B in its window for the round (`protocol.lora.window_start`: round and signer).
    Absent: the project's rank. Admission checks it (1 <= r_i <= r, the mode and rules allow it, the
    tensors have exactly r_i columns)."""

    @classmethod
    def from_dict(cls, obj: dict) -> UpdateManifest:
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(obj) - set(known))
        if unknown:
            raise UnknownField(f"unknown manifest field {unknown[0]!r}")
        missing = sorted(set(known) - set(obj) - set(OPTIONAL_FIELDS))
        if missing:
            raise MissingField(f"manifest lacks field {missing[0]!r}")
        for name, kind in known.items():
            if name in obj:
                _check_type(name, OPTIONAL_FIELDS.get(name, kind), obj[name])
        _check_eval(obj)
        if obj["format_version"] != FORMAT_VERSION:
            raise UnsupportedVersion(f"envelope format {obj['format_version']}, this reads {FORMAT_VERSION}")
        for name in ("round", "examples", "steps", "payload_bytes"):
            if obj[name] < 0:
                raise Malformed(f"manifest field {name!r} is negative")
        if obj["payload_dtype"] not in DTYPES:
            raise Malformed(f"manifest payload_dtype {obj['payload_dtype']!r} not one of {sorted(DTYPES)}")
        floats = {name: float(obj[name]) for name in ("train_loss", "eval_loss") if name in obj}
        return cls(**{**obj, **floats})

    def to_bytes(self) -> bytes:
        """Canonical JSON; the optional evaluation fields only when there was an evaluation, and the
        rank only when declared, so a manifest without them is byte for byte what it was before
        they existed."""
        obj = asdict(self)
        if self.eval_loss is None:
            for name in EVAL_FIELDS:
                del obj[name]
        if self.rank is None:
            del obj["rank"]
        return canonical_json(obj)


@dataclass(frozen=True)
class Envelope:
    manifest: bytes
    payload: bytes
    signature: bytes

    @property
    def digest(self) -> str:
        """Identity of this update: sha256 of its manifest (which pins the payload)."""
        return sha256_hex(self.manifest)


@dataclass(frozen=True)
class Expected:
    """What the coordinator expects of updates in one round."""

    project_id: str
    round: int
    nonce: str
    base_adapter_digest: str
    base_model_id: str
    base_model_revision: str
    lora_config_digest: str
    spec: TensorSpec
    max_payload_bytes: int


def _signed_message(manifest: bytes) -> bytes:
    return DOMAIN + hashlib.sha256(manifest).digest()


def sign_update(key: SigningKey, payload: bytes, **claims: object) -> Envelope:
    """Build and sign an envelope; `claims` are the manifest fields set by the sender."""
    manifest = UpdateManifest(
        format_version=FORMAT_VERSION,
        payload_sha256=sha256_hex(payload),
        payload_bytes=len(payload),
        signer=key.public.openssh,
        **claims,  # type: ignore[arg-type]
    )
    raw = manifest.to_bytes()
    return Envelope(raw, payload, key.sign(_signed_message(raw)))


def open_envelope(env: Envelope, *, max_payload_bytes: int) -> tuple[UpdateManifest, PublicKey]:
    """Size limits, manifest parse and signature; returns the claims and the signer."""
    if len(env.payload) > max_payload_bytes:
        raise TooLarge(f"payload is {len(env.payload)} bytes, limit {max_payload_bytes}")
    if len(env.signature) > MAX_SIGNATURE_BYTES:
        raise TooLarge(f"signature is {len(env.signature)} bytes, limit {MAX_SIGNATURE_BYTES}")
    obj = parse_json(env.manifest, max_bytes=MAX_MANIFEST_BYTES, what="update manifest")
    manifest = UpdateManifest.from_dict(obj)
    # The manifest's sha256 names the update, so one content must have one byte form.
    try:
        canonical = canonical_json(obj)
    except ValueError:  # a lone surrogate escaped in a string has no UTF-8 form
        canonical = b""
    if canonical != env.manifest:
        raise Malformed("update manifest is not canonical JSON")
    signer = PublicKey.from_openssh(manifest.signer)
    signer.verify(env.signature, _signed_message(env.manifest))
    return manifest, signer


def check_claims(manifest: UpdateManifest, expected: Expected) -> None:
    """Project, round, nonce and starting point, in that order."""
    if manifest.project_id != expected.project_id:
        raise WrongProject(f"update is for project {manifest.project_id!r}, not {expected.project_id!r}")
    if manifest.round != expected.round:
        raise WrongRound(f"update is for round {manifest.round}, current round is {expected.round}")
    if manifest.nonce != expected.nonce:
        raise WrongNonce(f"update carries a stale or foreign nonce for round {manifest.round}")
    if manifest.base_adapter_digest != expected.base_adapter_digest:
        raise WrongBase("update started from another version of the global adapter")
    if (manifest.base_model_id, manifest.base_model_revision) != (
        expected.base_model_id,
        expected.base_model_revision,
    ):
        raise WrongBase(f"update was trained on base model {manifest.base_model_id!r}")
    if manifest.lora_config_digest != expected.lora_config_digest:
        raise WrongBase("update was trained with another LoRA configuration")


def check_payload(
    env: Envelope, manifest: UpdateManifest, expected: Expected, *, require_finite: bool = True
) -> dict[str, np.ndarray]:
    """Payload digest, then tensor names, shapes, dtypes and (unless the caller checks it in a
    pass of its own, as admission's norm does) finiteness."""
    if len(env.payload) != manifest.payload_bytes or sha256_hex(env.payload) != manifest.payload_sha256:
        raise DigestMismatch("payload does not match the sha256 its manifest signs")
    # Every tensor must be in the dtype the manifest signs (and the round allows).
    spec = TensorSpec(expected.spec.shapes, expected.spec.dtypes & {manifest.payload_dtype})
    return decode_tensors(env.payload, max_bytes=expected.max_payload_bytes, spec=spec,
                          require_finite=require_finite)


def verify_update(env: Envelope, expected: Expected) -> tuple[UpdateManifest, dict[str, np.ndarray]]:
    """Every check of an envelope against `expected`; raises a `ProtocolError` subclass."""
    manifest, _ = open_envelope(env, max_payload_bytes=expected.max_payload_bytes)
    check_claims(manifest, expected)
    return manifest, check_payload(env, manifest, expected)
