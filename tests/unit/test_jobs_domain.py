"""services.jobs.domain: the job state machine, cancel, retry and the queue's reports."""

from __future__ import annotations

import copy
import dataclasses
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.errors import FailedPrecondition
from services.jobs import domain
from services.jobs.domain import RETRYABLE, TERMINAL, TRANSITIONS, Job, JobState, StatusUpdate
from services.queue import domain as queue
from services.queue.domain import Item, ItemState, Outcome, Report, RetryPolicy

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def make_job(state: JobState = JobState.PENDING, **fields: object) -> Job:
    job = Job(
        job_id="j-1",
        request_id=None,
        spec_json="{}",
        spec_hash="h",
        state=state,
        created_at=T0,
        updated_at=T0,
    )
    for name, value in fields.items():
        setattr(job, name, value)
    return job


def update(
    job: Job, state: JobState, sequence: int, generation: int | None = None, **fields: object
) -> StatusUpdate:
    return StatusUpdate(
        job_id=job.job_id,
        generation=job.generation if generation is None else generation,
        sequence=sequence,
        state=state,
        at=T0 + timedelta(seconds=sequence),
        **fields,  # type: ignore[arg-type]
    )


def test_transition_table_is_complete_and_terminal_states_only_retry_or_redrive() -> None:
    assert set(TRANSITIONS) == set(JobState)
    for state in TERMINAL:
        assert state.terminal
        # RetryJob (PENDING); a FAILED job's dead letter may also be redriven (QUEUED).
        allowed = (
            {JobState.PENDING, JobState.QUEUED} if state is JobState.FAILED else {JobState.PENDING}
        )
        assert TRANSITIONS[state] <= allowed
    assert all(JobState.PENDING not in TRANSITIONS[s] for s in JobState if not s.terminal)
    assert {s for s in TERMINAL if TRANSITIONS[s]} == RETRYABLE


# ---- cancel ------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [JobState.PENDING, JobState.QUEUED, JobState.RUNNING])
def test_cancel_a_live_job(state: JobState) -> None:
    job = make_job(state)
    now = T0 + timedelta(minutes=1)
    event = domain.cancel(job, now, "user asked", actor="client")
    assert job.state is JobState.CANCELLED
    assert job.ended_at == now
    assert job.updated_at == now
    assert job.error == "user asked"
    assert (event.state, event.generation, event.actor, event.reason) == (
        JobState.CANCELLED,
        1,
        "client",
        "user asked",
    )


def test_cancel_without_a_reason_says_cancelled() -> None:
    job = make_job(JobState.QUEUED)
    event = domain.cancel(job, T0, "", actor="client")
    assert job.error == "cancelled"
    assert event.reason == "cancelled"


@pytest.mark.parametrize("state", sorted(TERMINAL, key=lambda s: s.value))
def test_cancel_a_terminal_job_is_a_failed_precondition(state: JobState) -> None:
    job = make_job(state)
    before = copy.deepcopy(job)
    with pytest.raises(FailedPrecondition) as caught:
        domain.cancel(job, T0 + timedelta(minutes=1), "too late", actor="client")
    error = caught.value
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "ILLEGAL_TRANSITION"
    assert error.metadata["current_state"] == state.value
    assert state.value in error.message
    assert error.subject == "jobs/j-1"
    assert job == before


# ---- retry -------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [JobState.FAILED, JobState.CANCELLED])
def test_retry_starts_a_new_generation_and_keeps_attempts(state: JobState) -> None:
    job = make_job(
        state,
        attempts=3,
        last_sequence=7,
        exit_code=1,
        output_tail=b"boom",
        error="exited with 1",
        worker_id="w-1",
        started_at=T0,
        ended_at=T0,
    )
    now = T0 + timedelta(hours=1)
    event = domain.retry(job, now, actor="admin")
    assert job.state is JobState.PENDING
    assert job.generation == 2
    assert job.attempts == 3
    assert job.last_sequence == 0
    assert (job.exit_code, job.output_tail, job.error, job.worker_id) == (None, b"", "", "")
    assert (job.started_at, job.ended_at, job.updated_at) == (None, None, now)
    assert (event.state, event.generation, event.actor) == (JobState.PENDING, 2, "admin")
    assert "generation 2" in event.reason


