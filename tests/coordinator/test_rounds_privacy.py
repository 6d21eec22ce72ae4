"""Central DP in the round loop: epsilon reported per release, the budget stops training."""

from __future__ import annotations

from types import SimpleNamespace

from loracommons.coordinator import privacy
from loracommons.coordinator.config import ProjectConfig
from loracommons.coordinator.rounds import Coordinator


class _Store:
    def __init__(self, aggregated: int):
        self._rows = [SimpleNamespace(round=r, status="aggregated") for r in range(1, aggregated + 1)]

    def rounds(self):
        return self._rows


def coordinator(aggregated: int, **privacy_settings) -> Coordinator:
    cfg = ProjectConfig.from_dict({"privacy": {"dp": True, **privacy_settings}})
    return Coordinator(project_dir=None, cfg=cfg, store=_Store(aggregated), key=SimpleNamespace())


def test_epsilon_reported_for_the_rounds_spent():
    c = coordinator(3, noise_multiplier=2.0, delta=1e-5)
    assert c.privacy_metrics() == {"dp_epsilon": round(privacy.epsilon(3, 2.0, 1e-5), 4), "dp_delta": 1e-5,
                                   "dp_noise_multiplier": 2.0}
    one = coordinator(1, noise_multiplier=2.0).privacy_metrics()["dp_epsilon"]
    assert c.privacy_metrics()["dp_epsilon"] > one > 0


def test_budget_stops_before_epsilon_is_exceeded():
    limit = privacy.epsilon(4, 2.0, 1e-5)
    assert coordinator(3, noise_multiplier=2.0, max_epsilon=limit).privacy_budget_left()
    assert not coordinator(4, noise_multiplier=2.0, max_epsilon=limit).privacy_budget_left()


def test_no_dp_no_metrics():
    c = Coordinator(project_dir=None, cfg=ProjectConfig(), store=_Store(5), key=SimpleNamespace())
    assert c.privacy_metrics() == {} and c.privacy_budget_left()
