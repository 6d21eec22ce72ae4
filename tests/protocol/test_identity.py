"""Identities: key files, fingerprints, signatures, and refused key material."""

import base64
import hashlib
import os
import re
import shutil
import stat
import struct
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from loracommons.protocol.errors import BadKey, BadSignature
from loracommons.protocol.identity import PublicKey, SigningKey, fingerprint_display

KINDS = {"volunteer": "ecdsa-sha2-nistp256", "coordinator": "ssh-ed25519"}
needs_ssh_keygen = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")


@pytest.fixture(scope="module", params=sorted(KINDS))
def key(request) -> SigningKey:
    return SigningKey.generate(request.param)


def openssh_private(private_key) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )


def openssh_public(private_key) -> str:
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_save_load_round_trip(tmp_path, kind):
    key = SigningKey.generate(kind)
    path = key.save(tmp_path / "dir" / "id")
    loaded = SigningKey.load(path)
    assert loaded.public == key.public
    assert loaded.public.key_type == KINDS[kind]
    loaded.public.verify(key.sign(b"message"), b"message")
    key.public.verify(loaded.sign(b"message"), b"message")


def test_private_file_is_0600_and_pub_beside_it(tmp_path, key):
    old = os.umask(0)  # even with a permissive umask
    try:
        path = key.save(tmp_path / "id")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    pub = tmp_path / "id.pub"
    assert pub.read_text() == key.public.openssh + "\n"
    assert PublicKey.load(pub) == key.public
    assert sorted(p.name for p in tmp_path.iterdir()) == ["id", "id.pub"]  # no temp file left


@pytest.mark.parametrize("existing", ["id", "id.pub"])
def test_save_refuses_overwrite_without_force(tmp_path, key, existing):
    (tmp_path / existing).write_text("keep me")
    with pytest.raises(FileExistsError, match="--force"):
        key.save(tmp_path / "id")
    assert (tmp_path / existing).read_text() == "keep me"
    key.save(tmp_path / "id", force=True)
    assert SigningKey.load(tmp_path / "id").public == key.public
    assert stat.S_IMODE((tmp_path / "id").stat().st_mode) == 0o600


def test_force_replaces_a_key_with_a_new_one(tmp_path):
    first, second = SigningKey.generate(), SigningKey.generate()
    first.save(tmp_path / "id")
    second.save(tmp_path / "id", force=True)
    assert SigningKey.load(tmp_path / "id").public == second.public
    assert PublicKey.load(tmp_path / "id.pub") == second.public


def test_fingerprint_is_sha256_of_the_openssh_blob_and_stable(tmp_path, key):
    blob = base64.b64decode(key.public.openssh.split()[1])
    assert key.public.fingerprint == hashlib.sha256(blob).hexdigest()
    path = key.save(tmp_path / "id")
    assert SigningKey.load(path).public.fingerprint == key.public.fingerprint
    assert PublicKey.load(f"{path}.pub").fingerprint == key.public.fingerprint
    assert re.fullmatch(r"[0-9a-f]{4}(-[0-9a-f]{4}){3}", key.public.short)
    assert key.public.short == fingerprint_display(key.public.fingerprint)
    assert key.public.fingerprint.startswith(key.public.short.replace("-", ""))


@needs_ssh_keygen
def test_fingerprint_matches_ssh_keygen(tmp_path, key):
    path = key.save(tmp_path / "id")
    out = subprocess.run(["ssh-keygen", "-lf", f"{path}.pub"], capture_output=True, text=True, check=True)
    b64 = re.search(r"SHA256:([A-Za-z0-9+/]+)", out.stdout).group(1)
    assert base64.b64decode(b64 + "=" * (-len(b64) % 4)).hex() == key.public.fingerprint


def test_comment_in_public_line_is_dropped(key):
    with_comment = PublicKey.from_openssh(key.public.openssh + " alice@laptop\n")
    assert with_comment == key.public
    assert with_comment.openssh == key.public.openssh


def test_sign_verify_and_refusals(key):
    other = SigningKey.generate("volunteer")
    signature = key.sign(b"payload digest")
    key.public.verify(signature, b"payload digest")
    for bad_signature, message in [
        (signature, b"payload digesT"),
        (other.sign(b"payload digest"), b"payload digest"),
        (b"", b"payload digest"),
        (b"\x00" * len(signature), b"payload digest"),
        (signature[:-1], b"payload digest"),
        (signature + b"\x00", b"payload digest"),
    ]:
        with pytest.raises(BadSignature):
            key.public.verify(bad_signature, message)


