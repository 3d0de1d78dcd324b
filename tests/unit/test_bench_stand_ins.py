"""The benchmarks' stand-ins must fit the ports they stand in for: a stand-in that lacks a
method makes the service fail on every call to it while the figures are taken."""

from __future__ import annotations

import pytest

from bench.common import check_fits, misfits
from bench.jobs_bench import NoopQueue
from services.jobs.domain import Job
from services.jobs.relay import QueuePort


def test_the_jobs_bench_stand_in_queue_fits_the_relays_port() -> None:
    assert misfits(NoopQueue(), QueuePort) == []


class Stale:
    """A stand-in from before BatchEnqueue, with a cancel that lost a parameter."""

    def enqueue(self, job: Job) -> None:
        pass

    def cancel(self, job_id: str) -> None:
        pass


def test_a_stand_in_that_no_longer_fits_stops_the_bench_naming_what_is_wrong() -> None:
    with pytest.raises(SystemExit) as stopped:
        check_fits(Stale(), QueuePort)
    message = str(stopped.value)
    assert "Stale no longer fits services.jobs.relay.QueuePort" in message
    assert "enqueue_many() is missing" in message
    assert "cancel(job_id) should take (job_id, generation, timeout)" in message
