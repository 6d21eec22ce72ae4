"""The async bench's verdicts (issue 13): what counts as reaching the sync run's loss, and in what time."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import async_bench  # noqa: E402  (bench/ is a folder of scripts, put on the path above)


def releases(*points: tuple[float, float]) -> list[dict]:
    return [{"seconds": s, "mean_heldout_loss": loss} for s, loss in points]


def test_slow_target_is_the_time_async_first_reaches_the_sync_final_loss():
    runs = {"slow-sync": {"releases": releases((50, 2.0), (100, 1.0))},
            "slow-async": {"releases": releases((10, 1.8), (30, 1.2), (45, 0.99), (60, 0.9))}}
    verdict = async_bench.verdicts(runs)["slow"]
    assert verdict["ratio"] == 0.45 and verdict["met"]
    runs["slow-async"]["releases"] = releases((10, 1.8), (55, 1.0))
    assert async_bench.verdicts(runs)["slow"] == {**verdict, "async_seconds_to_that_loss": 55,
                                                  "ratio": 0.55, "met": False}
    runs["slow-async"]["releases"] = releases((10, 1.8))
    assert async_bench.verdicts(runs)["slow"]["met"] is False


def test_equal_target_compares_at_the_sync_runs_final_time():
    runs = {"equal-sync": {"releases": releases((50, 2.0), (100, 1.0))},
            "equal-async": {"releases": releases((40, 1.5), (95, 0.98), (120, 0.5))}}
    verdict = async_bench.verdicts(runs)["equal"]
    assert verdict["async_loss_at_that_time"] == 0.98 and verdict["met"]
    runs["equal-async"]["releases"] = releases((40, 1.5), (95, 1.02), (120, 0.5))
    assert not async_bench.verdicts(runs)["equal"]["met"]
