"""Transport packing of payloads: lossless, bounded on untrusted input, worth it on adapters."""

from __future__ import annotations

import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from loracommons.protocol import wire
from loracommons.protocol.codec import encode_tensors
from loracommons.protocol.errors import Malformed, TooLarge


@given(st.binary(max_size=3000), st.sampled_from([1, 2, 3, 4, 8]))
def test_unpack_returns_exactly_what_was_packed(data, itemsize):
    encoding, packed = wire.pack(data, itemsize)
    assert encoding in wire.ENCODINGS
    assert len(packed) <= len(data)  # never larger: raw when packing does not pay
    assert wire.unpack(encoding, packed, max_bytes=len(data)) == data


def _adapter_payload(dtype: str) -> bytes:
    rng = np.random.default_rng(0)
    tensors = {f"layers.{i}.lora_B.weight": rng.standard_normal((256, 16), dtype=np.float32) * 0.02
               for i in range(8)}
    return encode_tensors(tensors, dtype=dtype)


@pytest.mark.parametrize(("dtype", "itemsize", "most"), [("bfloat16", 2, 0.75), ("float32", 4, 0.95)])
def test_adapter_payloads_shrink(dtype, itemsize, most):
    payload = _adapter_payload(dtype)
    encoding, packed = wire.pack(payload, itemsize)
    assert encoding == f"shuffle{itemsize}-zlib" and len(packed) < most * len(payload)
    assert wire.unpack(encoding, packed, len(payload)) == payload


def test_a_zip_bomb_stops_at_the_limit_without_inflating():
    bomb = zlib.compress(bytes(200 << 20), 9)  # 200 MB of zeros in ~200 kB
    tracemalloc.start()
    with pytest.raises(TooLarge):
        wire.unpack("shuffle2-zlib", bomb, max_bytes=1 << 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20


@pytest.mark.parametrize(
    ("encoding", "packed", "error"),
    [
        ("raw", bytes(11), TooLarge),
        ("lzma", b"x", Malformed),
        ("shuffle2-zlib", b"not a zlib stream", Malformed),
        ("shuffle2-zlib", zlib.compress(bytes(8))[:-3], Malformed),  # cut short
        ("shuffle2-zlib", zlib.compress(bytes(4)) + b"tail", Malformed),  # bytes after the stream
    ],
)
def test_broken_input_is_a_protocol_error(encoding, packed, error):
    with pytest.raises(error):
        wire.unpack(encoding, packed, max_bytes=10)
