"""Nested ranks in ffa: each column of B is the mean over the volunteers who trained it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from loracommons.coordinator.aggregation import AggregationError, make_aggregator
from loracommons.coordinator.config import ConfigError, ProjectConfig
from loracommons.coordinator.round import Round
from loracommons.protocol.identity import SigningKey
from loracommons.protocol.lora import take_rank, take_window, window_start

from .conftest import Signer, make_global, make_update


def _narrow(tensors: dict, rank: int) -> dict:
    return {n: np.ascontiguousarray(v) for n, v in take_rank(tensors, rank).items()}


def test_column_mean_matches_a_hand_computation():
    # one B of 2 rows x 3 columns; A is frozen and never sent
    g = {"m.lora_A.weight": np.ones((3, 2), np.float32), "m.lora_B.weight": np.array(
        [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)}
    agg = make_aggregator("ffa", g, nested_weighting="trained")
    agg.add({"m.lora_B.weight": np.array([[10.0], [20.0]], np.float32)}, weight=1)  # rank 1
    agg.add({"m.lora_B.weight": np.array([[30.0, 40.0], [50.0, 60.0]], np.float32)}, weight=3)  # rank 2
    b = agg.result()["m.lora_B.weight"]
    # column 0: both, weights 1 and 3; column 1: the rank-2 update alone; column 2: nobody (global)
    want = np.array([[(10 + 3 * 30) / 4, 40.0, 3.0], [(20 + 3 * 50) / 4, 60.0, 6.0]])
    np.testing.assert_array_equal(b, want.astype(np.float32))
    assert agg.metrics() == {"nested_rank_updates": 2.0, "untrained_columns": 1.0}
    np.testing.assert_array_equal(agg.result()["m.lora_A.weight"], g["m.lora_A.weight"])


def test_a_clipped_narrow_update_moves_its_columns_by_the_scaled_delta():
    g = {"m.lora_A.weight": np.ones((2, 2), np.float32),
         "m.lora_B.weight": np.array([[1.0, 1.0]], np.float32)}
    agg = make_aggregator("ffa", g)
    agg.add({"m.lora_B.weight": np.array([[5.0]], np.float32)}, weight=2, scale=0.5)
    agg.add({"m.lora_B.weight": np.array([[3.0, 9.0]], np.float32)}, weight=2)
    # column 0: (2 * (1 + 0.5 * 4) + 2 * 3) / 4 = 3; column 1: 9
    np.testing.assert_allclose(agg.result()["m.lora_B.weight"], [[3.0, 9.0]])


def test_every_update_at_full_rank_gives_the_plain_mean_bit_for_bit(rng):
    g = make_global(rng)
    updates = [make_update(g, "ffa", rng) for _ in range(3)]
    agg = make_aggregator("ffa", g)
    for weight, update in zip((3, 1, 7), updates, strict=True):
        agg.add(update, weight)
    out = agg.result()
    for name in (n for n in g if ".lora_B." in n):
        total = sum(w * u[name].astype(np.float64) for w, u in zip((3, 1, 7), updates, strict=True))
        np.testing.assert_array_equal(out[name], (g[name] + (total / 11 - g[name])).astype(np.float32))
    assert agg.metrics() == {}


@pytest.mark.parametrize("weighting", ["trained", "rank"])
def test_the_product_of_each_trained_component_is_its_exact_mean(rng, weighting):
    """(alpha/r) B' A restricted to component j is the weighted mean of that component over S_j
    (weights w_i, or w_i r / r_i under rank)."""
    g = make_global(rng, r=4)
    ranks, examples = (1, 2, 4, 4), (5.0, 1.0, 2.0, 3.0)
    updates = [_narrow(make_update(g, "ffa", rng), r) for r in ranks]
    agg = make_aggregator("ffa", g, nested_weighting=weighting)
    for update, weight in zip(updates, examples, strict=True):
        agg.add(update, weight)
    factors = [1.0 if weighting == "trained" else 4 / r for r in ranks]
    weights = [w * f for w, f in zip(examples, factors, strict=True)]
    out = agg.result()
    a_name, b_name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", (
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    a = g[a_name].astype(np.float64)
    for j in range(4):
        trained = [(u, w) for u, w, r in zip(updates, weights, ranks, strict=True) if r > j]
        mean = sum(w * np.outer(u[b_name][:, j], a[j]) for u, w in trained) / sum(w for _, w in trained)
        np.testing.assert_allclose(np.outer(out[b_name][:, j], a[j]), mean, rtol=1e-5, atol=1e-7)


def test_an_update_wider_than_the_project_or_ragged_is_refused_by_the_fold(rng):
    g = make_global(rng, r=2)
    agg = make_aggregator("ffa", g)
    wide = {n: np.zeros((v.shape[0], 3), np.float32) for n, v in g.items() if ".lora_B." in n}
    with pytest.raises(AggregationError, match="width"):
        agg.add(wide, 1)
    ragged = _narrow(make_update(g, "ffa", rng), 1)
    first = sorted(ragged)[0]
    ragged[first] = np.zeros((ragged[first].shape[0], 2), np.float32)
    with pytest.raises(AggregationError, match="width"):
        agg.add(ragged, 1)


def _cfg(**agg) -> ProjectConfig:
    base = ProjectConfig()
    return ProjectConfig(
        round=dataclasses.replace(base.round, volunteers_per_round=10, min_volunteers=2),
        aggregation=dataclasses.replace(base.aggregation, mode="ffa", **agg),
    )


def test_a_mixed_rank_round_under_median_clipping_compares_per_component_norms(rng):
    """A rank-1 update whose components moved like the others' is not clipped or called a free rider
    for carrying a quarter of the columns: the rules compare norm x sqrt(r / r_i)."""
    g = make_global(rng, r=4)
    cfg = _cfg(clip="median", clip_factor=1.5, free_rider_ratio=0.6)
    signer = Signer(cfg, g)
    rnd = Round(cfg, signer.round, signer.nonce, g, signer.digest)
    full = [make_update(g, "ffa", np.random.default_rng(s)) for s in (1, 2)]
    start = 2
    key = next(k for k in iter(SigningKey.generate, None)  # a signer whose rank-1 window is column 2
               if window_start(signer.round, 1, 4, k.public.fingerprint) == start)
    small = {n: np.ascontiguousarray(v)
             for n, v in take_window(make_update(g, "ffa", np.random.default_rng(3)), 1, start).items()}
    records = [rnd.offer(signer.envelope(u, key=SigningKey.generate())) for u in full]
    records.append(rnd.offer(signer.envelope(small, key=key, rank=1)))
    assert all(r.accepted for r in records), [r.message for r in records]
    result = rnd.close()
    assert len(result.aggregated) == 3 and result.rejected == () and result.annotations == ()
    assert result.metrics["nested_rank_updates"] == 1 and result.metrics["untrained_columns"] == 0
    b = next(n for n in g if ".lora_B." in n)
    # the default weighting (rank): the rank-1 update weighs r / r_i = 4 in its column
    want = (full[0][b][:, start].astype(np.float64) + full[1][b][:, start] + 4 * small[b][:, 0]) / 6
    np.testing.assert_allclose(result.tensors[b][:, start], want, rtol=1e-5, atol=1e-6)
    for j in {0, 1, 2, 3} - {start}:
        np.testing.assert_allclose(result.tensors[b][:, j], (full[0][b][:, j] + full[1][b][:, j]) / 2,
                                   rtol=1e-5, atol=1e-6)


def _two_narrow_updates(weighting: str) -> np.ndarray:
    """The hand example above (r = 3; ranks 1 and 2, weights 1 and 3) under another column weighting."""
    g = {"m.lora_A.weight": np.ones((3, 2), np.float32), "m.lora_B.weight": np.array(
        [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)}
    agg = make_aggregator("ffa", g, nested_weighting=weighting)
    agg.add({"m.lora_B.weight": np.array([[10.0], [20.0]], np.float32)}, weight=1)  # f = 3 / 1
    agg.add({"m.lora_B.weight": np.array([[30.0, 40.0], [50.0, 60.0]], np.float32)}, weight=3)  # f = 3 / 2
    return agg.result()["m.lora_B.weight"]


def test_rank_weighting_matches_a_hand_computation():
    # column weights w_i r / r_i: 3 and 4.5 in column 0, normalized per column; column 1 the rank-2 alone
    want = [[(3 * 10 + 4.5 * 30) / 7.5, 40.0, 3.0], [(3 * 20 + 4.5 * 50) / 7.5, 60.0, 6.0]]
    np.testing.assert_allclose(_two_narrow_updates("rank"), want, rtol=1e-6)


def test_mass_weighting_matches_a_hand_computation():
    # B'[:, j] = B_g[:, j] + Σ_{i∈S_j} w_i (r / r_i) (B_i - B_g)[:, j] / Σ_i w_i, here Σ_i w_i = 4
    want = [[1 + (3 * 9 + 4.5 * 29) / 4, 2 + 4.5 * 38 / 4, 3.0],
            [4 + (3 * 16 + 4.5 * 46) / 4, 5 + 4.5 * 55 / 4, 6.0]]
    np.testing.assert_allclose(_two_narrow_updates("mass"), want, rtol=1e-6)


@pytest.mark.parametrize("weighting", ["rank", "mass"])
def test_every_weighting_at_full_rank_is_the_trained_mean_bit_for_bit(rng, weighting):
    g = make_global(rng)
    updates = [make_update(g, "ffa", rng) for _ in range(3)]
    results = {}
    for w in ("trained", weighting):
        agg = make_aggregator("ffa", g, nested_weighting=w)
        for weight, scale, update in zip((3, 1, 7), (1.0, 0.25, 1.0), updates, strict=True):
            agg.add(update, weight, scale)
        results[w] = agg.result()
    for name in g:
        np.testing.assert_array_equal(results[weighting][name], results["trained"][name])


def test_mass_weighting_gives_each_volunteer_the_same_total_weight_whatever_its_rank(rng):
    """Under mass, a rank-r_i update's columns each move by (r / r_i) w_i / W of its delta: summed over
    its r_i columns, r w_i / W, as at full rank."""
    g = make_global(rng, r=4)
    b = next(n for n in g if ".lora_B." in n)
    ones = {n: v + 1.0 for n, v in g.items() if ".lora_B." in n}  # a delta of 1 everywhere
    for rank in (1, 2, 4):
        agg = make_aggregator("ffa", g, nested_weighting="mass")
        agg.add(_narrow(ones, rank), 2.0)
        agg.add({n: v.copy() for n, v in g.items() if ".lora_B." in n}, 6.0)  # a full-rank no-op
        moved = (agg.result()[b].astype(np.float64) - g[b]).mean(axis=0)
        np.testing.assert_allclose(moved.sum(), 4 * 2.0 / 8, rtol=1e-5)


def test_an_unknown_weighting_is_refused(rng):
    with pytest.raises(ConfigError, match="nested_weighting"):
        make_aggregator("ffa", make_global(rng), nested_weighting="heavy")


def test_a_window_folds_into_its_own_columns_wrapping_past_the_last():
    """A rank-2 window starting at column 3 of 4 is columns 3 and 0, in that order."""
    g = {"m.lora_A.weight": np.ones((4, 2), np.float32),
         "m.lora_B.weight": np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)}
    agg = make_aggregator("ffa", g, nested_weighting="trained")
    agg.add({"m.lora_B.weight": np.array([[10.0, 20.0, 30.0, 40.0]], np.float32)}, weight=1)
    agg.add({"m.lora_B.weight": np.array([[50.0, 60.0]], np.float32)}, weight=1, start=3)
    b = agg.result()["m.lora_B.weight"]
    np.testing.assert_array_equal(b, np.array([[(10 + 60) / 2, 20.0, 30.0, (40 + 50) / 2]], np.float32))
    assert agg.metrics() == {"nested_rank_updates": 1.0, "untrained_columns": 0.0}


def test_a_window_at_zero_is_the_first_columns_bit_for_bit(rng):
    g = make_global(rng, r=4)
    update = _narrow(make_update(g, "ffa", np.random.default_rng(1)), 2)
    plain, windowed = make_aggregator("ffa", g), make_aggregator("ffa", g)
    plain.add(update, weight=3)
    windowed.add(update, weight=3, start=0)
    for name, value in plain.result().items():
        np.testing.assert_array_equal(value, windowed.result()[name])


@pytest.mark.parametrize("mode", ["fedavg", "exact"])
def test_modes_that_train_a_refuse_a_window(rng, mode):
    g = make_global(rng, r=4)
    agg = make_aggregator(mode, g)
    with pytest.raises(AggregationError, match="folds no window"):
        agg.add(make_update(g, mode, np.random.default_rng(1)), weight=1, start=1)


def test_a_full_width_update_has_no_window(rng):
    g = make_global(rng, r=4)
    agg = make_aggregator("ffa", g)
    with pytest.raises(AggregationError, match="cannot start at 2"):
        agg.add(make_update(g, "ffa", np.random.default_rng(1)), weight=1, start=2)


def test_the_window_rolls_on_one_column_a_round_from_the_signers_place():
    assert [window_start(t, 4, 16) for t in (1, 2, 15, 16, 17)] == [1, 2, 15, 0, 1]
    signer = "00000005" + "ab" * 28  # a fingerprint: its first 8 hex digits place the window
    assert [window_start(t, 4, 16, signer) for t in (1, 2, 10, 11)] == [6, 7, 15, 0]
    starts = {window_start(1, 4, 16, SigningKey.generate().public.fingerprint) for _ in range(40)}
    assert len(starts) > 4  # volunteers' windows are staggered
    assert window_start(5, 16, 16, signer) == 0  # the project's rank: no window, every column
