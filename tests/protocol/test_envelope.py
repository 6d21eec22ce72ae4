"""Update envelopes: round-trip, tamper detection, and each refusal naming its reason."""

import hashlib
import io
import json
import os
import pickle
import struct
import tracemalloc
import types
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loracommons.protocol import envelope as envelope_module
from loracommons.protocol.canonical import canonical_json
from loracommons.protocol.codec import DTYPES, TensorSpec, encode_tensors
from loracommons.protocol.envelope import (
    FORMAT_VERSION,
    MAX_MANIFEST_BYTES,
    Envelope,
    Expected,
    _signed_message,
    open_envelope,
    sign_update,
    verify_update,
)
from loracommons.protocol.errors import (
    BadKey,
    BadSignature,
    BadTensor,
    DigestMismatch,
    Malformed,
    MissingField,
    NonFinite,
    ProtocolError,
    TooLarge,
    UnknownField,
    UnsupportedVersion,
    WrongBase,
    WrongNonce,
    WrongProject,
    WrongRound,
)
from loracommons.protocol.identity import SigningKey
from loracommons.protocol.task import LoraSettings

KEY = SigningKey.generate("volunteer")
OTHER = SigningKey.generate("volunteer")
A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
SHAPES = {A: (2, 4), B: (4, 2)}
SPEC = TensorSpec(SHAPES)
TENSORS = {A: np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4), B: np.full((4, 2), 0.25, np.float32)}
CLAIMS = {
    "project_id": "demo",
    "round": 3,
    "nonce": "9f" * 16,
    "base_adapter_digest": hashlib.sha256(b"global adapter v2").hexdigest(),
    "base_model_id": "loracommons/demo-tiny",
    "base_model_revision": "main",
    "lora_config_digest": LoraSettings().digest(),
}


def claims(**overrides) -> dict:
    sender = {"payload_dtype": "float32", "examples": 128, "steps": 20, "train_loss": 1.25}
    return {**CLAIMS, **sender, **overrides}


def expected(**overrides) -> Expected:
    fields = {**CLAIMS, "spec": SPEC, "max_payload_bytes": SPEC.payload_bytes("float32"), **overrides}
    return Expected(**fields)


def signed(tensors=None, dtype: str = "float32", key: SigningKey = KEY, **overrides) -> Envelope:
    payload = encode_tensors(TENSORS if tensors is None else tensors, dtype)
    return sign_update(key, payload, **claims(payload_dtype=dtype, **overrides))


def resigned(manifest: bytes, payload: bytes, key: SigningKey = KEY) -> Envelope:
    """An envelope whose manifest bytes are exactly `manifest`, correctly signed by `key`."""
    return Envelope(manifest, payload, key.sign(_signed_message(manifest)))


def edited(env: Envelope, **changes) -> Envelope:
    obj = json.loads(env.manifest)
    obj.update(changes)
    return resigned(canonical_json(obj), env.payload)


# ---------------------------------------------------------------- round trip

# At most 8 significant bits and a small exponent: exact in float32, float16 and bfloat16.
exact_values = st.builds(
    lambda sign, mantissa, exponent: sign * mantissa * 2.0**exponent,
    st.sampled_from([1.0, -1.0]),
    st.integers(0, 255),
    st.integers(-20, 7),
)


@st.composite
def tensor_dicts(draw) -> dict[str, np.ndarray]:
    keys = draw(st.lists(st.text("abcdefgh._0123456789", min_size=1, max_size=30), max_size=4, unique=True))
    out = {}
    for key in keys:
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        size = int(np.prod(shape))
        values = draw(st.lists(exact_values, min_size=size, max_size=size))
        out[key] = np.array(values, np.float32).reshape(shape)
    return out