@pytest.mark.parametrize(
    "state", [JobState.PENDING, JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]
)
def test_retry_of_a_job_that_did_not_fail_is_refused(state: JobState) -> None:
    job = make_job(state)
    before = copy.deepcopy(job)
    with pytest.raises(FailedPrecondition) as caught:
        domain.retry(job, T0, actor="client")
    assert caught.value.metadata["current_state"] == state.value
    assert caught.value.reason == "ILLEGAL_TRANSITION"
    assert job == before


# ---- reports -----------------------------------------------------------------------------


def test_a_job_runs_to_success() -> None:
    job = make_job()
    queued = domain.apply_update(job, update(job, JobState.QUEUED, 1, reason="enqueued"))
    assert queued is not None and queued.state is JobState.QUEUED and queued.actor == "queue"

    running = domain.apply_update(job, update(job, JobState.RUNNING, 2, worker_id="w-1"))
    assert running is not None and running.actor == "worker:w-1"
    assert (job.state, job.attempts, job.worker_id) == (JobState.RUNNING, 1, "w-1")
    assert job.started_at == T0 + timedelta(seconds=2)

    done = domain.apply_update(
        job, update(job, JobState.SUCCEEDED, 3, worker_id="w-1", exit_code=0, output_tail=b"ok\n")
    )
    assert done is not None and done.state is JobState.SUCCEEDED
    assert (job.state, job.exit_code, job.output_tail) == (JobState.SUCCEEDED, 0, b"ok\n")
    assert job.ended_at == T0 + timedelta(seconds=3)
    assert job.last_sequence == 3


def test_duplicate_and_late_reports_are_no_ops() -> None:
    job = make_job()
    first = update(job, JobState.RUNNING, 5, worker_id="w-1")
    assert domain.apply_update(job, first) is not None
    after_first = copy.deepcopy(job)

    assert domain.apply_update(job, first) is None
    assert domain.apply_update(job, update(job, JobState.QUEUED, 4, error="lost")) is None
    assert domain.apply_update(job, update(job, JobState.FAILED, 0)) is None
    assert job == after_first


def test_a_running_report_overtaken_by_the_end_still_gives_the_start() -> None:
    """Through two queue replicas, a job's SUCCEEDED can arrive before its RUNNING: the
    job ends SUCCEEDED, and the late RUNNING still gives its start, worker and attempt
    (it moves nothing)."""
    job = make_job(JobState.QUEUED, last_sequence=1)
    done = update(job, JobState.SUCCEEDED, 3, attempt=2, worker_id="w-1", exit_code=0)
    assert domain.apply_update(job, done) is not None
    assert (job.state, job.attempts, job.started_at) == (JobState.SUCCEEDED, 2, None)

    late = update(job, JobState.RUNNING, 2, attempt=2, worker_id="w-1")
    assert domain.apply_update(job, late) is None
    assert (job.state, job.attempts, job.started_at) == (JobState.SUCCEEDED, 2, late.at)
    assert job.ended_at == done.at and job.last_sequence == 3


def test_reports_of_another_generation_are_no_ops() -> None:
    job = make_job(JobState.FAILED, attempts=1, last_sequence=3)
    domain.retry(job, T0, actor="client")
    after_retry = copy.deepcopy(job)
    assert domain.apply_update(job, update(job, JobState.RUNNING, 10, generation=1)) is None
    assert domain.apply_update(job, update(job, JobState.SUCCEEDED, 11, generation=3)) is None
    assert job == after_retry


