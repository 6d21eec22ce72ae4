"""The downlink: what a task carries of the global adapter, rebuilt exactly or refused."""

from __future__ import annotations

import numpy as np
import pytest

from loracommons.protocol import wire
from loracommons.protocol.codec import canonical_digest, encode_tensors, round_tensors
from loracommons.protocol.downlink import ALL, SENT, Downlink, Held, build, rebuild
from loracommons.protocol.errors import BaseUnavailable, DownlinkMismatch, Malformed

NAMES = [f"base_model.model.layers.{i}.self_attn.{m}.lora_{f}.weight"
         for i in range(3) for m in ("q_proj", "v_proj") for f in "AB"]


def version0(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (rng.normal(size=(4, 48)) if "lora_A" in n else np.zeros((48, 4))).astype(np.float32)
            for n in NAMES}


def trained(v: dict[str, np.ndarray], seed: int, scale: float = 0.01, a_too: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    return {n: (t + rng.normal(scale=scale, size=t.shape) if a_too or "lora_B" in n else t).astype(np.float32)
            for n, t in v.items()}


def rebuilt(link, data, digest, mode="ffa", held=None, initial=None):  # noqa: ANN001, ANN201
    link = Downlink.from_bytes(link.to_bytes())  # as the volunteer reads it
    return rebuild(link, data, mode=mode, digest=digest, max_bytes=1 << 24, held=held,
                   regenerate=lambda: initial if initial is not None else version0())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ffa_sends_b_only_and_the_rebuilt_adapter_is_bit_identical(dtype):
    v0 = round_tensors(version0(), dtype)
    v1 = round_tensors(trained(v0, 1), dtype)
    link, data = build(v1, "ffa", dtype, regenerate=True)
    assert link.tensors == SENT and link.encoding == f"shuffle{2 if dtype == 'bfloat16' else 4}-zlib"
    assert len(data) < len(encode_tensors({n: t for n, t in v1.items() if "lora_B" in n}, dtype=dtype))
    full = rebuilt(link, data, canonical_digest(v1), initial=v0)
    assert encode_tensors(full, dtype="float32") == encode_tensors(v1, dtype="float32")


def test_bf16_downlink_is_about_a_quarter_of_float32_a_and_b():
    v1 = round_tensors(trained(version0(), 1), "bfloat16")
    _, data = build(v1, "ffa", "bfloat16", regenerate=True)
    assert len(data) / len(encode_tensors(v1)) < 0.25


@pytest.mark.parametrize("mode", ["fedavg", "exact"])
def test_modes_that_train_a_send_every_tensor(mode):
    v1 = trained(version0(), 1, a_too=True)
    link, data = build(v1, mode, "float32", regenerate=False)
    assert link.tensors == ALL
    full = rebuilt(link, data, canonical_digest(v1), mode=mode, initial={})
    assert all(np.array_equal(full[n], v1[n]) for n in NAMES)


def test_tampered_b_is_refused():
    v1 = trained(version0(), 1)
    forged = dict(v1)
    name = NAMES[1]
    forged[name] = forged[name].copy()
    forged[name][0, 0] += 1e-3
    link, data = build(forged, "ffa", "float32", regenerate=True)
    with pytest.raises(DownlinkMismatch, match="digest"):
        rebuilt(link, data, canonical_digest(v1))


def test_a_flipped_wire_byte_is_refused():
    v1 = trained(version0(), 1)
    link, data = build(v1, "ffa", "float32", regenerate=True)
    raw = wire.unpack(link.encoding, data, 1 << 24)
    flipped = bytearray(raw)
    flipped[-3] ^= 0x10
    with pytest.raises(DownlinkMismatch):
        rebuilt(Downlink(SENT, "float32"), bytes(flipped), canonical_digest(v1))


def test_a_wrong_seed_is_refused():
    v1 = trained(version0(seed=0), 1)
    link, data = build(v1, "ffa", "float32", regenerate=True)
    with pytest.raises(DownlinkMismatch, match="seed"):
        rebuilt(link, data, canonical_digest(v1), initial=version0(seed=1))


def test_sent_tensors_must_be_the_ones_the_mode_trains():
    v1 = trained(version0(), 1)
    data = encode_tensors({n: v1[n] for n in NAMES[:3]})
    with pytest.raises(DownlinkMismatch, match="mode trains"):
        rebuilt(Downlink(SENT, "float32"), data, canonical_digest(v1))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_delta_round_trips_exactly_and_is_smaller(dtype):
    v1 = round_tensors(trained(version0(), 1), dtype)
    v2 = round_tensors(trained(v1, 2, scale=1e-4), dtype)
    d1, d2 = canonical_digest(v1), canonical_digest(v2)
    link, data = build(v2, "ffa", dtype, regenerate=True, held=Held(d1, v1))
    _, whole = build(v2, "ffa", dtype, regenerate=True)
    assert link.delta_from == d1 and len(data) < len(whole)
    full = rebuilt(link, data, d2, held=Held(d1, v1), initial=round_tensors(version0(), dtype))
    assert encode_tensors(full, dtype="float32") == encode_tensors(v2, dtype="float32")


def test_an_unchanged_global_packs_to_almost_nothing():
    v1 = trained(version0(), 1)
    link, data = build(v1, "fedavg", "float32", regenerate=False, held=Held("f" * 64, v1))
    assert link.delta_from == "f" * 64 and len(data) < 200


def test_delta_against_a_version_not_held_is_refused_as_base_unavailable():
    v1, v2 = trained(version0(), 1), trained(version0(), 2)
    link, data = build(v2, "ffa", "float32", regenerate=True, held=Held(canonical_digest(v1), v1))
    assert link.delta_from
    with pytest.raises(BaseUnavailable):
        rebuilt(link, data, canonical_digest(v2), held=None)
    with pytest.raises(BaseUnavailable):
        rebuilt(link, data, canonical_digest(v2), held=Held("0" * 64, v1))


def test_a_delta_applied_to_the_wrong_tensors_is_refused():
    """A node that holds other values under the claimed digest (a lie or a bug) trains nothing."""
    v1, v2 = trained(version0(), 1), trained(version0(), 2)
    d1 = canonical_digest(v1)
    link, data = build(v2, "ffa", "float32", regenerate=True, held=Held(d1, v1))
    with pytest.raises(DownlinkMismatch):
        rebuilt(link, data, canonical_digest(v2), held=Held(d1, trained(version0(), 3)))


def test_the_whole_adapter_raw_float32_is_the_legacy_message():
    """No header: the bytes are the canonical float32 encoding, as before the downlink diet."""
    v1 = trained(version0(), 1)
    full = rebuilt(Downlink(), encode_tensors(v1), canonical_digest(v1), initial={})
    assert sorted(full) == sorted(v1)


@pytest.mark.parametrize("header", [
    b"[]", b'{"tensors": "some"}', b'{"dtype": "int8"}', b'{"encoding": "gzip"}', b'{"delta_from": "ab"}',
    b'{"tensors": ["all"]}', b'{"dtype": ["float32"]}', b'{"extra": "x"}',
])
def test_malformed_headers_are_refused(header):
    with pytest.raises(Malformed):
        Downlink.from_bytes(header)