manifest_values = st.fixed_dictionaries(
    {
        "project_id": st.text(min_size=1, max_size=40),
        "round": st.integers(0, 2**53),
        "nonce": st.binary(min_size=16, max_size=16).map(bytes.hex),
        "base_adapter_digest": st.binary(min_size=32, max_size=32).map(bytes.hex),
        "base_model_id": st.text(max_size=60),
        "base_model_revision": st.text(max_size=40),
        "lora_config_digest": st.binary(min_size=32, max_size=32).map(bytes.hex),
        "examples": st.integers(0, 2**63 - 1),  # what SQLite holds; 2**63 is Malformed
        "steps": st.integers(0, 10**6),
        "train_loss": st.floats(allow_nan=False, allow_infinity=False),
    }
)


@settings(max_examples=40, deadline=None)
@given(tensors=tensor_dicts(), dtype=st.sampled_from(sorted(DTYPES)), values=manifest_values)
def test_round_trip(tensors, dtype, values):
    payload = encode_tensors(tensors, dtype)
    env = sign_update(KEY, payload, payload_dtype=dtype, **values)
    spec = TensorSpec({k: v.shape for k, v in tensors.items()}, frozenset({dtype}))
    claims_only = {k: v for k, v in values.items() if k not in ("examples", "steps", "train_loss")}
    manifest, out = verify_update(env, Expected(**claims_only, spec=spec, max_payload_bytes=len(payload)))
    for name, value in values.items():
        assert getattr(manifest, name) == value
    assert (manifest.format_version, manifest.payload_dtype) == (FORMAT_VERSION, dtype)
    assert manifest.payload_bytes == len(payload)
    assert manifest.payload_sha256 == hashlib.sha256(payload).hexdigest()
    assert manifest.signer == KEY.public.openssh
    assert set(out) == set(tensors)
    for name, arr in tensors.items():
        np.testing.assert_array_equal(out[name].astype(np.float32), arr)
    # The three byte strings travel unchanged: a copy verifies to the same update.
    copy = Envelope(bytes(env.manifest), bytes(env.payload), bytes(env.signature))
    assert copy.digest == env.digest == hashlib.sha256(env.manifest).hexdigest()


def test_open_envelope_names_the_signer():
    manifest, signer = open_envelope(signed(key=OTHER), max_payload_bytes=1 << 20)
    assert signer == OTHER.public and manifest.signer == OTHER.public.openssh


# ---------------------------------------------------------------- byte flips

SMALL = signed()
PARTS = ("manifest", "payload", "signature")
#: What a flip in each part must raise (a manifest flip fails parsing, a field check or the signature).
FLIP_ERROR = {"manifest": ProtocolError, "payload": DigestMismatch, "signature": BadSignature}


def flipped(env: Envelope, part: str, position: int, mask: int) -> Envelope:
    data = bytearray(getattr(env, part))
    data[position] ^= mask
    return Envelope(**{**env.__dict__, part: bytes(data)})


def test_small_envelope_verifies():
    verify_update(SMALL, expected())


@settings(max_examples=150, deadline=None)
@given(part=st.sampled_from(PARTS), where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_any_single_byte_flip_is_rejected(part, where, mask):
    position = int(where * len(getattr(SMALL, part)))
    with pytest.raises(FLIP_ERROR[part]):
        verify_update(flipped(SMALL, part, position, mask), expected())


@pytest.mark.parametrize("mask", [1 << bit for bit in range(8)] + [0xFF], ids=hex)
@pytest.mark.parametrize("part", PARTS)
def test_exhaustive_flip_sweep(part, mask):
    """Every byte position of a small envelope, flipped: each one raises from the error family."""
    size = len(getattr(SMALL, part))
    assert size > 50
    escaped = []
    for position in range(size):
        try:
            verify_update(flipped(SMALL, part, position, mask), expected())
        except FLIP_ERROR[part]:
            continue
        except Exception as exc:  # noqa: BLE001 - anything else is what this test looks for
            escaped.append((position, type(exc).__name__))
        else:
            escaped.append((position, "accepted"))
    assert escaped == []


# ---------------------------------------------------------------- claims


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("project_id", "another-project", WrongProject),
        ("round", 2, WrongRound),
        ("round", 4, WrongRound),
        ("nonce", "00" * 16, WrongNonce),
        ("base_adapter_digest", hashlib.sha256(b"global adapter v1").hexdigest(), WrongBase),
        ("base_model_id", "meta-llama/Llama-3.2-1B", WrongBase),
        ("base_model_revision", "v2", WrongBase),
        ("lora_config_digest", LoraSettings(r=8).digest(), WrongBase),
    ],
)
def test_claim_mismatch_raises_its_reason(field, value, error):
    env = signed(**{field: value})
    with pytest.raises(error) as info:
        verify_update(env, expected())
    assert info.type is error  # the specific reason, not a sibling
    verify_update(env, expected(**{field: value}))  # the same envelope is fine for that round


