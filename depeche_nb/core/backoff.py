"""Bounded exponential backoff with jitter: the one schedule workers and listeners
use between attempts to reach a database that went away."""

from __future__ import annotations

import random
from collections.abc import Iterator

FIRST_DELAY_S = 0.05
MAX_DELAY_S = 2.0


def backoff_delays(first: float = FIRST_DELAY_S, cap: float = MAX_DELAY_S) -> Iterator[float]:
    """Endless delays: `first`, doubling up to `cap`, each drawn from [50 %, 100 %] of its
    step so that many workers that lost the same server do not return in lockstep."""
    step = first
    while True:
        yield step * random.uniform(0.5, 1.0)
        step = min(step * 2, cap)
