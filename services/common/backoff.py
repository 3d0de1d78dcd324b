"""Exponential backoff with jitter, for every retry loop in the suite."""

from __future__ import annotations

import random


def backoff(
    attempts: int, base: float = 0.2, cap: float = 30.0, rng: random.Random | None = None
) -> float:
    """A delay between base/2 and min(cap, base * 2^attempts): grows, never past the cap,
    and two retriers that failed together do not come back together."""
    upper = min(cap, base * (2 ** min(max(attempts, 0), 30)))
    return (rng or random).uniform(min(base / 2, upper), upper)
