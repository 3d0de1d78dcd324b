"""services.worker.tracker: bounded by size and by age, whatever the clock does."""

from __future__ import annotations

import math
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.clock import Clock
from services.worker.tracker import ExecutionTracker, Outcome, TrackerLimits


class FakeTime:
    """Readings the test sets: any float, also before the epoch, backwards, NaN, infinite."""

    def __init__(self, wall: float = 1_800_000_000.0, mono: float = 100.0) -> None:
        self.wall = wall
        self.mono = mono

    def clock(self) -> Clock:
        return Clock(wall=lambda: self.wall, monotonic=lambda: self.mono)


ENDED = [o for o in Outcome if o is not Outcome.RUNNING]
LIMITS = TrackerLimits(
    max_entries=5, ttl_completed=100.0, ttl_failed=50.0, ttl_cancelled=10.0, cleanup_interval=1
)

# ---- the properties -----------------------------------------------------------------------

any_reading = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e6, max_value=1e6),
    st.just(-1.0),
    st.just(math.nan),
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("start"), st.integers(0, 12)),
        st.tuples(st.just("finish"), st.integers(0, 12), st.sampled_from(ENDED)),
        st.tuples(st.just("get"), st.integers(0, 12)),
        st.tuples(st.just("cleanup")),
        st.tuples(st.just("advance"), st.floats(0, 200)),
        st.tuples(st.just("jump"), any_reading, any_reading),
    ),
    max_size=80,
)


def key(n: int) -> str:
    return f"exec-{n}"


def start(tracker: ExecutionTracker, n: int, generation: int = 1, attempt: int = 1) -> None:
    tracker.start(key(n), f"job-{n}", generation, attempt)


def apply(tracker: ExecutionTracker, now: FakeTime, op: tuple) -> None:  # type: ignore[type-arg]
    kind = op[0]
    if kind == "start":
        start(tracker, op[1])
    elif kind == "finish":
        tracker.finish(key(op[1]), op[2], exit_code=0, output_bytes=3)
    elif kind == "get":
        entry = tracker.get(key(op[1]))
        assert entry is None or entry.job_id == f"job-{op[1]}"
    elif kind == "cleanup":
        tracker.cleanup()
    elif kind == "advance":
        now.mono += op[1]
        now.wall += op[1]
    else:
        now.wall, now.mono = op[1], op[2]


@settings(max_examples=300, deadline=None)
@given(operations, st.integers(1, 6))
def test_size_never_exceeds_the_maximum(ops: list, max_entries: int) -> None:  # type: ignore[type-arg]
    now = FakeTime()
    tracker = ExecutionTracker(
        TrackerLimits(max_entries=max_entries, ttl_completed=30, ttl_failed=20, ttl_cancelled=5),
        now.clock(),
    )
    for op in ops:
        apply(tracker, now, op)
        assert len(tracker) <= max_entries
        assert sum(tracker.counts().values()) == len(tracker)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_after_a_cleanup_no_expired_entry_remains(ops: list) -> None:  # type: ignore[type-arg]
    now = FakeTime()
    tracker = ExecutionTracker(LIMITS, now.clock())
    for op in ops:
        apply(tracker, now, op)
    tracker.cleanup()
    # A read removes an expired entry and answers None, so if the cleanup had left one,
    # fewer reads would succeed than there are entries.
    kept = len(tracker)
    found = sum(tracker.get(key(n)) is not None for n in range(13))
    assert found == kept == len(tracker)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(any_reading, any_reading), min_size=1, max_size=30))
def test_a_clock_backwards_before_the_epoch_or_nan_crashes_nothing(
    readings: list[tuple[float, float]],
) -> None:
    now = FakeTime()
    tracker = ExecutionTracker(LIMITS, now.clock())
    for i, (wall, mono) in enumerate(readings):
        now.wall, now.mono = wall, mono
        start(tracker, i % 7)
        tracker.finish(key(i % 7), ENDED[i % len(ENDED)])
        entry = tracker.get(key(i % 7))
        tracker.cleanup()
        assert len(tracker) <= LIMITS.max_entries
        if entry is not None:
            # What people read is a real time: never negative, never NaN.
            for value in (entry.started_at, entry.last_accessed, entry.ended_at):
                assert value is not None and math.isfinite(value) and value >= 0


# ---- TTL per outcome ----------------------------------------------------------------------


def finished(tracker: ExecutionTracker, n: int, outcome: Outcome) -> None:
    start(tracker, n)
    tracker.finish(key(n), outcome)


@pytest.mark.parametrize(
    ("outcome", "ttl"),
    [
        (Outcome.SUCCEEDED, 100.0),
        (Outcome.FAILED, 50.0),
        (Outcome.LOST, 50.0),
        (Outcome.CANCELLED, 10.0),
        (Outcome.RELEASED, 10.0),
    ],
)
def test_ended_entries_expire_by_the_ttl_of_their_outcome(outcome: Outcome, ttl: float) -> None:
    now = FakeTime()
    tracker = ExecutionTracker(LIMITS, now.clock())
    finished(tracker, 1, outcome)
    now.mono += ttl - 0.5
    assert tracker.cleanup() == 0
    assert len(tracker) == 1
    now.mono += 1.0
    assert tracker.cleanup() == 1
    assert len(tracker) == 0
    assert tracker.expired == 1


def test_a_running_entry_never_expires() -> None:
    now = FakeTime()
    tracker = ExecutionTracker(LIMITS, now.clock())
    start(tracker, 1)
    now.mono += 1e9
    assert tracker.cleanup() == 0
    entry = tracker.get(key(1))
    assert entry is not None and entry.outcome is Outcome.RUNNING


