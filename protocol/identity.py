"""Keys: volunteer identities (ECDSA P-256) and coordinator release keys (Ed25519).

A volunteer's key is one OpenSSH private key file (mode 0600: refused when group
or others may read it, as ssh does) with its `.pub` beside it. P-256 is what
Flower's SuperNode authentication accepts, so the same file identifies the
volunteer to the SuperLink and signs its updates.

A key's fingerprint is the hex sha256 of its OpenSSH public-key blob; the same
blob `ssh-keygen -lf key.pub` hashes (it prints base64 where we print hex).
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from loracommons.protocol.errors import BadKey, BadSignature

_ECDSA = "ecdsa-sha2-nistp256"
_ED25519 = "ssh-ed25519"
KEY_TYPES = {"volunteer": _ECDSA, "coordinator": _ED25519}

_PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
_PublicKeyObj = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
#: What cryptography's OpenSSH loaders raise on bad input: besides ValueError, a
#: compressed EC point raises NotImplementedError and an unknown key type UnsupportedAlgorithm.
_LOAD_ERRORS = (ValueError, TypeError, NotImplementedError, UnsupportedAlgorithm)


def fingerprint_display(fingerprint: str) -> str:
    """Short readable form of a hex fingerprint: `3f2a-91bc-0d44-e7a1`."""
    head = fingerprint[:16]
    return "-".join(head[i : i + 4] for i in range(0, 16, 4))


@dataclass(frozen=True)
class PublicKey:
    """A verify-only key, parsed from its OpenSSH one-line form."""

    openssh: str
    _key: _PublicKeyObj = field(repr=False, compare=False)

    @classmethod
    def from_openssh(cls, text: str | bytes) -> PublicKey:
        if isinstance(text, bytes):
            try:
                text = text.decode("ascii")
            except UnicodeDecodeError:
                raise BadKey("public key is not ASCII OpenSSH text") from None
        if not isinstance(text, str):
            raise BadKey(f"public key must be OpenSSH text, got {type(text).__name__}")
        parts = text.strip().split()
        if len(parts) < 2 or parts[0] not in (_ECDSA, _ED25519):
            raise BadKey(f"unsupported public key type {parts[0] if parts else '(empty)'!r}")
        canonical = f"{parts[0]} {parts[1]}"
        try:
            key = serialization.load_ssh_public_key(canonical.encode("ascii"))
        except _LOAD_ERRORS as exc:
            raise BadKey(f"cannot parse public key: {exc}") from None
        if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name != "secp256r1":
            raise BadKey(f"ECDSA key must be on P-256, got {key.curve.name}")
        if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
            raise BadKey(f"unsupported key class {type(key).__name__}")
        return cls(canonical, key)

    @classmethod
    def load(cls, path: str | Path) -> PublicKey:
        return cls.from_openssh(Path(path).read_bytes())

    @property
    def key_type(self) -> str:
        return self.openssh.split()[0]

    @property
    def fingerprint(self) -> str:
        blob = base64.b64decode(self.openssh.split()[1])
        return hashlib.sha256(blob).hexdigest()

    @property
    def short(self) -> str:
        return fingerprint_display(self.fingerprint)

    def verify(self, signature: bytes, message: bytes) -> None:
        """Raise `BadSignature` unless `signature` is this key's over `message`."""
        try:
            if isinstance(self._key, ed25519.Ed25519PublicKey):
                self._key.verify(signature, message)
            else:
                self._key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            raise BadSignature(f"signature does not verify for key {self.short}") from None


@dataclass(frozen=True)
class SigningKey:
    """A private key that signs updates (volunteer) or releases (coordinator)."""

    _key: _PrivateKey = field(repr=False)

    @classmethod
    def generate(cls, kind: str = "volunteer") -> SigningKey:
        if kind == "volunteer":
            return cls(ec.generate_private_key(ec.SECP256R1()))
        if kind == "coordinator":
            return cls(ed25519.Ed25519PrivateKey.generate())
        raise ValueError(f"unknown key kind {kind!r}; expected one of {sorted(KEY_TYPES)}")

    @classmethod
    def load(cls, path: str | Path) -> SigningKey:
        path = Path(path)
        try:
            data = path.read_bytes()
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError as exc:
            raise BadKey(f"cannot read key file {path}: {exc.strerror}") from None
        try:
            key = serialization.load_ssh_private_key(data, password=None)
        except _LOAD_ERRORS as exc:
            raise BadKey(f"{path} is not an unencrypted OpenSSH private key: {exc}") from None
        if not (isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
                or isinstance(key, ed25519.Ed25519PrivateKey)):
            raise BadKey(f"{path}: only ECDSA P-256 and Ed25519 keys are supported")
        if mode & 0o077:  # as ssh does: a key others can read is no longer only its owner's
            raise BadKey(f"private key {path} is accessible by others (mode {mode:04o}); "
                         f"run `chmod 600 {path}` (and replace the key if others may have read it)")
        return cls(key)

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the private key (mode 0600) and `<path>.pub`; refuse to overwrite."""
        path = Path(path)
        pub_path = path.with_name(path.name + ".pub")
        if not force and (path.exists() or pub_path.exists()):
            raise FileExistsError(f"{path} already exists (use --force to replace it)")
        path.parent.mkdir(parents=True, exist_ok=True)
        private = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(private)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        pub_path.write_text(self.public.openssh + "\n")
        return path

    @property
    def public(self) -> PublicKey:
        raw = self._key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        return PublicKey.from_openssh(raw)

    def sign(self, message: bytes) -> bytes:
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return self._key.sign(message)
        return self._key.sign(message, ec.ECDSA(hashes.SHA256()))