def test_a_report_after_cancel_does_not_revive_the_job() -> None:
    job = make_job(JobState.RUNNING, attempts=1, last_sequence=2)
    domain.cancel(job, T0, "stop it", actor="client")
    assert domain.apply_update(job, update(job, JobState.RUNNING, 3, worker_id="w-2")) is None
    assert job.state is JobState.CANCELLED
    assert job.attempts == 1

    # The worker's last word on a cancelled job is kept, the state is not.
    last = update(job, JobState.CANCELLED, 4, exit_code=143, output_tail=b"bye", worker_id="w-1")
    assert domain.apply_update(job, last) is None
    assert (job.state, job.exit_code, job.output_tail) == (JobState.CANCELLED, 143, b"bye")


def test_a_finished_job_ignores_later_reports() -> None:
    job = make_job(JobState.SUCCEEDED, exit_code=0, last_sequence=3)
    before = copy.deepcopy(job)
    assert domain.apply_update(job, update(job, JobState.FAILED, 4, exit_code=1)) is None
    assert domain.apply_update(job, update(job, JobState.RUNNING, 5)) is None
    assert (job.state, job.exit_code) == (before.state, before.exit_code)


# ---- the state machine under any sequence of operations ---------------------------------

states = st.sampled_from(list(JobState))
operations = st.lists(
    st.one_of(
        st.tuples(st.just("cancel"), st.sampled_from(["", "user"])),
        st.tuples(st.just("retry")),
        st.tuples(
            st.just("update"),
            st.sampled_from([-1, 0, 0, 0, 0, 1]),  # generation offset
            st.integers(-2, 3),  # sequence offset from the last applied
            states,
            st.sampled_from(["", "w-1", "w-2"]),
            st.one_of(st.none(), st.integers(-1, 255)),
            st.sampled_from(["", "exited with 1"]),
        ),
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(states, st.integers(1, 5), st.integers(0, 5), operations)
def test_no_sequence_of_operations_breaks_the_state_machine(
    start: JobState, generation: int, last_sequence: int, ops: list[tuple]
) -> None:
    job = make_job(start, generation=generation, last_sequence=last_sequence)
    for step, op in enumerate(ops, start=1):
        before = copy.deepcopy(job)
        now = T0 + timedelta(seconds=step)
        kind = op[0]
        if kind == "cancel":
            if before.state.terminal:
                with pytest.raises(FailedPrecondition) as caught:
                    domain.cancel(job, now, op[1], actor="client")
                assert caught.value.metadata["current_state"] == before.state.value
                assert job == before
            else:
                event = domain.cancel(job, now, op[1], actor="client")
                assert job.state is JobState.CANCELLED and event.state is JobState.CANCELLED
        elif kind == "retry":
            if before.state in RETRYABLE:
                domain.retry(job, now, actor="client")
                assert job.state is JobState.PENDING
                assert job.generation == before.generation + 1
                assert job.attempts == before.attempts
            else:
                with pytest.raises(FailedPrecondition) as caught:
                    domain.retry(job, now, actor="client")
                assert caught.value.metadata["current_state"] == before.state.value
                assert job == before
        else:
            _, gen_offset, seq_offset, state, worker, exit_code, error = op
            report = StatusUpdate(
                job.job_id,
                before.generation + gen_offset,
                max(0, before.last_sequence + seq_offset),
                state,
                now,
                worker_id=worker,
                exit_code=exit_code,
                error=error,
            )
            event = domain.apply_update(job, report)
            stale = (
                report.generation != before.generation or report.sequence <= before.last_sequence
            )
            if stale:
                assert event is None
                fills_in = (
                    report.generation == before.generation
                    and state is JobState.RUNNING
                    and before.started_at is None
                    and before.state is not JobState.PENDING
                )
                if fills_in:  # an overtaken RUNNING still says when it started
                    assert job.started_at == report.at
                    assert job.attempts >= max(before.attempts, 1)
                    facts = {"started_at", "worker_id", "attempts"}
                    kept = {f: getattr(before, f) for f in facts}
                    assert dataclasses.replace(job, **kept) == before
                else:
                    assert job == before
            else:
                assert job.last_sequence == report.sequence
                assert job.generation == before.generation
                if state is JobState.PENDING or state not in TRANSITIONS[before.state]:
                    assert event is None
                    assert job.state is before.state
                else:
                    assert event is not None and event.state is state
                    assert job.state is state
                moved_to_running = job.state is JobState.RUNNING and before.state is not job.state
                if moved_to_running:  # the queue's attempt number, on top of earlier ones
                    assert job.attempts == job.attempts_base + max(report.attempt, 1)
                else:
                    assert job.attempts == before.attempts

        # Whatever happened, every change of state is one the table allows.
        assert job.state is before.state or job.state in TRANSITIONS[before.state]
        assert job.attempts >= before.attempts
        assert job.generation >= before.generation
        if before.state.terminal and kind != "retry":
            # only a FAILED job's dead letter can come back (a redrive), as QUEUED
            assert job.state is before.state or (
                before.state is JobState.FAILED and job.state is JobState.QUEUED
            )


# ---- the queue's reports, as the queue's domain produces them ---------------------------

POLICY = RetryPolicy(default_max_attempts=3, base_seconds=1.0, cap_seconds=10.0)


def make_item(job: Job, max_attempts: int = 3) -> Item:
    return Item(
        job_id=job.job_id,
        generation=job.generation,
        spec=b"",
        state=ItemState.WAITING,
        priority=0,
        run_at=T0,
        seq=1,
        max_attempts=max_attempts,
        created_at=T0,
        updated_at=T0,
    )


def deliver(job: Job, report: Report | None) -> None:
    assert report is not None
    domain.apply_update(
        job,
        StatusUpdate(
            report.job_id,
            report.generation,
            report.sequence,
            JobState(report.job_state),
            report.at,
            report.attempt,
            report.worker_id,
            report.exit_code,
            report.output_tail,
            report.error,
            report.reason,
        ),
    )


def test_queue_reports_run_a_job_through_a_failed_attempt_to_success() -> None:
    job = make_job()
    item = make_item(job)
    deliver(job, queue.enqueued(item, T0))
    deliver(job, queue.lease(item, "w-1", 30, T0))
    deliver(job, queue.complete(item, Outcome.FAILED, 1, b"boom", "", T0, POLICY))
    assert (job.state, job.error) == (JobState.QUEUED, "exited with 1")
    deliver(job, queue.lease(item, "w-2", 30, T0))
    deliver(job, queue.complete(item, Outcome.SUCCEEDED, 0, b"ok", "", T0, POLICY))
    assert (job.state, job.attempts, job.exit_code, job.worker_id) == (
        JobState.SUCCEEDED,
        2,
        0,
        "w-2",
    )


def test_a_succeeded_job_does_not_show_an_earlier_attempts_error() -> None:
    job = make_job()
    item = make_item(job)
    deliver(job, queue.enqueued(item, T0))
    deliver(job, queue.lease(item, "w-1", 30, T0))
    deliver(job, queue.complete(item, Outcome.FAILED, 1, b"boom", "", T0, POLICY))
    deliver(job, queue.lease(item, "w-1", 30, T0))
    deliver(job, queue.complete(item, Outcome.SUCCEEDED, 0, b"ok", "", T0, POLICY))
    assert job.state is JobState.SUCCEEDED
    assert job.error == "", "the job succeeded, yet it still shows the failed attempt's error"


def test_dead_letter_then_retry_keeps_counting_attempts() -> None:
    job = make_job()
    item = make_item(job, max_attempts=2)
    deliver(job, queue.enqueued(item, T0))
    for _ in range(2):
        deliver(job, queue.lease(item, "w-1", 30, T0))
        deliver(job, queue.complete(item, Outcome.FAILED, 1, b"", "", T0, POLICY))
    assert (job.state, job.attempts) == (JobState.FAILED, 2)

    domain.retry(job, T0, actor="client")
    item = make_item(job)
    deliver(job, queue.enqueued(item, T0))
    deliver(job, queue.lease(item, "w-1", 30, T0))
    deliver(job, queue.complete(item, Outcome.SUCCEEDED, 0, b"", "", T0, POLICY))
    assert (job.state, job.generation, job.attempts) == (JobState.SUCCEEDED, 2, 3)


def test_a_released_lease_is_not_counted_as_an_attempt() -> None:
    job = make_job()
    item = make_item(job)
    deliver(job, queue.enqueued(item, T0))
    deliver(job, queue.lease(item, "w-1", 30, T0))
    deliver(job, queue.release(item, "the worker is shutting down", T0))
    deliver(job, queue.lease(item, "w-2", 30, T0))
    deliver(job, queue.complete(item, Outcome.SUCCEEDED, 0, b"", "", T0, POLICY))
    assert item.attempt == 1
    assert job.state is JobState.SUCCEEDED
    assert job.attempts == item.attempt, "the job counts an attempt the queue gave back"


def test_a_redriven_dead_letter_shows_on_the_job() -> None:
    job = make_job()
    item = make_item(job, max_attempts=1)
    deliver(job, queue.enqueued(item, T0))
    deliver(job, queue.lease(item, "w-1", 30, T0))
    deliver(job, queue.complete(item, Outcome.FAILED, 1, b"", "", T0, POLICY))
    assert (item.state, job.state) == (ItemState.DEAD_LETTERED, JobState.FAILED)

    deliver(job, queue.redrive(item, T0))
    deliver(job, queue.lease(item, "w-1", 30, T0))
    deliver(job, queue.complete(item, Outcome.SUCCEEDED, 0, b"ok", "", T0, POLICY))
    assert item.state is ItemState.SUCCEEDED
    assert job.state is JobState.SUCCEEDED, "the queue ran the redriven item; the job never knew"


def test_after_a_retry_the_history_and_error_count_attempts_as_the_job_does() -> None:
    """The queue counts a new generation's attempts from 1; the job has made one already."""
    job = make_job(JobState.QUEUED, generation=2, attempts=1, attempts_base=1)
    running = domain.apply_update(
        job,
        update(job, JobState.RUNNING, 1, attempt=1, worker_id="w-1", reason="attempt 1 leased"),
    )
    assert running is not None and running.reason == "attempt 2 leased"
    assert job.attempts == 2
    failed = domain.apply_update(
        job,
        update(
            job,
            JobState.FAILED,
            2,
            attempt=1,
            worker_id="w-1",
            actor="queue",
            error="the lease of attempt 1 expired",
            reason="attempt 1 failed, none left; dead-lettered",
        ),
    )
    assert failed is not None
    assert (failed.actor, failed.reason) == ("queue", "attempt 2 failed, none left; dead-lettered")
    assert job.error == "the lease of attempt 2 expired"


def test_after_a_retry_a_workers_error_is_stored_as_the_job_wrote_it() -> None:
    """Only the queue's own words are renumbered: a job that prints "attempt 1" keeps it."""
    job = make_job(JobState.QUEUED, generation=2, attempts=1, attempts_base=1)
    failed = domain.apply_update(
        job,
        update(
            job,
            JobState.FAILED,
            1,
            attempt=1,
            worker_id="w-1",
            actor="worker:w-1",
            error="exited with 1: attempt 1 of the upload failed",
            reason="attempt 1 failed, none left; dead-lettered",
        ),
    )
    assert failed is not None and failed.reason == "attempt 2 failed, none left; dead-lettered"
    assert job.error == "exited with 1: attempt 1 of the upload failed"


def test_a_report_that_names_no_actor_is_its_workers_or_the_queues() -> None:
    job = make_job(JobState.QUEUED)
    event = domain.apply_update(job, update(job, JobState.RUNNING, 1, attempt=1, worker_id="w-1"))
    assert event is not None and event.actor == "worker:w-1"
