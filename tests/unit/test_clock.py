"""services.common.clock: wall-clock readings never crash, never go negative or backwards."""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.clock import Clock, to_utc

LOGGER = "services.common.clock"


def STILL() -> float:
    """A monotonic clock that does not move: time given while the wall clock is unusable
    stays the last good reading (see the tests with a moving one below)."""
    return 0.0


def wall_of(readings: Iterable[float]) -> Callable[[], float]:
    it = iter(readings)
    return lambda: next(it)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING
    ]


def test_normal_readings_pass_through(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    clock = Clock(wall=wall_of([1000.0, 1000.0, 1001.25, 5000.5]), monotonic=STILL)
    assert [clock.timestamp() for _ in range(4)] == [1000.0, 1000.0, 1001.25, 5000.5]
    assert warnings(caplog) == []


def test_now_is_an_aware_utc_datetime() -> None:
    clock = Clock(wall=lambda: 86400.0, monotonic=STILL)
    assert clock.now() == datetime(1970, 1, 2, tzinfo=UTC)


def test_monotonic_is_the_injected_one() -> None:
    clock = Clock(wall=lambda: 1.0, monotonic=lambda: 42.0)
    assert clock.monotonic() == 42.0


def test_before_epoch_goes_on_from_the_last_good_time(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    clock = Clock(wall=wall_of([100.0, -5.0, -5.0, 101.0]), monotonic=STILL)
    assert [clock.timestamp() for _ in range(4)] == [100.0, 100.0, 100.0, 101.0]
    [message] = warnings(caplog)
    assert "-5.0" in message


def test_before_epoch_as_first_reading_is_not_negative(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    clock = Clock(wall=lambda: -5.0, monotonic=STILL)
    assert clock.timestamp() == 0.0
    assert clock.now() == datetime(1970, 1, 1, tzinfo=UTC)
    assert len(warnings(caplog)) == 1


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_not_a_time_goes_on_from_the_last_good_time(
    bad: float, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    clock = Clock(wall=wall_of([100.0, bad, bad, bad, 102.0]), monotonic=STILL)
    assert [clock.timestamp() for _ in range(5)] == [100.0, 100.0, 100.0, 100.0, 102.0]
    assert len(warnings(caplog)) == 1


def test_backwards_step_warns_once_per_step(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    clock = Clock(
        wall=wall_of([100.0, 90.0, 95.0, 99.0, 101.0, 50.0, 60.0, 102.0]), monotonic=STILL
    )
    seen = [clock.timestamp() for _ in range(8)]
    assert seen == [100.0, 100.0, 100.0, 100.0, 101.0, 101.0, 101.0, 102.0]
    messages = warnings(caplog)
    assert len(messages) == 2, messages
    assert "stepped backwards by 10.000s" in messages[0]
    assert "stepped backwards by 51.000s" in messages[1]


def test_unreadable_wall_clock_does_not_crash_and_warns_once_per_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    state = {"broken": False}

    def wall() -> float:
        if state["broken"]:
            raise OSError("clock_gettime failed")
        return 100.0

    clock = Clock(wall=wall, monotonic=STILL)
    assert clock.timestamp() == 100.0
    state["broken"] = True
    assert [clock.timestamp() for _ in range(5)] == [100.0] * 5
    # One outage, one warning: a clock that stays unreadable must not flood the log.
    assert len(warnings(caplog)) == 1, warnings(caplog)


def is_bad(reading: float, last: float) -> bool:
    return not math.isfinite(reading) or reading < 0 or reading < last


@given(
    st.lists(
        st.one_of(
            st.floats(min_value=-1e6, max_value=1e10, allow_nan=False),
            st.sampled_from([math.nan, math.inf, -math.inf, -5.0, 0.0]),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_any_readings_give_non_negative_non_decreasing_times(readings: list[float]) -> None:
    logger = logging.getLogger(LOGGER)
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(logging.WARNING)
    logger.addHandler(handler)
    try:
        clock = Clock(wall=wall_of(readings), monotonic=STILL)
        seen = [clock.timestamp() for _ in readings]
    finally:
        logger.removeHandler(handler)

    last, expected, steps, in_step = 0.0, [], 0, False
    for reading in readings:
        if is_bad(reading, last):
            steps += 0 if in_step else 1
            in_step = True
        else:
            last, in_step = reading, False
        expected.append(last)

    assert seen == expected
    assert all(math.isfinite(t) and t >= 0 for t in seen)
    assert all(a <= b for a, b in itertools.pairwise(seen))
    assert len(records) == steps


def test_to_utc() -> None:
    naive = datetime(2024, 1, 1, 12, 0)
    assert to_utc(naive) == datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
    assert to_utc(naive).tzinfo is UTC
    plus_two = datetime(2024, 1, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    assert to_utc(plus_two) == datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
    assert to_utc(plus_two).utcoffset() == timedelta(0)


class Moving:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_backward_step_goes_on_at_half_speed_until_the_wall_clock_catches_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """NTP steps the clock back 100 s: time does not stand still for 100 s (leases,
    retry backoffs and redeliveries would stand still with it); it goes on at half
    speed, and follows the wall clock again once that has caught up."""
    caplog.set_level(logging.WARNING, LOGGER)
    mono = Moving()
    wall = {"now": 1000.0}
    clock = Clock(wall=lambda: wall["now"], monotonic=mono)
    assert clock.timestamp() == 1000.0

    def after(seconds: float) -> float:
        mono.now += seconds
        wall["now"] += seconds
        return clock.timestamp()

    wall["now"] -= 100.0  # the step
    assert clock.timestamp() == 1000.0
    assert after(10) == 1005.0  # the wall clock reads 910
    assert after(10) == 1010.0
    assert after(180) == 1100.0  # caught up: the wall clock reads 1100
    assert after(1) == 1101.0
    [message] = warnings(caplog)
    assert "stepped backwards by 100.000s" in message and "half speed" in message


def test_a_reading_past_the_year_9999_is_not_a_time(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    clock = Clock(wall=wall_of([100.0, 1e12]), monotonic=STILL)
    assert clock.timestamp() == 100.0
    assert clock.now() == datetime.fromtimestamp(100.0, tz=UTC)  # no ValueError
    assert len(warnings(caplog)) == 1


def test_many_threads_on_a_well_behaved_clock_see_no_step_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The real clocks, read by 8 threads at once (each reading takes a moment, as under
    load): no "stepped backwards by 0.000s" warning, and no thread sees time go back."""
    caplog.set_level(logging.WARNING, LOGGER)

    def slow_wall() -> float:
        now = time.time()
        time.sleep(0.0002)  # another thread runs between the reading and its use
        return now

    clock = Clock(wall=slow_wall, monotonic=time.monotonic)
    seen: list[list[float]] = [[] for _ in range(8)]
    start = threading.Barrier(len(seen))

    def read(mine: list[float]) -> None:
        start.wait()
        for _ in range(100):
            mine.append(clock.timestamp())

    threads = [threading.Thread(target=read, args=(mine,)) for mine in seen]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert warnings(caplog) == []
    assert all(a <= b for mine in seen for a, b in itertools.pairwise(mine))


def test_a_monotonic_clock_read_backwards_does_not_count_an_interval_twice() -> None:
    """While the wall clock is behind, time goes on at half the monotonic clock's rate
    from its mark; a monotonic reading below the mark (an injected clock, or a reading
    from before another one) must not move the mark back, or time would run ahead."""
    mono = Moving()
    wall = {"now": 1000.0}
    clock = Clock(wall=lambda: wall["now"], monotonic=mono)
    mono.now = 10.0
    assert clock.timestamp() == 1000.0
    wall["now"] = 500.0  # stepped back
    mono.now = 4.0  # read back
    assert clock.timestamp() == 1000.0
    mono.now = 12.0
    assert clock.timestamp() == 1001.0  # 2 s since the mark at 10, at half speed
