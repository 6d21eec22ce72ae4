"""Signed releases and the chain a downloader verifies from a pinned key."""

import base64
import dataclasses
import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loracommons.protocol.canonical import canonical_json
from loracommons.protocol.errors import (
    BadSignature,
    ChainError,
    Malformed,
    MissingField,
    ProtocolError,
    Rollback,
    UnknownField,
    UnsupportedVersion,
    UntrustedKey,
)
from loracommons.protocol.identity import SigningKey
from loracommons.protocol.release import (
    FORMAT_VERSION,
    ReleaseManifest,
    SignedRelease,
    check_file_name,
    sign_release,
    updates_digest,
    verify_chain,
    verify_release,
)

KEY = SigningKey.generate("coordinator")
OTHER = SigningKey.generate("coordinator")
PINNED = KEY.public


def files(version: int) -> dict:
    def entry(content: bytes) -> dict:
        return {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}

    return {
        "adapter_config.json": entry(b'{"r": 16}'),
        "adapter_model.safetensors": entry(f"weights v{version}".encode()),
        "README.md": entry(b"# community adapter"),
    }


def manifest(version: int, previous: str, key: SigningKey = KEY, **overrides) -> ReleaseManifest:
    fields = {
        "format_version": FORMAT_VERSION,
        "project_id": "demo",
        "version": version,
        "round": 2 * version,
        "base_model_id": "loracommons/demo-tiny",
        "base_model_revision": "main",
        "files": files(version),
        "previous": previous,
        "updates_digest": updates_digest([f"{version:064x}"]),
        "metrics": {"eval_loss": 1.0 / version, "volunteers": 3},
        "created": f"2025-01-0{version}T00:00:00Z",
        "signer": key.public.openssh,
        **overrides,
    }
    return ReleaseManifest(**fields)


def chain(n: int, key: SigningKey = KEY, start: SignedRelease | None = None) -> list[SignedRelease]:
    out, previous = [], start.digest if start else ""
    first = json.loads(start.manifest)["version"] + 1 if start else 1
    for version in range(first, first + n):
        signed = sign_release(key, manifest(version, previous, key))
        out.append(signed)
        previous = signed.digest
    return out


CHAIN = chain(4)


def resigned(release: SignedRelease, key: SigningKey = KEY, **changes) -> SignedRelease:
    """`release` with fields changed, signed again (signer field set to `key`)."""
    obj = {**json.loads(release.manifest), **changes, "signer": key.public.openssh}
    return sign_release(key, ReleaseManifest.from_dict(obj))


# ---------------------------------------------------------------- the chain


def test_valid_chain_of_four_verifies():
    manifests = verify_chain(CHAIN, PINNED)
    assert [m.version for m in manifests] == [1, 2, 3, 4]
    assert manifests[0].previous == ""
    assert [m.previous for m in manifests[1:]] == [r.digest for r in CHAIN[:3]]


@pytest.mark.parametrize(
    "pinned",
    [PINNED, PINNED.fingerprint, PINNED.fingerprint.upper(), PINNED.fingerprint[:32]],
    ids=["key", "fingerprint", "upper", "prefix-32"],
)
def test_pinned_key_forms(pinned):
    assert len(verify_chain(CHAIN, pinned)) == 4


@pytest.mark.parametrize(
    "pinned",
    # 64 bits (the 16-digit display form) is within reach of a collision search: at least 128 bits
    ["", PINNED.fingerprint[:15], PINNED.short, PINNED.fingerprint[:16], PINNED.fingerprint[:31], "0" * 64,
     OTHER.public],
    ids=["empty", "prefix-15", "short-display", "prefix-16", "prefix-31", "zeros", "other"],
)
def test_unpinned_or_short_pin_refused(pinned):
    with pytest.raises(UntrustedKey):
        verify_chain(CHAIN, pinned)


@pytest.mark.parametrize(
    ("order", "error"),
    [
        ([0, 1, 3], ChainError),  # gap
        ([1, 2, 3], ChainError),  # does not start at 1
        ([0, 2, 1, 3], ChainError),  # reorder: 3 after 1 is a gap
        ([1, 0, 2, 3], ChainError),  # reorder: starts at 2
        ([0, 1, 3, 2], ChainError),
        ([0, 1, 2, 1], Rollback),  # older version after a newer one
        ([0, 1, 1], Rollback),  # the same version again
        ([0, 0], Rollback),
    ],
    ids=["gap", "no-start", "swap-2-3", "swap-1-2", "swap-3-4", "older", "repeat", "repeat-first"],
)
def test_broken_order_refused(order, error):
    with pytest.raises(error) as info:
        verify_chain([CHAIN[i] for i in order], PINNED)
    if error is ChainError:
        assert not isinstance(info.value, Rollback)