def test_an_expired_entry_is_not_returned_even_before_the_cleanup() -> None:
    now = FakeTime()
    tracker = ExecutionTracker(LIMITS, now.clock())
    finished(tracker, 1, Outcome.CANCELLED)
    now.mono += 11
    assert tracker.get(key(1)) is None
    assert len(tracker) == 0


def test_the_wall_clock_stepping_does_not_expire_entries() -> None:
    now = FakeTime()
    tracker = ExecutionTracker(LIMITS, now.clock())
    finished(tracker, 1, Outcome.CANCELLED)
    now.wall += 10 * 86400  # NTP jumps a day ahead: ages are on the monotonic clock
    assert tracker.cleanup() == 0
    now.mono -= 1000  # a monotonic source that goes back is held, not trusted
    assert tracker.cleanup() == 0
    now.mono += 1000 + 10
    assert tracker.cleanup() == 1


# ---- LRU eviction and reads ---------------------------------------------------------------


def test_the_least_recently_used_is_evicted_past_the_maximum() -> None:
    now = FakeTime()
    tracker = ExecutionTracker(LIMITS, now.clock())  # at most 5
    for n in range(5):
        finished(tracker, n, Outcome.SUCCEEDED)
    assert tracker.get(key(0)) is not None  # job-0 is now the most recently used
    finished(tracker, 5, Outcome.SUCCEEDED)
    assert len(tracker) == 5
    assert tracker.evicted == 1
    assert tracker.get(key(1)) is None, "job-1 was the least recently used"
    assert tracker.get(key(0)) is not None


def test_running_entries_are_evicted_only_when_nothing_else_is_left() -> None:
    now = FakeTime()
    tracker = ExecutionTracker(TrackerLimits(max_entries=3), now.clock())
    start(tracker, 0)  # running, least recently used
    finished(tracker, 1, Outcome.FAILED)
    finished(tracker, 2, Outcome.SUCCEEDED)
    start(tracker, 3)
    assert tracker.get(key(0)) is not None, "the running entry stays"
    assert tracker.get(key(1)) is None, "the oldest ended entry went instead"
    for n in (4, 5, 6):
        start(tracker, n)
    assert len(tracker) == 3


def test_every_read_updates_last_accessed() -> None:
    now = FakeTime(wall=1_800_000_000.0)
    tracker = ExecutionTracker(LIMITS, now.clock())
    finished(tracker, 1, Outcome.SUCCEEDED)
    now.wall += 30
    first = tracker.get(key(1))
    now.wall += 30
    second = tracker.get(key(1))
    assert first is not None and second is not None
    assert first.started_at == 1_800_000_000.0
    assert first.last_accessed == 1_800_000_030.0
    assert second.last_accessed == 1_800_000_060.0


def test_finish_records_the_result_and_keeps_the_start_time() -> None:
    now = FakeTime(wall=1_800_000_000.0)
    tracker = ExecutionTracker(LIMITS, now.clock())
    tracker.start("e-9", "job-9", 2, 3)
    now.wall += 5
    tracker.finish("e-9", Outcome.FAILED, exit_code=3, error="exited", output_bytes=7)
    entry = tracker.get("e-9")
    assert entry is not None
    assert (entry.job_id, entry.generation, entry.attempt) == ("job-9", 2, 3)
    assert (entry.outcome, entry.exit_code, entry.error, entry.output_bytes) == (
        Outcome.FAILED,
        3,
        "exited",
        7,
    )
    assert (entry.started_at, entry.ended_at) == (1_800_000_000.0, 1_800_000_005.0)


def test_an_attempt_run_twice_is_two_executions() -> None:
    now = FakeTime()
    tracker = ExecutionTracker(LIMITS, now.clock())
    tracker.start("first", "job-1", 1, 1)
    tracker.finish("first", Outcome.RELEASED)
    now.wall += 1
    tracker.start("second", "job-1", 1, 1)
    tracker.finish("second", Outcome.SUCCEEDED, exit_code=0)
    assert [(e.execution_id, e.outcome) for e in tracker.find("job-1")] == [
        ("first", Outcome.RELEASED),
        ("second", Outcome.SUCCEEDED),
    ]
    assert tracker.find("job-2") == []


def test_finishing_an_entry_that_was_evicted_does_not_grow_the_tracker() -> None:
    tracker = ExecutionTracker(TrackerLimits(max_entries=1))
    tracker.start("a", "job-a", 1, 1)
    tracker.start("b", "job-b", 1, 1)  # every entry runs: the oldest running one goes
    tracker.finish("a", Outcome.SUCCEEDED)
    assert len(tracker) == 1
    assert tracker.get("a") is None


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError):
        ExecutionTracker(TrackerLimits(max_entries=0))
    tracker = ExecutionTracker(LIMITS)
    with pytest.raises(ValueError):
        tracker.finish(key(1), Outcome.RUNNING)


# ---- the periodic cleanup -----------------------------------------------------------------


def test_the_cleanup_runs_periodically_in_its_own_thread() -> None:
    now = FakeTime()
    limits = TrackerLimits(ttl_cancelled=1.0, cleanup_interval=0.05)
    tracker = ExecutionTracker(limits, now.clock())
    finished(tracker, 1, Outcome.CANCELLED)
    tracker.start_cleanup()
    try:
        now.mono += 2
        deadline = time.monotonic() + 5
        while len(tracker) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(tracker) == 0, "the cleanup thread removed the expired entry"
    finally:
        tracker.stop_cleanup()
    assert not any(t.name == "tracker-cleanup" for t in threading.enumerate())
