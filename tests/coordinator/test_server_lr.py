"""`[aggregation] server_lr`: the server step G + eta (mean - G) in every mode, and its refusals."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from loracommons.coordinator.aggregation import (
    ExactAggregator,
    MeanAggregator,
    RoundAggregator,
    make_aggregator,
)
from loracommons.coordinator.config import ConfigError, ProjectConfig, render_toml
from loracommons.coordinator.robust import module_pairs

from .conftest import make_global, make_update
from .test_aggregation import _best_rank, _cfg, _dense_mean, _run_round

WEIGHTS = [3, 1, 7, 2]


def _fold(mode, g, updates, eta=None, **kw):
    agg = make_aggregator(mode, g, **kw) if eta is None else make_aggregator(mode, g, server_lr=eta, **kw)
    for u, w in zip(updates, WEIGHTS, strict=True):
        agg.add(u, w)
    return agg


@pytest.mark.parametrize("mode", ["ffa", "fedavg"])
def test_server_lr_one_is_the_plain_mean_bit_for_bit(rng, mode):
    g = make_global(rng)
    updates = [make_update(g, mode, rng) for _ in WEIGHTS]
    default, one = _fold(mode, g, updates), _fold(mode, g, updates, 1.0)
    assert isinstance(default, MeanAggregator)
    plain = {n: (g[n] + d).astype(np.float32) for n, d in default.mean_delta().items()}  # the fold before
    for name, value in one.result().items():
        np.testing.assert_array_equal(value, default.result()[name])
        np.testing.assert_array_equal(value, plain.get(name, g[name]))


def test_server_lr_one_is_bit_for_bit_in_exact():
    rng = np.random.default_rng(3)
    g = make_global(rng, r=3, hidden=10, kv=8)
    updates = [make_update(g, "exact", rng, step=0.3) for _ in WEIGHTS]
    one, default = _fold("exact", g, updates, 1.0).result(), ExactAggregator(g)
    for u, w in zip(updates, WEIGHTS, strict=True):
        default.add(u, w, scale=1.0)
    for name, value in default.result().items():
        np.testing.assert_array_equal(one[name], value)


@pytest.mark.parametrize("mode", ["ffa", "fedavg"])
@pytest.mark.parametrize("eta", [2.0, 0.5])
def test_server_lr_scales_the_step_from_the_global(rng, mode, eta):
    g = make_global(rng)
    updates = [make_update(g, mode, rng) for _ in WEIGHTS]
    plain, stepped = _fold(mode, g, updates).result(), _fold(mode, g, updates, eta).result()
    for name in g:
        want = g[name] + eta * (plain[name].astype(np.float64) - g[name])
        np.testing.assert_allclose(stepped[name], want, rtol=1e-5, atol=1e-6)
        if mode == "ffa" and ".lora_A." in name:
            np.testing.assert_array_equal(stepped[name], g[name])  # A stays frozen


def test_server_lr_in_exact_steps_on_the_product():
    rng = np.random.default_rng(5)
    r = 3
    g = make_global(rng, r=r, hidden=10, kv=8)
    updates = [make_update(g, "exact", rng, step=0.3) for _ in WEIGHTS]
    out = _fold("exact", g, updates, 2.0).result()
    for a_name, b_name in module_pairs(g).values():
        here = g[b_name].astype(np.float64) @ g[a_name].astype(np.float64)
        mean = _dense_mean(updates, WEIGHTS, a_name, b_name)
        want = _best_rank(here + 2.0 * (mean - here), r)
        got = out[b_name].astype(np.float64) @ out[a_name].astype(np.float64)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_server_lr_applies_after_clipping_and_robust_rules(rng):
    g = make_global(rng)
    honest = [make_update(g, "ffa", rng, step=0.01) for _ in range(6)]
    attack = {n: v + 1000.0 for n, v in make_update(g, "ffa", rng).items()}
    for rule in ({"robust": "trimmed_mean", "trim_fraction": 0.2}, {"clip": "median"}):
        plain, _ = _run_round(_cfg(min_volunteers=5, **rule), g, [*honest, attack])
        stepped, _ = _run_round(_cfg(min_volunteers=5, server_lr=2.0, **rule), g, [*honest, attack])
        for name in g:
            want = g[name] + 2.0 * (plain.tensors[name].astype(np.float64) - g[name])
            np.testing.assert_allclose(stepped.tensors[name], want, rtol=1e-5, atol=1e-6)


def test_round_aggregator_takes_server_lr_from_the_project(rng):
    cfg = ProjectConfig.from_dict({"aggregation": {"server_lr": 3}})
    assert cfg.aggregation.server_lr == 3.0
    assert RoundAggregator(cfg, make_global(rng)).aggregator.server_lr == 3.0
    assert "server_lr = 3" in render_toml(cfg) and "server step on the round's mean delta" in render_toml(cfg)


@pytest.mark.parametrize(
    ("value", "problem"),
    [(0, "expected greater than 0"), (-1.0, "expected greater than 0"), (5.0, "expected at most 4"),
     (float("nan"), "expected a finite number"), ("2", "expected a finite number"),
     (True, "expected a finite number")],
)
def test_bad_server_lr_refused(value, problem):
    with pytest.raises(ConfigError, match=rf"\[aggregation\] server_lr = .*: {problem}"):
        ProjectConfig.from_dict({"aggregation": {"server_lr": value}})


def test_server_lr_refused_with_dp_and_by_make_aggregator(rng):
    with pytest.raises(ConfigError, match=r"\[aggregation\] server_lr = 2.0: must be 1 with \[privacy\] dp"):
        ProjectConfig.from_dict({"aggregation": {"server_lr": 2.0}, "privacy": {"dp": True}})
    assert ProjectConfig.from_dict({"aggregation": {"server_lr": 1.0}, "privacy": {"dp": True}}).privacy.dp
    with pytest.raises(ConfigError, match=r"server_lr = 0.0: expected a finite number greater than 0"):
        make_aggregator("ffa", make_global(rng), server_lr=0.0)


def test_server_lr_default_is_one():
    assert dataclasses.replace(ProjectConfig().aggregation).server_lr == 1.0