def test_stale_nonce_from_an_earlier_round_is_refused():
    old = signed(round=3, nonce="aa" * 16)
    with pytest.raises(WrongNonce):
        verify_update(old, expected(round=3, nonce="bb" * 16))
    with pytest.raises(WrongRound):
        verify_update(old, expected(round=4, nonce="bb" * 16))


def test_signature_by_another_key_than_the_claimed_signer():
    raw = sign_update(KEY, SMALL.payload, **claims()).manifest  # signer field: KEY
    with pytest.raises(BadSignature):
        verify_update(resigned(raw, SMALL.payload, key=OTHER), expected())


def test_signer_swapped_to_another_key():
    with pytest.raises(BadSignature):
        verify_update(
            Envelope(edited(SMALL, signer=OTHER.public.openssh).manifest, SMALL.payload, SMALL.signature),
            expected(),
        )


def test_signature_from_another_envelope():
    twin = signed(train_loss=1.5)
    with pytest.raises(BadSignature):
        verify_update(Envelope(SMALL.manifest, SMALL.payload, twin.signature), expected())


# ---------------------------------------------------------------- manifest structure


def _manifest(**changes) -> dict:
    return {**json.loads(SMALL.manifest), **changes}


def _without(name: str) -> bytes:
    obj = _manifest()
    del obj[name]
    return canonical_json(obj)


MANIFESTS = {
    "unknown-field": (canonical_json(_manifest(admin=True)), UnknownField),
    "missing-nonce": (_without("nonce"), MissingField),
    "missing-signer": (_without("signer"), MissingField),
    "duplicate-key": (SMALL.manifest[:-1] + b',"round":4}', Malformed),
    "indented": (json.dumps(_manifest(), sort_keys=True, indent=1).encode(), Malformed),
    "unsorted": (json.dumps(dict(reversed(_manifest().items())), separators=(",", ":")).encode(), Malformed),
    "escaped-same-text": (SMALL.manifest.replace(b'"demo"', b'"\\u0064emo"'), Malformed),
    "lone-surrogate": (SMALL.manifest.replace(b'"demo"', b'"\\ud800"'), Malformed),
    "format-2": (canonical_json(_manifest(format_version=2)), UnsupportedVersion),
    "round-float": (canonical_json(_manifest(round=3.0)), Malformed),
    "round-bool": (canonical_json(_manifest(round=True)), Malformed),
    "round-string": (canonical_json(_manifest(round="3")), Malformed),
    "examples-negative": (canonical_json(_manifest(examples=-1)), Malformed),
    "loss-string": (canonical_json(_manifest(train_loss="low")), Malformed),
    "loss-overflow": (SMALL.manifest.replace(b'"train_loss":1.25', b'"train_loss":1e999'), Malformed),
    "loss-nan": (SMALL.manifest.replace(b'"train_loss":1.25', b'"train_loss":NaN'), Malformed),
    "dtype-int8": (canonical_json(_manifest(payload_dtype="int8")), Malformed),
    "signer-rsa": (canonical_json(_manifest(signer="ssh-rsa AAAAB3NzaC1yc2E=")), BadKey),
    "signer-garbage": (canonical_json(_manifest(signer="ecdsa-sha2-nistp256 AAAA")), BadKey),
    "not-json": (b"manifest", Malformed),
    "empty": (b"", Malformed),
    "a-list": (b"[]", Malformed),
    "not-utf8": (b'{"\xff":1}', Malformed),
    "too-large": (canonical_json(_manifest(project_id="x" * MAX_MANIFEST_BYTES)), TooLarge),
    "eval-negative": (canonical_json(_manifest(eval_loss=-1e6, eval_tokens=10)), Malformed),
    "eval-null": (canonical_json(_manifest(eval_loss=None, eval_tokens=10)), Malformed),
    "eval-string": (canonical_json(_manifest(eval_loss="low", eval_tokens=10)), Malformed),
    "eval-overflow": (canonical_json(_manifest(eval_loss=10**400, eval_tokens=10)), Malformed),
    "eval-no-tokens": (canonical_json(_manifest(eval_loss=2.0, eval_tokens=0)), Malformed),
    "eval-huge-tokens": (canonical_json(_manifest(eval_loss=2.0, eval_tokens=10**400)), Malformed),
    "eval-alone": (canonical_json(_manifest(eval_loss=2.0)), MissingField),
    "eval-tokens-alone": (canonical_json(_manifest(eval_tokens=10)), MissingField),
    "rank-string": (canonical_json(_manifest(rank="4")), Malformed),
    "rank-float": (canonical_json(_manifest(rank=4.0)), Malformed),
    "rank-null": (canonical_json(_manifest(rank=None)), Malformed),
    "rank-bool": (canonical_json(_manifest(rank=True)), Malformed),
}