def test_continue_after_a_seen_release():
    assert [m.version for m in verify_chain(CHAIN[2:], PINNED, after=CHAIN[1])] == [3, 4]
    assert verify_chain([], PINNED, after=CHAIN[3]) == []
    more = chain(2, start=CHAIN[3])
    assert [m.version for m in verify_chain(more, PINNED, after=CHAIN[3])] == [5, 6]


@pytest.mark.parametrize(("after", "releases"), [(3, [1]), (3, [3]), (2, [0, 1, 2])], ids=str)
def test_older_than_seen_is_rollback(after, releases):
    with pytest.raises(Rollback):
        verify_chain([CHAIN[i] for i in releases], PINNED, after=CHAIN[after])


def test_gap_after_a_seen_release():
    with pytest.raises(ChainError, match="gap"):
        verify_chain([CHAIN[3]], PINNED, after=CHAIN[1])


def test_fork_same_version_different_previous():
    fork_2 = resigned(CHAIN[1], metrics={"eval_loss": 0.0})  # another v2, properly signed
    fork_3 = sign_release(KEY, manifest(3, fork_2.digest))
    with pytest.raises(ChainError, match="does not chain"):
        verify_chain([fork_3], PINNED, after=CHAIN[1])
    with pytest.raises(ChainError, match="does not chain"):
        verify_chain([CHAIN[0], fork_2, CHAIN[2]], PINNED)
    assert len(verify_chain([CHAIN[0], fork_2, fork_3], PINNED)) == 3  # a consistent fork on its own


def test_replaced_file_entry_refused():
    entry = {"size": 9, "sha256": hashlib.sha256(b"malicious").hexdigest()}
    obj = json.loads(CHAIN[1].manifest)
    obj["files"]["adapter_model.safetensors"] = entry
    tampered = SignedRelease(canonical_json(obj), CHAIN[1].signature)  # old signature kept
    with pytest.raises(BadSignature):
        verify_chain([CHAIN[0], tampered, *CHAIN[2:]], PINNED)
    by_other = resigned(CHAIN[1], key=OTHER, files={**obj["files"]})  # re-signed by another key
    with pytest.raises(UntrustedKey):
        verify_chain([CHAIN[0], by_other, *CHAIN[2:]], PINNED)
    by_pinned = resigned(CHAIN[1], files={**obj["files"]})  # even by the pinned key: the next link breaks
    with pytest.raises(ChainError):
        verify_chain([CHAIN[0], by_pinned, *CHAIN[2:]], PINNED)


def test_signer_field_pointing_at_pinned_key_but_signed_by_another():
    raw = manifest(1, "").to_bytes()
    forged = SignedRelease(raw, OTHER.sign(b"loracommons/release/v1\x00" + hashlib.sha256(raw).digest()))
    with pytest.raises(BadSignature):
        verify_release(forged, PINNED)


def test_chain_signed_by_a_different_key_refused():
    with pytest.raises(UntrustedKey):
        verify_chain(chain(4, key=OTHER), PINNED)


def test_another_project_in_the_chain_refused():
    other_project = resigned(CHAIN[1], project_id="other")
    with pytest.raises(ChainError, match="project"):
        verify_chain([CHAIN[0], other_project], PINNED)


def test_first_release_must_not_claim_a_previous():
    with pytest.raises(ChainError):
        verify_chain([resigned(CHAIN[0], previous=CHAIN[1].digest)], PINNED)


@settings(max_examples=100, deadline=None)
@given(where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255), signature=st.booleans())
def test_any_single_byte_flip_is_rejected(where, mask, signature):
    release = CHAIN[2]
    data = bytearray(release.signature if signature else release.manifest)
    data[int(where * len(data))] ^= mask
    flipped = (
        SignedRelease(release.manifest, bytes(data))
        if signature
        else SignedRelease(bytes(data), release.signature)
    )
    with pytest.raises(BadSignature if signature else ProtocolError):
        verify_release(flipped, PINNED)


# ---------------------------------------------------------------- the release document


def test_release_json_round_trip():
    for release in CHAIN:
        again = SignedRelease.from_json(release.to_json())
        assert again == release
        assert verify_release(again, PINNED) == ReleaseManifest.from_dict(json.loads(release.manifest))


