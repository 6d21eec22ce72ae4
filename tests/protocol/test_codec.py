"""Tensor codec: round-trips, and untrusted bytes refused before any large allocation."""

import io
import json
import os
import pickle
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as st_save

from loracommons.protocol.codec import (
    DTYPES,
    MAX_HEADER_BYTES,
    MAX_TENSORS,
    TensorSpec,
    _to_bf16_bits,
    decode_tensors,
    encode_tensors,
)
from loracommons.protocol.errors import BadTensor, NonFinite, ProtocolError, TooLarge

LIMIT = 1 << 20
NAME_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
NAME_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
SPEC = TensorSpec({NAME_A: (4, 8), NAME_B: (8, 4)})


def lora_tensors(value: float = 0.5) -> dict[str, np.ndarray]:
    return {NAME_A: np.full((4, 8), value, np.float32), NAME_B: np.full((8, 4), -value, np.float32)}


def raw_safetensors(header: object, body: bytes = b"", header_len: int | None = None) -> bytes:
    """Hand-made safetensors bytes: 8-byte little-endian length, JSON header, body."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if header_len is None else header_len) + text + body


# Values with at most 8 significant bits and a small exponent: exact in float32, float16 and bfloat16.
exact_values = st.builds(
    lambda sign, mantissa, exponent: sign * mantissa * 2.0**exponent,
    st.sampled_from([1.0, -1.0]),
    st.integers(0, 255),
    st.integers(-20, 7),
)
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
names = st.text(alphabet="abcdefghij._0123456789", min_size=1, max_size=40)


@st.composite
def tensor_dicts(draw, max_tensors: int = 4) -> dict[str, np.ndarray]:
    keys = draw(st.lists(names, min_size=0, max_size=max_tensors, unique=True))
    out = {}
    for key in keys:
        shape = draw(shapes)
        values = draw(st.lists(exact_values, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
        out[key] = np.array(values, dtype=np.float32).reshape(shape)
    return out


@settings(max_examples=60, deadline=None)
@given(tensors=tensor_dicts(), dtype=st.sampled_from(sorted(DTYPES)))
def test_round_trip_exact_in_every_dtype(tensors, dtype):
    data = encode_tensors(tensors, dtype)
    spec = TensorSpec({k: v.shape for k, v in tensors.items()}, frozenset({dtype}))
    out = decode_tensors(data, max_bytes=len(data), spec=spec)
    assert set(out) == set(tensors)
    for key, arr in tensors.items():
        assert out[key].shape == arr.shape
        np.testing.assert_array_equal(out[key].astype(np.float32), arr)
        assert not out[key].flags.writeable
    assert len(data) <= spec.payload_bytes(dtype)


@pytest.mark.parametrize(
    ("dtype", "numpy_dtype"), [("float32", np.float32), ("float16", np.float16), ("bfloat16", np.float32)]
)
def test_decoded_dtype(dtype, numpy_dtype):
    out = decode_tensors(encode_tensors(lora_tensors(), dtype), max_bytes=LIMIT, spec=SPEC)
    assert {a.dtype for a in out.values()} == {np.dtype(numpy_dtype)}


def test_float32_decode_is_a_zero_copy_view():
    data = encode_tensors(lora_tensors())
    out = decode_tensors(data, max_bytes=LIMIT)
    assert all(np.shares_memory(arr, np.frombuffer(data, np.uint8)) for arr in out.values())


def test_bfloat16_rounds_to_nearest_even():
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.4e38], np.float32)
    out = decode_tensors(encode_tensors({"x": x}, "bfloat16"), max_bytes=LIMIT, require_finite=False)["x"]
    np.testing.assert_array_equal(out, [1.0, 1.0, 1.0 + 2**-6, np.inf])  # ties to even; overflow is Inf


@pytest.mark.parametrize("bits", [0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFC00001])
def test_bfloat16_keeps_every_nan_a_nan(bits):
    """Rounding once carried NaN mantissas into the exponent and sign, turning NaN into 0.0 or Inf."""
    nan = np.array([bits], np.uint32).view(np.float32)
    assert _to_bf16_bits(nan)[0] == 0x7FC0


def test_unsupported_encode_dtype():
    with pytest.raises(ValueError, match="unsupported dtype"):
        encode_tensors(lora_tensors(), "float64")


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_refused_in_each_dtype(dtype, bad):
    tensors = lora_tensors()
    tensors[NAME_B][3, 1] = bad
    data = encode_tensors(tensors, dtype)
    with pytest.raises(NonFinite, match="NaN or Inf"):
        decode_tensors(data, max_bytes=LIMIT, spec=SPEC)
    assert set(decode_tensors(data, max_bytes=LIMIT, require_finite=False)) == {NAME_A, NAME_B}


@pytest.mark.parametrize(
    ("tensors", "spec", "match"),
    [
        ({NAME_A: np.zeros((4, 8), np.float32)}, SPEC, "missing"),
        ({**lora_tensors(), "extra": np.zeros(1, np.float32)}, SPEC, "unexpected"),
        ({NAME_A: np.zeros((4, 8), np.float32), "x.lora_B": np.zeros((8, 4), np.float32)}, SPEC, "differ"),
        ({NAME_A: np.zeros((8, 4), np.float32), NAME_B: np.zeros((8, 4), np.float32)}, SPEC, "shape"),
        ({NAME_A: np.zeros((4, 8, 1), np.float32), NAME_B: np.zeros((8, 4), np.float32)}, SPEC, "shape"),
        ({NAME_A: np.zeros(32, np.float32), NAME_B: np.zeros((8, 4), np.float32)}, SPEC, "shape"),
        ({}, SPEC, "missing"),
        (lora_tensors(), TensorSpec(SPEC.shapes, frozenset({"bfloat16"})), "dtype"),
    ],
    ids=["missing", "extra", "renamed", "transposed", "extra-dim", "flattened", "empty", "dtype-not-allowed"],
)
def test_spec_mismatch_refused(tensors, spec, match):
    with pytest.raises(BadTensor, match=match):
        decode_tensors(encode_tensors(tensors, "float32"), max_bytes=LIMIT, spec=spec)


@pytest.mark.parametrize(
    "array",
    [np.zeros(4, np.float64), np.zeros(4, np.int32), np.zeros(4, np.uint8), np.zeros(4, np.bool_)],
    ids=["F64", "I32", "U8", "BOOL"],
)
def test_disallowed_safetensors_dtype(array):
    data = st_save({"x": array})
    with pytest.raises(BadTensor, match="not allowed"):
        decode_tensors(data, max_bytes=LIMIT)


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": [1.0, 2.0]}))
    return buf.getvalue()


F32_4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
NOT_SAFETENSORS = {
    "pickle": pickle.dumps({NAME_A: [[0.5] * 8] * 4}),
    "pickle-proto0": pickle.dumps([1, 2, 3], protocol=0),
    "zip": _zip_bytes(),
    "random": os.urandom(4096),
    "empty": b"",
    "seven-bytes": b"\x01" * 7,
    "truncated-header": encode_tensors(lora_tensors())[:20],
    "truncated-body": encode_tensors(lora_tensors())[:-1],
    "trailing-bytes": encode_tensors(lora_tensors()) + b"\x00" * 4,
    "header-len-past-end": raw_safetensors({"x": F32_4}, b"\0" * 16, header_len=10_000),
    "header-len-2**63": raw_safetensors({"x": F32_4}, b"\0" * 16, header_len=2**63),
    "header-len-2**64-1": raw_safetensors(b"{}", header_len=2**64 - 1),
    "header-over-limit": raw_safetensors(b"{" + b" " * MAX_HEADER_BYTES + b"}"),
    "header-not-json": raw_safetensors(b"{not json", b""),
    "header-not-utf8": raw_safetensors(b'{"\xff": 1}'),
    "header-a-list": raw_safetensors([1, 2]),
    "header-dup-key": raw_safetensors(
        b'{"x":' + json.dumps(F32_4).encode() + b',"x":' + json.dumps(F32_4).encode() + b"}", b"\0" * 16
    ),
    "entry-not-object": raw_safetensors({"x": [1]}),
    "entry-extra-key": raw_safetensors({"x": {**F32_4, "eval": "os.system"}}, b"\0" * 16),
    "entry-missing-offsets": raw_safetensors({"x": {"dtype": "F32", "shape": [4]}}, b"\0" * 16),
    "unknown-dtype": raw_safetensors({"x": {**F32_4, "dtype": "OBJ"}}, b"\0" * 16),
    "negative-dim": raw_safetensors({"x": {**F32_4, "shape": [-4]}}, b"\0" * 16),
    "float-dim": raw_safetensors({"x": {**F32_4, "shape": [4.0]}}, b"\0" * 16),
    "bool-dim": raw_safetensors({"x": {**F32_4, "shape": [True, 4]}}, b"\0" * 16),
    "nine-dims": raw_safetensors({"x": {**F32_4, "shape": [1] * 8 + [4]}}, b"\0" * 16),
    "huge-shape": raw_safetensors({"x": {**F32_4, "shape": [2**40, 2**40]}}, b"\0" * 16),
    "huge-shape-and-offsets": raw_safetensors(
        {"x": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 2**82]}}, b"\0" * 16
    ),
    "offsets-past-end": raw_safetensors({"x": {**F32_4, "data_offsets": [0, 32]}}, b"\0" * 16),
    "offsets-reversed": raw_safetensors({"x": {**F32_4, "data_offsets": [16, 0]}}, b"\0" * 16),
    "offsets-negative": raw_safetensors({"x": {**F32_4, "data_offsets": [-16, 0]}}, b"\0" * 16),
    "offsets-three": raw_safetensors({"x": {**F32_4, "data_offsets": [0, 8, 16]}}, b"\0" * 16),
    "overlap": raw_safetensors({"x": F32_4, "y": F32_4}, b"\0" * 16),
    "hole": raw_safetensors({"x": {**F32_4, "data_offsets": [4, 20]}}, b"\0" * 20),
    "too-many-tensors": raw_safetensors(
        {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(MAX_TENSORS + 1)}
    ),
    "name-too-long": raw_safetensors({"x" * 600: F32_4}, b"\0" * 16),
}


@pytest.mark.parametrize("data", NOT_SAFETENSORS.values(), ids=NOT_SAFETENSORS.keys())
def test_not_safetensors_refused(data):
    with pytest.raises(BadTensor):
        decode_tensors(data, max_bytes=len(data) + 1)


@pytest.mark.parametrize(
    "name", ["huge-shape", "huge-shape-and-offsets", "header-len-2**63", "header-len-2**64-1", "pickle"]
)
def test_refused_before_any_large_allocation(name):
    data = NOT_SAFETENSORS[name]
    tracemalloc.start()
    try:
        with pytest.raises(BadTensor):
            decode_tensors(data, max_bytes=len(data) + 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"peak allocation {peak} bytes"


def test_too_large_before_reading_anything():
    data = encode_tensors(lora_tensors())
    with pytest.raises(TooLarge):
        decode_tensors(data, max_bytes=len(data) - 1)
    with pytest.raises(TooLarge):  # even garbage: the size is checked first
        decode_tensors(b"\xff" * 100, max_bytes=99)
    assert decode_tensors(data, max_bytes=len(data))


def test_metadata_is_ignored_and_empty_tensors_are_fine():
    tensors = {"empty": np.zeros((0, 3), np.float32), "scalar": np.float32(2.0)}
    out = decode_tensors(encode_tensors(tensors, metadata={"format": "pt"}), max_bytes=LIMIT)
    assert out["empty"].shape == (0, 3) and float(out["scalar"]) == 2.0


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=512))
def test_arbitrary_bytes_never_escape_the_error_family(data):
    try:
        decode_tensors(data, max_bytes=LIMIT)
    except ProtocolError:
        pass


@settings(max_examples=100, deadline=None)
@given(position=st.integers(0, 10_000), mask=st.integers(1, 255))
def test_flipped_header_byte_decodes_or_fails_cleanly(position, mask):
    data = bytearray(encode_tensors(lora_tensors()))
    data[position % len(data)] ^= mask
    try:
        decode_tensors(bytes(data), max_bytes=LIMIT, spec=SPEC)
    except ProtocolError:
        pass


@settings(max_examples=80, deadline=None)
@given(bits=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=64), code=st.sampled_from(["F16", "BF16"]))
def test_16_bit_finiteness_agrees_with_numpy(bits, code):
    """The 16-bit check works on exponent bits; it must decide exactly as np.isfinite on the values."""
    raw = np.array(bits, np.uint16)
    values = raw.view(np.float16) if code == "F16" else (raw.astype(np.uint32) << 16).view(np.float32)
    entry = {"dtype": code, "shape": [len(bits)], "data_offsets": [0, 2 * len(bits)]}
    data = raw_safetensors({"x": entry}, raw.tobytes())
    if np.isfinite(values).all():
        np.testing.assert_array_equal(decode_tensors(data, max_bytes=LIMIT)["x"], values)
    else:
        with pytest.raises(NonFinite):
            decode_tensors(data, max_bytes=LIMIT)


@pytest.mark.parametrize(
    ("dtype", "values"),
    [
        ("float16", [65504.0, -65504.0, 6e-8, -0.0, 0.0]),
        ("bfloat16", [3.38e38, -3.38e38, 1e-40, -0.0]),
        ("float32", [3.4028235e38, -3.4028235e38, 1e-45, -0.0]),
    ],
)
def test_extreme_finite_values_accepted(dtype, values):
    out = decode_tensors(encode_tensors({"x": np.array(values, np.float32)}, dtype), max_bytes=LIMIT)["x"]
    assert np.isfinite(out).all()
