"""Issue 15 item 4: a project made by `coordinator init` with open membership bounds every update.

The review replaced the model of a default open project with one x100 update claiming 10,000
examples among nine honest ones (no norm bound, no clipping, weight cap 10,000: cosine 1.0000 to the
attacker's target). Open projects now get median clipping and a weight cap of 256 where the caller did
not choose; `init` prints what protects the project, and says "unprotected" where nothing does.
The held-out-loss trial against these defaults is tests/security/test_model_replacement.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from loracommons.coordinator.config import OPEN_MAX_EXAMPLES_WEIGHT, ProjectConfig, init_project, load_config
from loracommons.coordinator.robust import delta_norm
from loracommons.coordinator.rules import protections
from tests.coordinator.conftest import make_global, make_update
from tests.coordinator.test_aggregation import _run_round
from tests.e2e.procs import cli


def test_open_project_gets_median_clipping_and_a_low_weight_cap(tmp_path):
    cfg = init_project(tmp_path / "p", "m")
    assert load_config(tmp_path / "p") == cfg
    assert (cfg.aggregation.clip, cfg.aggregation.max_examples_weight) == ("median", OPEN_MAX_EXAMPLES_WEIGHT)
    assert cfg.round.min_volunteers == 2  # the default minimum: the lower median of two is the smaller
    assert not any(line.startswith("unprotected") for line in protections(cfg))


def test_allowlist_and_explicit_choices_are_kept(tmp_path):
    closed = init_project(tmp_path / "a", "m", membership="allowlist")
    assert (closed.aggregation.clip, closed.aggregation.max_examples_weight) == ("none", 10_000)
    chosen = init_project(tmp_path / "b", "m", aggregation={"clip": "none", "max_examples_weight": 50})
    assert (chosen.aggregation.clip, chosen.aggregation.max_examples_weight) == ("none", 50)
    assert protections(chosen)[-1].startswith("unprotected: nothing bounds an update's size; any key")


def test_dp_and_a_single_volunteer_get_no_median_clip(tmp_path):
    dp = init_project(tmp_path / "dp", "m", privacy={"dp": True})
    assert dp.aggregation.clip == "none"  # dp clips to clip_norm itself (a median would be refused)
    assert any(line.startswith("dp: every delta is clipped") for line in protections(dp))
    alone = init_project(tmp_path / "one", "m", round={"min_volunteers": 1})
    assert alone.aggregation.clip == "none"  # one update is its own median: nothing to clip against
    assert protections(alone)[-1].startswith("unprotected")


def test_init_prints_its_protective_defaults(tmp_path):
    out = cli("coordinator", "init", str(tmp_path / "p"), "--base-model", "m").stdout
    text = " ".join(out.split())  # Rich wraps long lines
    assert "protective defaults of an open project" in text
    assert "clip = median: deltas above 2 x the round's median norm are scaled down" in text
    assert f"max_examples_weight = {OPEN_MAX_EXAMPLES_WEIGHT}" in text and "unprotected" not in text
    closed = cli("coordinator", "init", str(tmp_path / "q"), "--base-model", "m", "--membership", "allowlist")
    assert "unprotected: nothing bounds an update's size" in " ".join(closed.stdout.split())


@pytest.mark.parametrize("mode", ["ffa", "exact", "fedavg"])
def test_two_updates_one_x100_is_clipped_to_twice_the_honest_one(mode):
    """min_volunteers = 2 (the default): the bound is 2 x the smaller norm; the attacker cannot raise it."""
    rng = np.random.default_rng(1)
    g = make_global(rng)
    honest = make_update(g, mode, rng)
    attack = {n: g[n] + 100 * (v - g[n]) for n, v in make_update(g, mode, rng).items()}
    base = ProjectConfig()
    cfg = ProjectConfig(
        aggregation=dataclasses.replace(base.aggregation, mode=mode, clip="median", max_examples_weight=256)
    )
    outcome, digests = _run_round(cfg, g, [honest, attack], examples=[200, 10_000])
    honest_norm = delta_norm(honest, g, mode)
    assert outcome.metrics["clip_bound"] == pytest.approx(2 * honest_norm, rel=1e-4)
    assert outcome.clip_scales[digests[0]] == 1.0 and outcome.clip_scales[digests[1]] < 0.05
    assert outcome.metrics["total_weight"] == 200 + 256
    shift = delta_norm({n: outcome.tensors[n] for n in honest}, g, mode)
    assert shift < 2.5 * honest_norm  # unbounded, the x100 update moved the global ~55 x as far
