"""Lease and worker timers on the monotonic clock: what the reaper may end, and when."""

from __future__ import annotations

from services.queue.timers import Timers


class Monotonic:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_timer_runs_out_its_length_after_it_was_started() -> None:
    clock = Monotonic()
    timers = Timers(clock)
    timers.start("token-1", "deadline-a", 10)
    clock.now += 9.9
    assert not timers.ran_out("token-1", "deadline-a", 10)
    clock.now += 0.1
    assert timers.ran_out("token-1", "deadline-a", 10)


def test_a_timer_for_another_value_starts_when_first_found_late() -> None:
    """The store holds a deadline this replica never wrote (another replica's heartbeat):
    its timer starts now, whatever the old one said."""
    clock = Monotonic()
    timers = Timers(clock)
    timers.start("token-1", "deadline-a", 10)
    clock.now += 60
    assert not timers.ran_out("token-1", "deadline-b", 10)
    clock.now += 10
    assert timers.ran_out("token-1", "deadline-b", 10)
    assert not timers.ran_out("token-2", "deadline-c", 10)  # never seen: starts now


def test_pruned_and_forgotten_timers_start_again() -> None:
    clock = Monotonic()
    timers = Timers(clock)
    timers.start("ended-long-ago", 1, 10)
    timers.start("running", 1, 100)
    timers.start("given-back", 1, 100)
    timers.forget(["given-back"])
    clock.now += 71  # "ended-long-ago" ran out 61 s ago
    timers.prune(grace=60)

    assert len(timers) == 1
    assert not timers.ran_out("ended-long-ago", 1, 10)  # a delay, never an early end
    clock.now += 30
    assert timers.ran_out("running", 1, 100)
