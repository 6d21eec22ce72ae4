"""Poll pacing: quick at first, the added latency a fixed fraction of the wait, within bounds."""

from __future__ import annotations

import pytest

from loracommons.protocol.pacing import Pacer


class FakeClock:
    def __init__(self) -> None:
        self.t = 50.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize(("waited", "interval"), [(0, 0.02), (0.3, 0.02), (2, 0.1), (8, 0.4), (60, 0.5)])
def test_interval_is_five_percent_of_the_wait_within_floor_and_ceiling(waited, interval):
    clock = FakeClock()
    pace = Pacer(0.02, 0.5, clock=clock)
    clock.t += waited
    assert pace.interval() == pytest.approx(interval)


def test_restart_makes_polls_quick_again():
    clock = FakeClock()
    pace = Pacer(0.02, 0.5, clock=clock)
    clock.t += 100
    assert pace.interval() == 0.5
    pace.restart()
    assert pace.interval() == 0.02 and pace.waited() == 0


def test_polls_over_a_long_wait_grow_with_its_logarithm():
    clock = FakeClock()
    pace = Pacer(0.1, 3.0, clock=clock)
    polls = 0
    while pace.waited() < 60:
        clock.t += pace.interval()
        polls += 1
    assert polls < 110  # a fixed 0.1 s poll: 600; Flower's fixed 3 s: 20 (and up to 3 s late)


@pytest.mark.parametrize(("floor", "ceiling", "ratio"), [(0, 1, 0.05), (2, 1, 0.05), (0.1, 1, 0)])
def test_pacer_refuses_bad_settings(floor, ceiling, ratio):
    with pytest.raises(ValueError, match="pacing"):
        Pacer(floor, ceiling, ratio)
