"""Aggregation with known answers: ffa, exact (vs dense SVD), fedavg, caps, clipping, robust rules, dp."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from loracommons.coordinator import privacy
from loracommons.coordinator.admission import admit, context_for, expected_for
from loracommons.coordinator.aggregation import (
    AggregationError,
    ExactAggregator,
    RoundAggregator,
    make_aggregator,
)
from loracommons.coordinator.config import ConfigError, ProjectConfig
from loracommons.coordinator.robust import module_pairs
from loracommons.protocol.identity import SigningKey

from .conftest import Signer, make_global, make_update


def _cfg(mode="ffa", min_volunteers=2, per_round=10, **agg) -> ProjectConfig:
    base = ProjectConfig()
    dp = agg.pop("dp", None)
    return ProjectConfig(
        round=dataclasses.replace(base.round, volunteers_per_round=per_round, min_volunteers=min_volunteers),
        aggregation=dataclasses.replace(base.aggregation, mode=mode, **agg),
        privacy=dataclasses.replace(base.privacy, **dp) if dp else base.privacy,
    )


def _run_round(cfg, g, updates, examples=None, rng=None, spill_dir=None):
    """Admit signed envelopes of `updates` and aggregate them as a coordinator round would."""
    signer = Signer(cfg, g)
    expected = expected_for(cfg, signer.round, signer.nonce, g, signer.digest)
    seen: set[str] = set()
    ctx = context_for(cfg, expected, g, admitted=seen)
    rnd = RoundAggregator(cfg, g, rng=rng or np.random.default_rng(0), spill_dir=spill_dir)
    digests = []
    for i, tensors in enumerate(updates):
        verdict = admit(signer.envelope(tensors, examples=(examples or [10] * len(updates))[i]), ctx)
        assert verdict.accepted, verdict.message
        seen.add(verdict.signer)
        rnd.offer(verdict)
        digests.append(verdict.update_digest)
    return rnd.finish(), digests


def _f64(t):
    return {k: v.astype(np.float64) for k, v in t.items()}


def test_ffa_is_the_exact_weighted_mean_of_b(rng):
    g = make_global(rng)
    updates = [make_update(g, "ffa", rng) for _ in range(5)]
    weights = [3, 1, 7, 2, 5]
    agg = make_aggregator("ffa", g)
    for u, w in zip(updates, weights, strict=True):
        agg.add(u, w)
    out = agg.result()
    assert set(out) == set(g)
    for name in g:
        if ".lora_B." in name:
            want = np.average(
                np.stack([u[name].astype(np.float64) for u in updates]), axis=0, weights=weights
            )
            np.testing.assert_allclose(out[name], want, rtol=1e-6, atol=1e-7)
        else:
            np.testing.assert_array_equal(out[name], g[name])  # A frozen, bit for bit
    assert out[name].dtype == np.float32


def test_fedavg_averages_a_and_b_separately(rng):
    g = make_global(rng)
    updates = [make_update(g, "fedavg", rng) for _ in range(4)]
    weights = [1, 2, 3, 4]
    agg = make_aggregator("fedavg", g)
    for u, w in zip(updates, weights, strict=True):
        agg.add(u, w)
    out = agg.result()
    for name in g:
        want = np.average(np.stack([u[name].astype(np.float64) for u in updates]), axis=0, weights=weights)
        np.testing.assert_allclose(out[name], want, rtol=1e-6, atol=1e-7)


def _dense_mean(updates, weights, a_name, b_name):
    total = sum(
        w * u[b_name].astype(np.float64) @ u[a_name].astype(np.float64)
        for u, w in zip(updates, weights, strict=True)
    )
    return total / sum(weights)


def _best_rank(m, r):
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


@pytest.mark.parametrize("sketch_rank", [None, 12, 64])
def test_exact_is_the_best_rank_r_approximation_of_the_mean_product(sketch_rank):
    rng = np.random.default_rng(7)
    r = 3
    g = make_global(rng, r=r, layers=2, hidden=10, kv=8)  # min(d, k) <= 10 <= sketch: lossless
    updates = [make_update(g, "exact", rng, step=0.3) for _ in range(9)]  # 27 columns: compresses
    weights = [1, 5, 2, 8, 3, 3, 9, 1, 4]
    agg = ExactAggregator(g, sketch_rank)
    for u, w in zip(updates, weights, strict=True):
        agg.add(u, w)
    out = agg.result()
    if sketch_rank == 12:
        assert agg.compressions > 0
    assert agg.metrics()["exact_truncation_bound"] < 1e-12
    for a_name, b_name in module_pairs(g).values():
        assert out[b_name].shape == g[b_name].shape and out[a_name].shape == g[a_name].shape
        want = _best_rank(_dense_mean(updates, weights, a_name, b_name), r)
        got = out[b_name].astype(np.float64) @ out[a_name].astype(np.float64)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
        # balanced split: B = U sqrt(S), A = sqrt(S) V^T
        np.testing.assert_allclose(
            np.linalg.norm(out[b_name], axis=0), np.linalg.norm(out[a_name], axis=1), rtol=1e-4
        )


def test_exact_incremental_path_is_lossless_below_the_sketch_rank():
    rng = np.random.default_rng(11)
    r, hidden = 3, 40
    g = make_global(rng, r=r, layers=1, hidden=hidden, kv=36)
    shared = rng.normal(size=(4, hidden))  # every A moves within one 4-dim row space: rank(sum) <= 7
    updates = []
    for _ in range(12):
        u = make_update(g, "exact", rng, step=0.3)
        for name in u:
            if ".lora_A." in name:
                u[name] = (g[name] + 0.3 * rng.normal(size=(r, 4)) @ shared).astype(np.float32)
        updates.append(u)
    weights = list(range(1, 13))
    agg = ExactAggregator(g, sketch_rank=8)  # 36, 40 > 8 + 8 columns: incremental SVD, not the direct path
    for u, w in zip(updates, weights, strict=True):
        agg.add(u, w)
    out = agg.result()
    assert agg.compressions >= 4 and agg.metrics()["exact_truncation_bound"] < 1e-6  # float32 rounding only
    for a_name, b_name in module_pairs(g).values():
        want = _best_rank(_dense_mean(updates, weights, a_name, b_name), r)
        got = out[b_name].astype(np.float64) @ out[a_name].astype(np.float64)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_exact_truncation_error_is_bounded_as_reported():
    rng = np.random.default_rng(8)
    r = 2
    g = make_global(rng, r=r, layers=1, hidden=40, kv=40)
    updates = [make_update(g, "exact", rng, step=0.2) for _ in range(30)]  # rank of the sum >> sketch
    agg = ExactAggregator(g, sketch_rank=4)
    for u in updates:
        agg.add(u, 1)
    out = agg.result()
    bound = agg.metrics()["exact_truncation_bound"]
    assert bound > 0  # truncation happened and is reported
    for a_name, b_name in module_pairs(g).values():
        mean = _dense_mean(updates, [1] * len(updates), a_name, b_name)
        got = out[b_name].astype(np.float64) @ out[a_name].astype(np.float64)
        best_err = np.linalg.norm(mean - _best_rank(mean, r))
        # ||trunc_r(S + E) - S|| <= ||trunc_r(S) - S|| + 2 ||E||, with ||E|| <= bound ||S||
        assert np.linalg.norm(got - mean) <= best_err + 2 * bound * np.linalg.norm(mean) + 1e-6


def test_exact_rank_deficient_mean_keeps_trainable_a_rows():
    rng = np.random.default_rng(9)
    g = make_global(rng, r=4, layers=1)
    one = make_update(g, "exact", rng)
    for name in one:
        if ".lora_B." in name:
            one[name][:, 1:] = 0  # rank-1 product
    agg = make_aggregator("exact", g)
    agg.add(one, 1)
    agg.add(one, 2)
    out = agg.result()
    for a_name, b_name in module_pairs(g).values():
        assert np.all(np.linalg.norm(out[a_name], axis=1) > 0)
        np.testing.assert_allclose(out[b_name] @ out[a_name], one[b_name] @ one[a_name], atol=1e-6)


def test_weight_cap_holds(rng):
    g = make_global(rng)
    cfg = _cfg(max_examples_weight=100)
    honest = [make_update(g, "ffa", rng) for _ in range(2)]
    greedy = make_update(g, "ffa", rng, step=1.0)
    outcome, _ = _run_round(cfg, g, [*honest, greedy], examples=[100, 50, 1_000_000_000])
    assert outcome.metrics["total_weight"] == 250
    name = next(n for n in g if ".lora_B." in n)
    want = (100 * honest[0][name] + 50 * honest[1][name] + 100 * greedy[name].astype(np.float64)) / 250
    np.testing.assert_allclose(outcome.tensors[name], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["ffa", "exact", "fedavg"])
def test_median_clipping_bounds_a_100x_update(rng, mode):
    g = make_global(rng)
    honest = [make_update(g, mode, rng) for _ in range(5)]
    attack = {n: g[n] + 100 * (v - g[n]) for n, v in make_update(g, mode, rng).items()}
    cfg = _cfg(mode, min_volunteers=3, clip="median", clip_factor=2.0)
    outcome, digests = _run_round(cfg, g, [*honest, attack])
    bound = outcome.metrics["clip_bound"]
    assert 0 < outcome.clip_scales[digests[-1]] < 0.05
    assert all(outcome.clip_scales[d] == 1.0 for d in digests[:-1])
    assert outcome.metrics["clipped"] == 1
    # the attacker moved the aggregate by at most its clipped delta (norm <= bound) times its weight share
    clean = make_aggregator(mode, g)
    for u in honest:
        clean.add(u, 10)
    honest_mean = clean.result()
    from loracommons.coordinator.robust import delta_norm

    shift = delta_norm({n: outcome.tensors[n] for n in clean.names}, honest_mean, mode)
    assert shift <= bound * (1 / 6) * 1.5 + 1e-5
    unclipped = make_aggregator(mode, g)
    for u in [*honest, attack]:
        unclipped.add(u, 10)
    assert delta_norm({n: unclipped.result()[n] for n in clean.names}, honest_mean, mode) > 5 * shift


def test_free_rider_rejected(rng):
    g = make_global(rng)
    honest = [make_update(g, "ffa", rng) for _ in range(4)]
    lazy = {n: g[n].copy() for n in honest[0]}  # sends the global back unchanged
    cfg = _cfg(free_rider_ratio=0.2)
    outcome, digests = _run_round(cfg, g, [*honest, lazy])
    assert [(r.update_digest, r.reason) for r in outcome.rejected] == [(digests[-1], "free_rider")]
    assert digests[-1] not in outcome.aggregated and len(outcome.aggregated) == 4
    agg = make_aggregator("ffa", g)
    for u in honest:
        agg.add(u, 10)
    for name, value in agg.result().items():
        np.testing.assert_allclose(outcome.tensors[name], value, rtol=1e-6, atol=1e-7)


def test_krum_drops_the_outlier(rng):
    g = make_global(rng)
    honest = [make_update(g, "ffa", rng, step=0.01) for _ in range(6)]
    attack = {n: v + 5.0 for n, v in make_update(g, "ffa", rng).items()}
    cfg = _cfg(min_volunteers=5, robust="krum", krum_f=1)
    outcome, digests = _run_round(cfg, g, [*honest, attack])
    assert [(r.update_digest, r.reason) for r in outcome.rejected] == [(digests[-1], "krum_outlier")]
    assert len(outcome.aggregated) == 6


def test_trimmed_mean_ignores_extreme_coordinates(rng):
    g = make_global(rng)
    honest = [make_update(g, "ffa", rng, step=0.01) for _ in range(8)]
    attack = {n: v + 1000.0 for n, v in make_update(g, "ffa", rng).items()}
    cfg = _cfg(min_volunteers=5, robust="trimmed_mean", trim_fraction=0.2)
    outcome, _ = _run_round(cfg, g, [*honest, attack])
    assert outcome.metrics["trimmed_per_side"] == 1
    for name in honest[0]:
        stack = np.sort(np.stack([u[name].astype(np.float64) for u in [*honest, attack]]), axis=0)
        np.testing.assert_allclose(outcome.tensors[name], stack[1:-1].mean(axis=0), rtol=1e-5, atol=1e-6)
        assert np.max(np.abs(outcome.tensors[name] - g[name])) < 0.1


def test_spilled_round_matches_in_memory(rng, tmp_path):
    g = make_global(rng)
    updates = [make_update(g, "exact", rng) for _ in range(5)]
    updates.append({n: g[n] + 50 * (v - g[n]) for n, v in updates[0].items()})
    cfg = _cfg("exact", min_volunteers=3, clip="median")
    mem, _ = _run_round(cfg, g, updates)
    disk, _ = _run_round(cfg, g, updates, spill_dir=tmp_path)
    for name in g:
        np.testing.assert_array_equal(mem.tensors[name], disk.tensors[name])
    assert list(tmp_path.iterdir()) == []  # spill files removed


def test_too_few_keeps_the_previous_version(rng):
    g = make_global(rng)
    outcome, _ = _run_round(_cfg(min_volunteers=3), g, [make_update(g, "ffa", rng) for _ in range(2)])
    assert outcome.tensors is None and outcome.reason == "too_few" and "3 required" in outcome.message


def test_streaming_round_holds_no_update(rng):
    g = make_global(rng)
    rnd = RoundAggregator(_cfg(), g)
    assert not rnd.buffers
    assert RoundAggregator(_cfg(min_volunteers=3, clip="median"), g).buffers


def test_offer_refuses_rejected_and_duplicate_verdicts(rng):
    g = make_global(rng)
    cfg = _cfg()
    signer = Signer(cfg, g)
    ctx = context_for(cfg, expected_for(cfg, 1, signer.nonce, g, signer.digest), g)
    key = SigningKey.generate()
    good = admit(signer.envelope(make_update(g, "ffa", rng), key=key), ctx)
    bad = admit(signer.envelope(make_update(g, "ffa", rng), examples=0), ctx)
    rnd = RoundAggregator(cfg, g)
    rnd.offer(good)
    with pytest.raises(ValueError, match="only accepted"):
        rnd.offer(bad)
    with pytest.raises(ValueError, match="already offered"):
        rnd.offer(good)


def test_aggregator_refuses_misuse(rng):
    g = make_global(rng)
    with pytest.raises(AggregationError):
        make_aggregator("ffa", g).result()
    with pytest.raises(ValueError):
        make_aggregator("ffa", g).add(make_update(g, "ffa", rng), 0)
    with pytest.raises(ConfigError, match="mode = 'avg'"):
        make_aggregator("avg", g)
    with pytest.raises(ConfigError, match="sketch rank 2 is below"):
        ExactAggregator(g, sketch_rank=2)
    with pytest.raises(ValueError, match="without its pair"):
        make_aggregator("ffa", {n: v for n, v in g.items() if "layers.0.self_attn.q_proj.lora_A" not in n})


def test_misconfigured_robust_rules_refused():
    with pytest.raises(ConfigError, match="krum needs more than 2f\\+2"):
        _cfg(min_volunteers=4, robust="krum", krum_f=1)
    with pytest.raises(ConfigError, match="trimmed_mean would do nothing"):
        _cfg(min_volunteers=4, robust="trimmed_mean", trim_fraction=0.2)
    with pytest.raises(ConfigError, match="one update is always its own median"):
        _cfg(min_volunteers=1, clip="median")


def test_dp_clips_weights_uniformly_and_adds_calibrated_noise(rng):
    g = make_global(rng, layers=4, hidden=64, kv=64)
    updates = [make_update(g, "ffa", rng, step=0.5) for _ in range(4)]
    dp = {"dp": True, "noise_multiplier": 2.0, "clip_norm": 0.5}
    cfg = _cfg(min_volunteers=2, dp=dp)
    outcome, digests = _run_round(cfg, g, updates, examples=[1, 10, 100, 1000], rng=np.random.default_rng(3))
    assert outcome.metrics["dp_noise_std"] == pytest.approx(2.0 * 0.5 / 4)
    assert all(s < 1 for s in outcome.clip_scales.values())
    clean = make_aggregator("ffa", g)
    for d, u in zip(digests, updates, strict=True):
        clean.add(u, 1, outcome.clip_scales[d])
    noise = np.concatenate([(outcome.tensors[n] - clean.result()[n]).ravel() for n in clean.names])
    assert noise.std() == pytest.approx(0.25, rel=0.05) and abs(noise.mean()) < 0.02
    a_name = next(n for n in g if ".lora_A." in n)
    np.testing.assert_array_equal(outcome.tensors[a_name], g[a_name])  # ffa: no noise on frozen A


def test_rdp_epsilon_matches_closed_form_and_bounds_the_exact_curve():
    # Composition of T Gaussians is zCDP with rho = T / (2 s^2); the classic conversion optimised over a
    # continuum of orders gives eps = rho + 2 sqrt(rho log(1/delta)).
    s, rounds, delta = 4.0, 10, 1e-5
    rho = rounds / (2 * s**2)
    orders = np.linspace(1.01, 200, 200_000)
    classic, _ = privacy.rdp_to_epsilon(privacy.gaussian_rdp(s, rounds, orders), orders, delta, "classic")
    assert classic == pytest.approx(rho + 2 * math.sqrt(rho * math.log(1 / delta)), rel=1e-6)
    eps = privacy.epsilon(rounds, 2 * s, delta)  # replace-one: effective multiplier z / 2 = s
    assert eps == privacy.epsilon(rounds, s, delta, relation="add_remove")
    assert eps < classic
    # ground truth: T Gaussians = one Gaussian with mu = sqrt(T) / s (Balle & Wang 2018, Dong et al.)
    mu = math.sqrt(rounds) / s
    assert privacy.gaussian_delta_exact(eps, mu) <= delta  # a valid (eps, delta) guarantee
    lo, hi = 0.0, eps
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if privacy.gaussian_delta_exact(mid, mu) > delta else (lo, mid)
    assert hi < eps < 1.35 * hi  # RDP is an upper bound, not far above the exact value
    assert privacy.epsilon(0, 1.0, delta) == 0.0


def test_accountant_counts_rounds_and_limits():
    acc = privacy.RdpAccountant(noise_multiplier=8.0, delta=1e-5, max_epsilon=3.0)
    e1 = acc.compose()
    assert acc.rounds == 1 and e1 == privacy.epsilon(1, 8.0, 1e-5)
    assert acc.compose(4) > e1
    while not acc.would_exceed():
        acc.compose()
    assert acc.epsilon() <= 3.0 < acc.epsilon(acc.rounds + 1)
