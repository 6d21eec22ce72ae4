"""Signed release manifests and the chain they form.

A release is a PEFT adapter folder plus a manifest naming every file with its
size and sha256, the digest of the previous release's manifest, and the digest
of the admitted updates it aggregates; the coordinator signs it. On disk and
over HTTP it is `release.json` (MANIFEST_FILE): {"manifest": <canonical JSON text>, "signature": <base64>}.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields

from loracommons.protocol.canonical import canonical_json, parse_json
from loracommons.protocol.envelope import sha256_hex
from loracommons.protocol.errors import (
    ChainError,
    Malformed,
    MissingField,
    Rollback,
    UnknownField,
    UnsupportedVersion,
    UntrustedKey,
)
from loracommons.protocol.identity import PublicKey, SigningKey

FORMAT_VERSION = 1
#: The files of a release folder: PEFT's two (what `PeftModel.from_pretrained` reads), the
#: model card, and the signed manifest beside them, which is not listed in itself.
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CARD_FILE = "README.md"
MANIFEST_FILE = "release.json"
#: What a release must list for a loader to use it.
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
DOMAIN = b"loracommons/release/v1\x00"
MAX_RELEASE_BYTES = 256 * 1024
#: Only data formats a loader reads without executing anything.
ALLOWED_SUFFIXES = (".json", ".safetensors", ".md")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: A pin is a fingerprint prefix of at least 128 bits: 64 bits can be matched by a key
#: made for it (a collision search of ~2^32 keys per pin is within reach).
MIN_PIN_DIGITS = 32


def check_file_name(name: str) -> None:
    """Refuse anything but a plain file name with an allowed suffix."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise Malformed(f"release file name {str(name)[:80]!r} is not a plain file name")
    if not name.endswith(ALLOWED_SUFFIXES):
        raise Malformed(f"release file {name!r}: only {', '.join(ALLOWED_SUFFIXES)} files are allowed")


def updates_digest(update_digests: Iterable[str]) -> str:
    """Digest of the admitted updates, independent of arrival order."""
    return sha256_hex(canonical_json(sorted(update_digests)))