@pytest.mark.parametrize(
    "document",
    [
        b"not json",
        b"[]",
        b'{"manifest": "{}"}',
        b'{"manifest": "{}", "signature": "", "extra": 1}',
        b'{"manifest": 1, "signature": ""}',
        b'{"manifest": "{}", "signature": "not base64!"}',
        b'{"manifest": "\\ud800", "signature": ""}',
        b'{"manifest": "{}", "signature": "", "manifest": "{}"}',
    ],
    ids=["not-json", "list", "no-signature", "extra", "int", "bad-base64", "lone-surrogate", "duplicate"],
)
def test_malformed_release_document(document):
    with pytest.raises(Malformed):
        SignedRelease.from_json(document)


def test_signature_over_the_manifest_bytes():
    release = CHAIN[0]
    doc = json.loads(release.to_json())
    assert base64.b64decode(doc["signature"]) == release.signature
    assert doc["manifest"].encode() == release.manifest


# ---------------------------------------------------------------- manifest fields


@pytest.mark.parametrize(
    "name",
    [
        *["../x", "/abs", "a/b", ".hidden", "x.bin", "x.pkl", "x.py"],
        *["../x.json", "/abs.json", "a/b.json", ".hidden.json", "x.pt", "x.safetensors.py", "a\\b.json"],
        *["", "x" * 200 + ".json", "a.json\n", "a..json", "dir.json/", "é.json", "..", "."],
    ],
    ids=repr,
)
def test_unsafe_file_names_refused(name):
    with pytest.raises(Malformed):
        check_file_name(name)
    obj = manifest(1, "").to_bytes()
    obj = json.loads(obj)
    obj["files"][name] = {"size": 1, "sha256": "0" * 64}
    with pytest.raises(Malformed):
        ReleaseManifest.from_dict(obj)


@pytest.mark.parametrize(
    "name", ["adapter_model.safetensors", "adapter_config.json", "README.md", "v1-2_3.json", "_x.md"]
)
def test_plain_file_names_accepted(name):
    check_file_name(name)


def _manifest_dict(**changes) -> dict:
    return {**json.loads(manifest(1, "").to_bytes()), **changes}


def _without(name: str) -> dict:
    obj = _manifest_dict()
    del obj[name]
    return obj


@pytest.mark.parametrize(
    ("obj", "error"),
    [
        (_manifest_dict(extra=1), UnknownField),
        (_without("previous"), MissingField),
        (_without("files"), MissingField),
        (_manifest_dict(format_version=2), UnsupportedVersion),
        (_manifest_dict(format_version=True), UnsupportedVersion),
        (_manifest_dict(format_version=1.0), UnsupportedVersion),
        (_manifest_dict(version=-1), Malformed),
        (_manifest_dict(version="2"), Malformed),
        (_manifest_dict(round=True), Malformed),
        (_manifest_dict(project_id=7), Malformed),
        (_manifest_dict(previous="abc"), Malformed),
        (_manifest_dict(previous="A" * 64), Malformed),
        (_manifest_dict(metrics=[]), Malformed),
        (_manifest_dict(files={}), Malformed),
        (_manifest_dict(files=[]), Malformed),
        (_manifest_dict(files={"a.json": {"size": -1, "sha256": "0" * 64}}), Malformed),
        (_manifest_dict(files={"a.json": {"size": True, "sha256": "0" * 64}}), Malformed),
        (_manifest_dict(files={"a.json": {"size": 1, "sha256": "0" * 63}}), Malformed),
        (_manifest_dict(files={"a.json": {"size": 1, "sha256": "0" * 64, "url": "http://x"}}), Malformed),
        (_manifest_dict(files={"a.json": "0" * 64}), Malformed),
    ],
    ids=lambda v: "" if isinstance(v, dict) else v.__name__,
)
def test_bad_manifest_fields(obj, error):
    with pytest.raises(error) as info:
        ReleaseManifest.from_dict(obj)
    assert info.type is error


def test_sign_release_refuses_a_foreign_signer_field():
    with pytest.raises(ValueError, match="signer"):
        sign_release(OTHER, manifest(1, ""))


def test_manifest_round_trip():
    m = manifest(3, "ab" * 32)
    assert ReleaseManifest.from_dict(json.loads(m.to_bytes())) == m
    assert dataclasses.asdict(m)["files"] == files(3)


@settings(max_examples=50, deadline=None)
@given(digests=st.lists(st.binary(min_size=32, max_size=32).map(bytes.hex), max_size=10), data=st.data())
def test_updates_digest_ignores_arrival_order(digests, data):
    shuffled = data.draw(st.permutations(digests))
    assert updates_digest(shuffled) == updates_digest(digests)
    if digests:
        assert updates_digest([*digests, "f" * 64]) != updates_digest(digests)
