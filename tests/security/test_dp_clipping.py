"""Issue 15 item 3: under dp every update is clipped to [privacy] clip_norm, whichever other rule runs.

The review found that with `free_rider_ratio > 0` (a rule that holds the round's updates until the
end) the held path never applied clip_norm: updates of norm ~160 passed unclipped while epsilon was
still reported. Every configuration that dp accepts is run here with large updates, and each update's
delta must end up at norm <= clip_norm; what dp cannot clip or account for (median bound, robust
rules, the free-rider floor) is refused.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from loracommons.coordinator.admission import admit, context_for, expected_for
from loracommons.coordinator.aggregation import RoundAggregator
from loracommons.coordinator.config import ConfigError, ProjectConfig
from loracommons.coordinator.robust import delta_norm
from tests.coordinator.conftest import Signer, make_global, make_update

CLIP = 1.0
DP = {"dp": True, "clip_norm": CLIP, "noise_multiplier": 1e-6}  # ~no noise: the clipping is what shows


def _cfg(min_volunteers: int = 3, **agg: object) -> ProjectConfig:
    base = ProjectConfig()
    return ProjectConfig(
        round=dataclasses.replace(base.round, volunteers_per_round=10, min_volunteers=min_volunteers),
        aggregation=dataclasses.replace(base.aggregation, **agg),
        privacy=dataclasses.replace(base.privacy, **DP),
    )


def _round(cfg: ProjectConfig, g: dict, updates: list[dict]):  # noqa: ANN202
    signer = Signer(cfg, g)
    seen: set[str] = set()
    ctx = context_for(cfg, expected_for(cfg, signer.round, signer.nonce, g, signer.digest), g, admitted=seen)
    rnd = RoundAggregator(cfg, g, rng=np.random.default_rng(0))
    norms = []
    for tensors in updates:
        verdict = admit(signer.envelope(tensors), ctx)
        assert verdict.accepted, verdict.message
        seen.add(verdict.signer)
        norms.append(verdict.delta_norm)
        rnd.offer(verdict)
    return rnd.finish(), norms


@pytest.mark.parametrize(
    "agg",
    [{}, {"max_examples_weight": 5}, {"mode": "fedavg"}],
    ids=["ffa", "ffa_capped", "fedavg"],
)
def test_every_dp_configuration_clips_to_clip_norm(agg):
    rng = np.random.default_rng(3)
    g = make_global(rng, layers=4, hidden=64, kv=64)
    mode = str(agg.get("mode", "ffa"))
    updates = [make_update(g, mode, rng, step=5.0) for _ in range(5)]  # delta norms ~ 100+
    outcome, norms = _round(_cfg(**agg), g, updates)
    assert min(norms) > 50 * CLIP
    assert outcome.tensors is not None and len(outcome.aggregated) == 5
    scales = outcome.clip_scales.values()
    assert all(scale <= CLIP / n * 1.0001 for scale, n in zip(scales, norms, strict=True))
    assert outcome.metrics["clipped"] == 5
    # the mean of clipped deltas has norm <= clip_norm (noise is ~0 here)
    assert delta_norm({n: outcome.tensors[n] for n in updates[0]}, g, mode) <= CLIP * 1.001


@pytest.mark.parametrize(
    ("agg", "words"),
    [
        ({"clip": "median"}, "median bound depends on private data"),
        ({"robust": "krum", "krum_f": 1, "min_volunteers": 5}, "cannot be combined with robust"),
        ({"robust": "trimmed_mean", "min_volunteers": 5}, "cannot be combined with robust"),
        ({"mode": "exact"}, "not supported with mode"),
        # the free-rider floor is a median over everyone's norms: not covered by the accountant
        ({"free_rider_ratio": 0.2}, "reported epsilon would understate"),
    ],
)
def test_dp_refuses_what_it_cannot_clip(agg, words):
    with pytest.raises(ConfigError, match=words):
        _cfg(**agg)
