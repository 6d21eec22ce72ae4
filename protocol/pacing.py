"""How long to wait before asking again: quick polls right after activity, slower as a wait grows.

Every hop of a round is a poll (the coordinator asks its SuperLink for replies,
a SuperNode asks the SuperLink for tasks, a node's runner asks its SuperNode).
A fixed interval either wastes seconds per round (Flower's 3 s) or hammers the
server while a large community idles between rounds. A `Pacer` bounds the
latency a poll adds to a fraction of the wait already spent:

    interval = clamp(ratio x seconds since the wait began, floor, ceiling)

With ratio 0.05, something that arrives 0.2 s into a wait is seen at the floor's
delay and something that arrives after a minute within 3 s (5%); the number of
polls grows with the logarithm of the wait, not linearly.
"""

from __future__ import annotations

import time
from collections.abc import Callable

RATIO = 0.05
"""Added latency as a fraction of the time already waited."""


class Pacer:
    """Poll intervals for one kind of wait; `restart()` when the awaited thing happened."""

    def __init__(self, floor: float, ceiling: float, ratio: float = RATIO,
                 clock: Callable[[], float] = time.monotonic):
        if not 0 < floor <= ceiling:
            raise ValueError(f"pacing needs 0 < floor <= ceiling, got floor={floor}, ceiling={ceiling}")
        if ratio <= 0:
            raise ValueError(f"pacing ratio must be positive, got {ratio}")
        self.floor, self.ceiling, self.ratio, self.clock = floor, ceiling, ratio, clock
        self.since = clock()

    def restart(self) -> None:
        """A wait begins now (something just happened: the next thing is likely soon)."""
        self.since = self.clock()

    def waited(self) -> float:
        return self.clock() - self.since

    def interval(self) -> float:
        """Seconds to sleep before the next poll."""
        return min(self.ceiling, max(self.floor, self.ratio * self.waited()))
