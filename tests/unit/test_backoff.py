"""services.common.backoff: bounded, jittered, growing delays."""

from __future__ import annotations

import itertools
import random
import statistics

from hypothesis import given
from hypothesis import strategies as st

from services.common.backoff import backoff

attempts_st = st.integers(min_value=-10, max_value=10_000)
base_st = st.floats(min_value=0.0, max_value=100.0)
cap_st = st.floats(min_value=0.0, max_value=1000.0)


@given(attempts_st, base_st, cap_st, st.integers(0, 2**32))
def test_delay_stays_within_its_bounds(attempts: int, base: float, cap: float, seed: int) -> None:
    delay = backoff(attempts, base, cap, random.Random(seed))
    upper = min(cap, base * 2 ** min(max(attempts, 0), 30))
    assert delay <= cap
    assert delay <= upper
    assert delay >= min(base / 2, upper)
    if upper >= base / 2:
        assert delay >= base / 2


@given(st.integers(0, 10_000), st.integers(0, 2**32))
def test_defaults_never_exceed_thirty_seconds(attempts: int, seed: int) -> None:
    delay = backoff(attempts, rng=random.Random(seed))
    assert 0.1 <= delay <= 30.0


@given(attempts_st, base_st, cap_st, st.integers(0, 2**32))
def test_same_seed_same_delay(attempts: int, base: float, cap: float, seed: int) -> None:
    assert backoff(attempts, base, cap, random.Random(seed)) == backoff(
        attempts, base, cap, random.Random(seed)
    )


def test_delays_grow_with_attempts_on_average_until_the_cap() -> None:
    rng = random.Random(1)
    means = [statistics.fmean(backoff(n, 0.2, 30.0, rng) for _ in range(4000)) for n in range(12)]
    # upper bound 0.2 * 2^n reaches the 30 s cap at n = 8
    for before, after in itertools.pairwise(means[:8]):
        assert after > before * 1.5
    assert all(m <= 30.0 for m in means)
    assert abs(means[10] - means[11]) < 1.0


def test_negative_attempts_count_as_zero() -> None:
    delays = [backoff(-3, 1.0, 60.0, random.Random(s)) for s in range(200)]
    assert all(0.5 <= d <= 1.0 for d in delays)


def test_two_retriers_do_not_come_back_together() -> None:
    rng = random.Random(7)
    delays = {backoff(5, 1.0, 60.0, rng) for _ in range(50)}
    assert len(delays) == 50