def test_rank_is_optional_signed_and_read_back():
    """Nested ranks: the rank a sender trained is signed; absent, the manifest is what it always was.
    (Its bounds are the round's to check: admission refuses 0, negatives and ranks above the project's.)"""
    manifest, _ = verify_update(SMALL, expected())
    assert manifest.rank is None and b'"rank"' not in SMALL.manifest
    declared = signed(rank=4)
    assert b'"rank":4' in declared.manifest and verify_update(declared, expected())[0].rank == 4


def test_eval_claim_is_optional_signed_and_read_back():
    """Federated evaluation rides on the update: absent, the manifest is what it always was."""
    manifest, _ = verify_update(SMALL, expected())
    assert manifest.eval_loss is None and manifest.eval_tokens == 0 and b"eval_" not in SMALL.manifest
    scored = signed(eval_loss=2.5, eval_tokens=120)
    manifest, _ = verify_update(scored, expected())
    assert (manifest.eval_loss, manifest.eval_tokens) == (2.5, 120) and isinstance(manifest.eval_loss, float)
    whole = signed(eval_loss=3, eval_tokens=1)  # an integer loss reads as a float
    assert verify_update(whole, expected())[0].eval_loss == 3.0


@pytest.mark.parametrize(("manifest", "error"), MANIFESTS.values(), ids=MANIFESTS.keys())
def test_bad_manifest_refused(manifest, error):
    """Each manifest is correctly signed by the key it names, so only its structure is wrong."""
    with pytest.raises(error) as info:
        verify_update(resigned(manifest, SMALL.payload), expected())
    assert info.type is error


def test_unsorted_manifest_is_really_unsorted():
    assert MANIFESTS["unsorted"][0] != SMALL.manifest and json.loads(MANIFESTS["unsorted"][0]) == _manifest()


def test_oversized_signature_refused():
    with pytest.raises(TooLarge):
        verify_update(Envelope(SMALL.manifest, SMALL.payload, SMALL.signature * 4), expected())


# ---------------------------------------------------------------- payload


