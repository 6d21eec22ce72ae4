"""A fourth mode added through the registries alone runs a whole round: config, task, envelopes, Round."""

from __future__ import annotations

import numpy as np
import pytest

from loracommons.coordinator.aggregation import MeanAggregator, register_aggregator, unregister_aggregator
from loracommons.coordinator.config import ConfigError, ProjectConfig
from loracommons.coordinator.round import Round
from loracommons.protocol import modes
from loracommons.protocol.codec import encode_tensors
from loracommons.protocol.envelope import sha256_hex, sign_update
from loracommons.protocol.identity import SigningKey
from loracommons.protocol.task import RoundTask

from .conftest import make_global

TOY = "toy-a-only"


@pytest.fixture
def toy_mode():
    """A trained and sent, B frozen (the mirror of ffa), averaged like ffa; removed afterwards."""
    mode = modes.register(modes.Mode(TOY, "mean of A, B frozen (a test mode)", ("lora_A",)))
    aggregator = register_aggregator(TOY)(type("ToyAggregator", (MeanAggregator,), {}))
    try:
        yield mode, aggregator
    finally:
        unregister_aggregator(TOY)
        modes.unregister(TOY)


def _config(mode: str) -> ProjectConfig:
    return ProjectConfig.from_dict(
        {
            "project": {"id": "toy-project"},
            "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
            "round": {"volunteers_per_round": 3, "min_volunteers": 3},
            "aggregation": {"mode": mode},
        }
    )


def test_a_registered_mode_runs_a_round(toy_mode, rng):
    mode, _ = toy_mode
    cfg = _config(TOY)
    g = make_global(rng)
    digest = sha256_hex(encode_tensors(g))
    rnd = Round(cfg, 7, "ab" * 16, g, digest)
    task = RoundTask.from_bytes(rnd.task_bytes)  # what a volunteer parses
    assert task.mode == TOY
    sent = mode.sent_names(g)
    assert sent and all(".lora_A." in n for n in sent)
    updates, weights = [], [10, 20, 30]
    for examples in weights:
        tensors = {n: (g[n] + 0.1 * rng.standard_normal(g[n].shape)).astype(np.float32) for n in sent}
        payload = encode_tensors(tensors, dtype=task.payload_dtype)
        envelope = sign_update(
            SigningKey.generate(), payload, **task.claims(), examples=examples, steps=2, train_loss=0.5
        )
        record = rnd.offer(envelope)
        assert record.accepted, record.message
        assert record.delta_norm == pytest.approx(
            np.sqrt(sum(np.sum((tensors[n].astype(np.float64) - g[n]) ** 2) for n in sent)), rel=1e-5
        )
        updates.append(tensors)
    wrong = {n: g[n] for n in g if ".lora_B." in n}  # an ffa-shaped update does not fit the toy mode
    envelope = sign_update(
        SigningKey.generate(), encode_tensors(wrong), **task.claims(), examples=5, steps=1, train_loss=1.0
    )
    assert rnd.offer(envelope).reason == "bad_tensor"
    result = rnd.close()
    assert result.status == "aggregated" and len(result.aggregated) == 3
    for name in g:
        if name in sent:
            stack = np.stack([u[name].astype(np.float64) for u in updates])
            want = np.average(stack, axis=0, weights=weights)
            np.testing.assert_allclose(result.tensors[name], want, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(result.tensors[name], g[name])  # B frozen, bit for bit


def test_a_mode_needs_its_aggregator_and_its_registration(rng):
    modes.register(modes.Mode(TOY, "registered without an aggregator", ("lora_A",)))
    try:
        cfg = _config(TOY)  # the config accepts any registered mode
        g = make_global(rng)
        with pytest.raises(ConfigError, match=f"mode = '{TOY}': no aggregator registered"):
            Round(cfg, 1, "ab" * 16, g, sha256_hex(encode_tensors(g)))
    finally:
        modes.unregister(TOY)
    with pytest.raises(ConfigError, match="expected one of ffa, exact, fedavg"):
        _config(TOY)