def test_coordinator_key_is_ed25519():
    key = SigningKey.generate("coordinator")
    assert key.public.key_type == "ssh-ed25519"
    assert len(key.sign(b"release")) == 64
    with pytest.raises(ValueError, match="unknown key kind"):
        SigningKey.generate("rsa")


@pytest.mark.parametrize("curve", [ec.SECP384R1(), ec.SECP521R1()], ids=lambda c: c.name)
def test_non_p256_curves_refused(tmp_path, curve):
    private = ec.generate_private_key(curve)
    path = tmp_path / "id"
    path.write_bytes(openssh_private(private))
    with pytest.raises(BadKey, match="P-256"):
        SigningKey.load(path)
    with pytest.raises(BadKey):
        PublicKey.from_openssh(openssh_public(private))


def test_rsa_key_refused(tmp_path):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "id").write_bytes(openssh_private(private))
    with pytest.raises(BadKey):
        SigningKey.load(tmp_path / "id")
    with pytest.raises(BadKey, match="unsupported public key type"):
        PublicKey.from_openssh(openssh_public(private))


def _p256_blob_under_ed25519_label() -> str:
    return "ssh-ed25519 " + openssh_public(ec.generate_private_key(ec.SECP256R1())).split()[1]


def _compressed_point() -> str:
    """A P-256 key with its point in compressed form, which cryptography refuses with NotImplementedError."""
    point = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    )
    parts = (b"ecdsa-sha2-nistp256", b"nistp256", point)
    blob = b"".join(struct.pack(">I", len(part)) + part for part in parts)
    return "ecdsa-sha2-nistp256 " + base64.b64encode(blob).decode()


def _p384_blob_under_p256_label() -> str:
    return "ecdsa-sha2-nistp256 " + openssh_public(ec.generate_private_key(ec.SECP384R1())).split()[1]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp256 !!!notbase64!!!",
        "ecdsa-sha2-nistp256 AAAA",
        "ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x05short").decode(),
        "ssh-dss AAAAB3NzaC1kc3MAAACBAP",
        _p256_blob_under_ed25519_label(),
        _p384_blob_under_p256_label(),
        _compressed_point(),
        b"ecdsa-sha2-nistp256 \xff\xfe",
        "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTY\u00e9",
    ],
    ids=lambda v: repr(v)[:30],
)
def test_garbage_public_key_refused(text):
    with pytest.raises(BadKey):
        PublicKey.from_openssh(text)


def _pkcs8_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage\n",
        os.urandom(512),
        b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
        _pkcs8_pem(),
        openssh_public(ec.generate_private_key(ec.SECP256R1())).encode(),
    ],
    ids=["empty", "text", "random", "truncated", "pkcs8", "public-key"],
)
def test_garbage_key_file_refused(tmp_path, content):
    path = tmp_path / "id"
    path.write_bytes(content)
    with pytest.raises(BadKey):
        SigningKey.load(path)


@needs_ssh_keygen
@pytest.mark.parametrize(
    ("args", "accepted"),
    [
        (["-t", "ecdsa", "-b", "256"], True),
        (["-t", "ed25519"], True),
        (["-t", "ecdsa", "-b", "384"], False),
        (["-t", "ed25519", "-N", "passphrase"], False),  # encrypted: refused, never prompts
    ],
    ids=["ecdsa-256", "ed25519", "ecdsa-384", "encrypted"],
)
def test_keys_made_by_ssh_keygen(tmp_path, args, accepted):
    path = tmp_path / "id"
    passphrase = [] if "-N" in args else ["-N", ""]
    subprocess.run(["ssh-keygen", "-q", *passphrase, *args, "-f", str(path)], check=True, capture_output=True)
    if accepted:
        assert SigningKey.load(path).public == PublicKey.load(f"{path}.pub")
    else:
        with pytest.raises(BadKey):
            SigningKey.load(path)


def test_missing_key_file_refused(tmp_path):
    with pytest.raises(BadKey, match="cannot read"):
        SigningKey.load(tmp_path / "absent")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o700], ids=oct)
def test_private_key_others_may_read_is_refused(tmp_path, mode):
    """As ssh does (issue 15, item 13): a release or volunteer key readable by others is not loaded."""
    path = SigningKey.generate("coordinator").save(tmp_path / "release_key")
    os.chmod(path, mode)
    if mode & 0o077:
        with pytest.raises(BadKey, match=rf"accessible by others \(mode {mode:04o}\).*chmod 600"):
            SigningKey.load(path)
        os.chmod(path, 0o600)
    assert SigningKey.load(path).public == PublicKey.load(f"{path}.pub")
