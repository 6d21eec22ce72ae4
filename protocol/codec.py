"""Named tensors <-> safetensors bytes, and strict validation of untrusted payloads.

Encoding goes through the `safetensors` library. Decoding an untrusted payload
reads the header here first, so that sizes, names, dtypes and shapes are
checked against a hard byte limit and an expected spec before any array is
made; the arrays are then zero-copy views of the payload (bfloat16 is widened
to float32, as numpy has no bfloat16).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import safetensors

from loracommons.protocol.canonical import parse_json
from loracommons.protocol.errors import BadTensor, Malformed, NonFinite, TooLarge

#: dtype name -> (safetensors code, bytes per element)
DTYPES = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}
_CODE_TO_DTYPE = {code: name for name, (code, _) in DTYPES.items()}
_RAW_DTYPE = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}  # bfloat16 as its bits
MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 4096
MAX_NAME_CHARS = 512
MAX_DIM = 1 << 31  # per dimension: a zero-size tensor may not hide a huge one (numpy refuses it)


@dataclass(frozen=True)
class TensorSpec:
    """What a payload must hold: exactly these names with these shapes."""

    shapes: Mapping[str, tuple[int, ...]]
    dtypes: frozenset[str] = frozenset(DTYPES)

    def payload_bytes(self, dtype: str) -> int:
        """Upper bound of a payload in `dtype` matching this spec (header included)."""
        elements = sum(math.prod(s) for s in self.shapes.values())
        return elements * DTYPES[dtype][1] + MAX_HEADER_BYTES // 16 + 64 * len(self.shapes)


def _to_bf16_bits(arr: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even."""
    f32 = np.ascontiguousarray(arr, dtype=np.float32)
    bits = f32.view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> 16).astype(np.uint16)
    # Rounding carries a NaN's mantissa into the exponent or past the sign bit (NaN
    # would become Inf, 0.0 or -0.0): keep it a quiet NaN, as torch does.
    out[np.isnan(f32)] = 0x7FC0
    return out


def _from_bf16_bits(raw: np.ndarray) -> np.ndarray:
    wide = raw.astype(np.uint32)
    wide <<= 16  # in place: one buffer, not two
    out = wide.view(np.float32)
    out.flags.writeable = False  # read-only like the zero-copy float32/float16 views
    return out


def round_tensors(tensors: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """float32 arrays holding exactly the values `dtype` can represent (round to nearest even):
    what a payload in `dtype` decodes to, so encoding the result in `dtype` loses nothing."""
    if dtype == "float32":
        return {name: np.array(value, dtype=np.float32) for name, value in tensors.items()}
    if dtype == "bfloat16":
        return {name: np.array(_from_bf16_bits(_to_bf16_bits(value))) for name, value in tensors.items()}
    if dtype == "float16":
        return {name: np.asarray(value).astype(np.float16).astype(np.float32)
                for name, value in tensors.items()}
    raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(DTYPES)}")


def canonical_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 of the float32 encoding of an adapter: the digest a round task names, which a
    volunteer that rebuilt the adapter from a downlink computes the same way."""
    return hashlib.sha256(encode_tensors(tensors, dtype="float32")).hexdigest()


def encode_tensors(
    tensors: Mapping[str, np.ndarray],
    dtype: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Serialize arrays; `dtype` converts every array (float32, float16 or bfloat16)."""
    keep = []  # buffers must outlive serialize()
    specs = {}
    for name, value in tensors.items():
        arr = np.asarray(value)
        target = dtype or {np.dtype(np.float16): "float16"}.get(arr.dtype, "float32")
        if target not in DTYPES:
            raise ValueError(f"unsupported dtype {target!r}; expected one of {sorted(DTYPES)}")
        if target == "bfloat16":
            buf = _to_bf16_bits(arr)
        else:
            buf = np.ascontiguousarray(arr, dtype=np.dtype(target))
        keep.append(buf)
        specs[name] = safetensors.TensorSpec(
            dtype=target, shape=list(arr.shape), data_ptr=buf.ctypes.data, data_len=buf.nbytes
        )
    out = safetensors.serialize(specs, dict(metadata) if metadata else None)
    del keep
    return bytes(out)