def _count(value: object) -> bool:
    """A non-negative integer that fits in 63 bits (what SQLite and file sizes hold)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


@dataclass(frozen=True)
class ReleaseManifest:
    format_version: int
    project_id: str
    version: int
    round: int
    base_model_id: str
    base_model_revision: str
    files: dict  # name -> {"size": int, "sha256": hex}
    previous: str  # sha256 of the previous release manifest, "" for version 1
    updates_digest: str
    metrics: dict
    created: str  # ISO 8601 UTC
    signer: str  # coordinator's OpenSSH public key

    @classmethod
    def from_dict(cls, obj: dict) -> ReleaseManifest:
        known = {f.name for f in fields(cls)}
        if set(obj) - known:
            raise UnknownField(f"unknown release field {sorted(set(obj) - known)[0]!r}")
        if known - set(obj):
            raise MissingField(f"release lacks field {sorted(known - set(obj))[0]!r}")
        version = obj["format_version"]
        if not isinstance(version, int) or isinstance(version, bool) or version != FORMAT_VERSION:
            raise UnsupportedVersion(f"release format {version!r}")
        for name in ("version", "round"):
            value = obj[name]
            if not _count(value):
                raise Malformed(f"release field {name!r} must be a non-negative integer of at most 63 bits")
        for name in ("project_id", "base_model_id", "base_model_revision", "previous", "created", "signer"):
            if not isinstance(obj[name], str):
                raise Malformed(f"release field {name!r} must be a string")
        if obj["previous"] and not _HEX64.match(obj["previous"]):
            raise Malformed("release field 'previous' must be a sha256 hex digest")
        if not isinstance(obj["metrics"], dict):
            raise Malformed("release field 'metrics' must be an object")
        files = obj["files"]
        if not isinstance(files, dict) or not files:
            raise Malformed("release field 'files' must be a non-empty object")
        for name, info in files.items():
            check_file_name(name)
            if (
                not isinstance(info, dict)
                or set(info) != {"size", "sha256"}
                or not _count(info["size"])
                or not isinstance(info["sha256"], str)
                or not _HEX64.match(info["sha256"])
            ):
                raise Malformed(f"release file entry {name!r} must be {{size, sha256}}")
        return cls(**obj)

    def to_bytes(self) -> bytes:
        return canonical_json(asdict(self))


@dataclass(frozen=True)
class SignedRelease:
    manifest: bytes
    signature: bytes

    @property
    def digest(self) -> str:
        return sha256_hex(self.manifest)

    def to_json(self) -> bytes:
        signature = base64.b64encode(self.signature).decode()
        return canonical_json({"manifest": self.manifest.decode("utf-8"), "signature": signature})

    @classmethod
    def from_json(cls, data: bytes) -> SignedRelease:
        obj = parse_json(data, max_bytes=MAX_RELEASE_BYTES, what="release document")
        if set(obj) != {"manifest", "signature"}:
            raise Malformed("release document must have exactly 'manifest' and 'signature'")
        if not isinstance(obj["manifest"], str) or not isinstance(obj["signature"], str):
            raise Malformed("release document fields must be strings")
        try:
            signature = base64.b64decode(obj["signature"], validate=True)
        except (binascii.Error, ValueError):
            raise Malformed("release signature is not base64") from None
        try:
            manifest = obj["manifest"].encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escaped in the JSON text
            raise Malformed("release manifest is not valid UTF-8 text") from None
        return cls(manifest, signature)


def sign_release(key: SigningKey, manifest: ReleaseManifest) -> SignedRelease:
    if manifest.signer != key.public.openssh:
        raise ValueError("manifest signer must be the signing key's public key")
    raw = manifest.to_bytes()
    return SignedRelease(raw, key.sign(DOMAIN + bytes.fromhex(sha256_hex(raw))))


def _pinned_fingerprint(pinned: PublicKey | str) -> str:
    return pinned.fingerprint if isinstance(pinned, PublicKey) else pinned.lower().replace("-", "")


def verify_release(signed: SignedRelease, pinned: PublicKey | str) -> ReleaseManifest:
    """Check the signature against the pinned key (or its fingerprint, or a prefix of 32+ hex digits)."""
    manifest = ReleaseManifest.from_dict(
        parse_json(signed.manifest, max_bytes=MAX_RELEASE_BYTES, what="release manifest")
    )
    signer = PublicKey.from_openssh(manifest.signer)
    want = _pinned_fingerprint(pinned)
    if len(want) < MIN_PIN_DIGITS:
        raise UntrustedKey(f"pin {want[:16]!r} has {len(want)} hex digits, a pin needs {MIN_PIN_DIGITS}+")
    if not signer.fingerprint.startswith(want):
        raise UntrustedKey(f"release is signed by {signer.short}, not by the pinned key {want[:16]}")
    signer.verify(signed.signature, DOMAIN + bytes.fromhex(signed.digest))
    return manifest


def verify_chain(
    releases: Sequence[SignedRelease],
    pinned: PublicKey | str,
    *,
    after: SignedRelease | None = None,
) -> list[ReleaseManifest]:
    """Verify consecutive releases from the pinned key.

    Without `after`, the sequence must start at version 1. With `after` (the
    last release this user verified), it must continue from it: an older or
    equal version is a `Rollback`, a gap or a fork is a `ChainError`.
    """
    previous = verify_release(after, pinned) if after is not None else None
    prev_digest = after.digest if after is not None else ""
    out = []
    for signed in releases:
        manifest = verify_release(signed, pinned)
        if previous is not None:
            if manifest.version <= previous.version:
                raise Rollback(f"release version {manifest.version} is not newer than {previous.version}")
            if manifest.version != previous.version + 1:
                raise ChainError(f"release version {manifest.version} follows {previous.version}: gap")
            if manifest.project_id != previous.project_id:
                raise ChainError("release belongs to another project")
        elif manifest.version != 1:
            raise ChainError(f"chain starts at version {manifest.version}, expected 1")
        if manifest.previous != prev_digest:
            raise ChainError(f"release {manifest.version} does not chain to the release before it")
        previous, prev_digest = manifest, signed.digest
        out.append(manifest)
    return out
