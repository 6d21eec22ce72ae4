"""The learning rate's shape, one owner for the two places that use it: a volunteer's steps within a
round (`client.trainer.lr_factor`) and a project's rounds (`coordinator.config`, `[round] lr_schedule`).
"""

from __future__ import annotations

import math

FLOOR = 0.1
"""A cosine ends at this fraction of the peak rate."""


def cosine(progress: float) -> float:
    """The factor on the peak rate `progress` of the way through: 1 at 0, FLOOR at 1 and beyond, half a
    cosine between."""
    progress = min(1.0, max(0.0, progress))
    return FLOOR + (1.0 - FLOOR) * 0.5 * (1.0 + math.cos(math.pi * progress))