def _read_header(data: bytes | memoryview) -> tuple[dict, int]:
    if len(data) < 8:
        raise BadTensor(f"payload of {len(data)} bytes is too short for safetensors")
    (header_len,) = struct.unpack_from("<Q", data, 0)
    if header_len > MAX_HEADER_BYTES or header_len > len(data) - 8:
        raise BadTensor(f"safetensors header claims {header_len} bytes; payload is {len(data)}")
    try:
        header = parse_json(bytes(data[8 : 8 + header_len]), max_bytes=MAX_HEADER_BYTES,
                            what="safetensors header")
    except Malformed as exc:
        raise BadTensor(str(exc)) from None
    return header, 8 + header_len


def _entry(name: object, meta: object, data_len: int) -> tuple[str, tuple[int, ...], int, int]:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
        raise BadTensor(f"bad tensor name {str(name)[:80]!r}")
    if not isinstance(meta, dict) or set(meta) != {"dtype", "shape", "data_offsets"}:
        raise BadTensor(f"tensor {name!r}: header entry must have dtype, shape, data_offsets")
    code, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(code, str) or code not in _CODE_TO_DTYPE:  # a list or object is unhashable
        raise BadTensor(f"tensor {name!r}: dtype {str(code)[:40]!r} not allowed")
    if (
        not isinstance(shape, list)
        or len(shape) > 8
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_DIM for d in shape)
    ):
        raise BadTensor(f"tensor {name!r}: bad shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_len
    ):
        raise BadTensor(f"tensor {name!r}: bad data offsets {offsets!r}")
    itemsize = DTYPES[_CODE_TO_DTYPE[code]][1]
    if math.prod(shape) * itemsize != offsets[1] - offsets[0]:
        raise BadTensor(f"tensor {name!r}: shape {shape} does not match its {offsets[1] - offsets[0]} bytes")
    return code, tuple(shape), offsets[0], offsets[1]


def decode_tensors(
    data: bytes,
    *,
    max_bytes: int,
    spec: TensorSpec | None = None,
    require_finite: bool = True,
) -> dict[str, np.ndarray]:
    """Parse untrusted safetensors bytes into read-only arrays, validating everything.

    Raises `TooLarge` past `max_bytes` before reading anything, and `BadTensor`
    (or `NonFinite`) for anything else that is not exactly what `spec` expects.
    """
    if len(data) > max_bytes:
        raise TooLarge(f"payload is {len(data)} bytes, limit {max_bytes}")
    view = memoryview(data)
    header, start = _read_header(view)
    header.pop("__metadata__", None)
    if len(header) > MAX_TENSORS:
        raise BadTensor(f"payload holds {len(header)} tensors, limit {MAX_TENSORS}")
    body_len = len(data) - start
    entries = {name: _entry(name, meta, body_len) for name, meta in header.items()}
    covered = sorted((b, e) for _, _, b, e in entries.values())
    position = 0
    for begin, end in covered:
        if begin != position:
            raise BadTensor("tensor data overlaps or leaves holes")
        position = end
    if position != body_len:
        raise BadTensor(f"payload has {body_len - position} trailing bytes after its tensors")
    if spec is not None:
        _check_spec(entries, spec)
    out = {}
    for name, (code, shape, begin, end) in entries.items():
        raw = np.frombuffer(view[start + begin : start + end], dtype=_RAW_DTYPE[code])
        if require_finite and not _all_finite(raw, code):
            raise NonFinite(f"tensor {name!r} holds NaN or Inf")
        out[name] = (_from_bf16_bits(raw) if code == "BF16" else raw).reshape(shape)
    return out


def _all_finite(raw: np.ndarray, code: str) -> bool:
    if code == "F32":
        return bool(np.isfinite(raw).all())
    # 16-bit floats: Inf or NaN iff the exponent bits are all ones. On the bits this is
    # ~15x faster than np.isfinite on float16, and bfloat16 is checked before widening.
    mask = np.uint16(0x7C00 if code == "F16" else 0x7F80)
    return not bool(((raw.view(np.uint16) & mask) == mask).any())


def _check_spec(entries: dict, spec: TensorSpec) -> None:
    names, expected = set(entries), set(spec.shapes)
    if names != expected:
        extra, missing = sorted(names - expected), sorted(expected - names)
        raise BadTensor(f"tensor names differ: unexpected {extra[:3]}, missing {missing[:3]}")
    for name, (code, shape, _, _) in entries.items():
        if tuple(spec.shapes[name]) != shape:
            raise BadTensor(f"tensor {name!r} has shape {list(shape)}, expected {list(spec.shapes[name])}")
        if _CODE_TO_DTYPE[code] not in spec.dtypes:
            raise BadTensor(f"tensor {name!r} has dtype {_CODE_TO_DTYPE[code]}, not allowed here")