def test_oversize_payload_refused_before_hashing(monkeypatch):
    hashed = []

    def spy(data=b""):
        hashed.append(len(data))
        return hashlib.sha256(data)

    monkeypatch.setattr(envelope_module, "hashlib", types.SimpleNamespace(sha256=spy))
    big = signed(tensors={A: np.zeros((2, 4), np.float32), B: np.zeros((4, 100_000), np.float32)})
    assert len(big.payload) > expected().max_payload_bytes
    hashed.clear()
    with pytest.raises(TooLarge, match="payload"):
        verify_update(big, expected())
    assert hashed == []
    verify_update(SMALL, expected())  # the spy does see a normal verification
    assert len(SMALL.payload) in hashed


def test_payload_swapped_for_another():
    other = signed(tensors={A: TENSORS[A], B: TENSORS[B] * 2})
    assert len(other.payload) == len(SMALL.payload)
    with pytest.raises(DigestMismatch):
        verify_update(Envelope(SMALL.manifest, other.payload, SMALL.signature), expected())


def test_payload_length_claim_must_match():
    with pytest.raises(DigestMismatch):
        verify_update(edited(SMALL, payload_bytes=len(SMALL.payload) + 1), expected())


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        ({A: TENSORS[A]}, "missing"),
        ({**TENSORS, "base_model.model.lm_head.weight": np.zeros((2, 2), np.float32)}, "unexpected"),
        ({A: TENSORS[A].T.copy(), B: TENSORS[B]}, "shape"),
        ({A: TENSORS[A], B: np.zeros((4, 3), np.float32)}, "shape"),
    ],
    ids=["missing", "extra", "transposed", "wrong-rank"],
)
def test_wrong_names_or_shapes_refused(tensors, match):
    with pytest.raises(BadTensor, match=match):
        verify_update(signed(tensors=tensors), expected())


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_refused(dtype, bad):
    tensors = {A: TENSORS[A].copy(), B: TENSORS[B].copy()}
    tensors[B][2, 1] = bad
    with pytest.raises(NonFinite):
        verify_update(signed(tensors=tensors, dtype=dtype), expected())


def test_dtype_must_be_allowed_by_the_round():
    env = signed(dtype="float16")
    with pytest.raises(BadTensor, match="dtype"):
        verify_update(env, expected(spec=TensorSpec(SHAPES, frozenset({"float32"}))))
    verify_update(env, expected())


def test_dtype_must_match_the_signed_claim():
    """A manifest that says float32 over bfloat16 tensors signs a false claim."""
    payload = encode_tensors(TENSORS, "bfloat16")
    with pytest.raises(BadTensor, match="dtype"):
        verify_update(sign_update(KEY, payload, **claims(payload_dtype="float32")), expected())


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(TENSORS))
    return buf.getvalue()


def _header(obj: dict, body: bytes = b"", length: int | None = None) -> bytes:
    text = json.dumps(obj).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + body


NOT_SAFETENSORS = {
    "pickle": pickle.dumps({A: TENSORS[A].tolist(), B: TENSORS[B].tolist()}),
    "zip": _zip(),
    "random": os.urandom(300),
    "truncated-header": SMALL.payload[:40],
    "oversized-header-length": struct.pack("<Q", 2**62) + SMALL.payload[8:],
    "huge-shapes": _header(
        {
            A: {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 32]},
            B: {"dtype": "F32", "shape": [4, 2], "data_offsets": [32, 64]},
        },
        b"\0" * 64,
    ),
}


@pytest.mark.parametrize("payload", NOT_SAFETENSORS.values(), ids=NOT_SAFETENSORS.keys())
def test_signed_payload_that_is_not_safetensors(payload):
    env = sign_update(KEY, payload, **claims())
    tracemalloc.start()
    try:
        with pytest.raises(BadTensor):
            verify_update(env, expected())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"peak allocation {peak} bytes"


def test_claims_are_checked_before_the_payload_is_parsed():
    env = sign_update(KEY, NOT_SAFETENSORS["pickle"], **claims(project_id="elsewhere"))
    with pytest.raises(WrongProject):
        verify_update(env, expected())
