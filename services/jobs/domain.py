"""Jobs: their states, the one table of legal transitions, and the use-case rules."""

from __future__ import annotations

import enum
import re
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime

from services.common.errors import FailedPrecondition


class JobState(enum.Enum):
    PENDING = "PENDING"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

# The only place that says which state may follow which.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset(
        {JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.QUEUED: frozenset(
        {JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
    ),
    # RUNNING -> QUEUED: the attempt failed or its lease expired, and it waits for a retry.
    JobState.RUNNING: frozenset(
        {JobState.QUEUED, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.SUCCEEDED: frozenset(),
    # RetryJob starts a new generation; a redrive of the dead letter requeues this one.
    JobState.FAILED: frozenset({JobState.PENDING, JobState.QUEUED}),
    JobState.CANCELLED: frozenset({JobState.PENDING}),
}

RETRYABLE = frozenset({JobState.FAILED, JobState.CANCELLED})


def can_move(current: JobState, target: JobState) -> bool:
    return target in TRANSITIONS[current]


def new_job_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class SpecIndex:
    """What ListJobs can filter on, copied out of the spec when a job is stored."""

    labels: dict[str, str] = field(default_factory=dict)
    worker_types: tuple[str, ...] = ()


@dataclass(frozen=True)
class JobFilter:
    """What ListJobs selects: every given condition must hold."""

    states: tuple[JobState, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    worker_type: str = ""
    created_after: datetime | None = None
    created_before: datetime | None = None


@dataclass
class Job:
    job_id: str
    request_id: str | None
    spec_json: str
    spec_hash: str
    state: JobState
    created_at: datetime
    updated_at: datetime
    generation: int = 1
    attempts: int = 0
    exit_code: int | None = None
    output_tail: bytes = b""  # as the job wrote it
    error: str = ""
    worker_id: str = ""
    started_at: datetime | None = None
    ended_at: datetime | None = None
    last_sequence: int = 0
    # Attempts made before the queue's current count began (earlier generations, or
    # before a redrive reset it): attempts = attempts_base + the queue's attempt number.
    attempts_base: int = 0
    trace_context: dict[str, str] = field(default_factory=dict)
    # Bytes of output the latest finished attempt wrote, as its worker reported.
    output_bytes: int = 0


@dataclass(frozen=True)
class Submission:
    """One job of a BatchSubmitJobs, checked: its request_id (None: none), canonical spec."""

    request_id: str | None
    spec_json: str
    index: SpecIndex = field(default_factory=SpecIndex)


@dataclass(frozen=True)
class JobEvent:
    job_id: str
    generation: int
    state: JobState
    at: datetime
    actor: str
    reason: str = ""


@dataclass(frozen=True)
class StatusUpdate:
    """A queue item transition, as reported by the queue."""

    job_id: str
    generation: int
    sequence: int
    state: JobState
    at: datetime
    attempt: int = 0
    worker_id: str = ""
    exit_code: int | None = None
    output_tail: bytes = b""  # as the job wrote it
    error: str = ""
    reason: str = ""
    actor: str = ""  # who caused it; empty from a queue that does not say
    # Set when the worker sent the attempt's output with its completion: every byte the
    # attempt wrote (the tail is then stored as its output), and the execution's id.
    output_bytes: int | None = None
    execution_id: str = ""


def _move(job: Job, target: JobState, now: datetime) -> None:
    if not can_move(job.state, target):
        raise FailedPrecondition(
            f"job {job.job_id} is {job.state.value}; it cannot become {target.value}",
            subject=f"jobs/{job.job_id}",
            reason="ILLEGAL_TRANSITION",
            metadata={"current_state": job.state.value, "requested_state": target.value},
        )
    job.state = target
    job.updated_at = now


def cancel(job: Job, now: datetime, reason: str, actor: str) -> JobEvent:
    if job.state.terminal:
        raise FailedPrecondition(
            f"job {job.job_id} is already {job.state.value}; only a job that has not "
            f"ended can be cancelled",
            subject=f"jobs/{job.job_id}",
            reason="ILLEGAL_TRANSITION",
            metadata={"current_state": job.state.value},
        )
    _move(job, JobState.CANCELLED, now)
    job.ended_at = now
    job.error = reason or "cancelled"
    return JobEvent(job.job_id, job.generation, job.state, now, actor, reason or "cancelled")


def retry(job: Job, now: datetime, actor: str) -> JobEvent:
    if job.state not in RETRYABLE:
        raise FailedPrecondition(
            f"job {job.job_id} is {job.state.value}; only FAILED or CANCELLED jobs can be retried",
            subject=f"jobs/{job.job_id}",
            reason="ILLEGAL_TRANSITION",
            metadata={"current_state": job.state.value},
        )
    _move(job, JobState.PENDING, now)
    job.generation += 1
    job.attempts_base = job.attempts
    job.last_sequence = 0
    job.exit_code = None
    job.output_tail = b""
    job.output_bytes = 0
    job.error = ""
    job.worker_id = ""
    job.started_at = None
    job.ended_at = None
    return JobEvent(
        job.job_id, job.generation, job.state, now, actor, f"retry: generation {job.generation}"
    )


def apply_update(job: Job, update: StatusUpdate) -> JobEvent | None:
    """Apply a queue report. Returns the event, or None when it was a no-op: another
    generation, a duplicate or late sequence, or a move the state machine forbids (for
    example a report arriving after the user cancelled). Never raises for those."""
    if update.generation != job.generation:
        return None
    if update.sequence <= job.last_sequence:
        _fill_in(job, update)
        return None
    job.last_sequence = update.sequence
    if update.state is JobState.PENDING or not can_move(job.state, update.state):
        if job.state is JobState.CANCELLED and update.state.terminal:
            # The worker's last word on a cancelled job: keep what it saw.
            _record_result(job, update, keep_error=True)
            job.updated_at = update.at
        return None
    if job.state is JobState.FAILED:  # redriven: the queue counts attempts from zero again
        job.attempts_base = job.attempts
    update = _in_the_jobs_count(job, update)
    _move(job, update.state, update.at)
    if update.state is JobState.RUNNING:
        job.attempts = job.attempts_base + max(update.attempt, 1)
        job.worker_id = update.worker_id
        job.started_at = update.at
        job.ended_at = None
    elif update.state is JobState.QUEUED:
        job.ended_at = None
        if update.error:
            job.error = update.error
    else:
        _record_result(job, update, keep_error=False)
        job.ended_at = update.at
        if update.attempt:  # its RUNNING may come late, or not at all
            job.attempts = max(job.attempts, job.attempts_base + update.attempt)
    return JobEvent(
        job.job_id,
        job.generation,
        job.state,
        update.at,
        update.actor or (f"worker:{update.worker_id}" if update.worker_id else "queue"),
        update.reason or update.error,
    )


def _in_the_jobs_count(job: Job, update: StatusUpdate) -> StatusUpdate:
    """The queue says "attempt N" counting within the generation since its enqueue or
    last redrive; the job's history and error say it in the job's own count. Only the
    queue's own words are renumbered: its reasons, and the error of its own acts (a lease
    that expired); a worker's error is the job's text, stored as it came."""
    if not job.attempts_base or not update.attempt:
        return update
    pattern = re.compile(rf"\battempt {update.attempt}\b")
    number = f"attempt {job.attempts_base + update.attempt}"
    actor = update.actor or (f"worker:{update.worker_id}" if update.worker_id else "queue")
    queue_words = not actor.startswith("worker:")
    return replace(
        update,
        reason=pattern.sub(number, update.reason),
        error=pattern.sub(number, update.error) if queue_words else update.error,
    )


def _fill_in(job: Job, update: StatusUpdate) -> None:
    """A late report moves nothing, but a RUNNING overtaken by a later report (reports
    of one job through two queue replicas) still says when this generation started, on
    which worker, and which attempt: facts the job lacks if no RUNNING came before."""
    if (
        update.state is not JobState.RUNNING
        or job.started_at is not None
        or job.state is JobState.PENDING  # not yet queued: nothing of it has run
    ):
        return
    job.started_at = update.at
    job.worker_id = job.worker_id or update.worker_id
    job.attempts = max(job.attempts, job.attempts_base + max(update.attempt, 1))


def _record_result(job: Job, update: StatusUpdate, *, keep_error: bool) -> None:
    """The attempt's end. Its error replaces an earlier attempt's (a success clears it);
    on a cancelled job the cancel's reason stays."""
    if update.exit_code is not None:
        job.exit_code = update.exit_code
    if update.output_tail:
        job.output_tail = update.output_tail
    if not keep_error:
        job.error = update.error
    if update.worker_id:
        job.worker_id = update.worker_id


# ---- output of running jobs ----------------------------------------------------------------

# Output kept per job and generation: the last 1 MiB of its latest attempt.
OUTPUT_KEEP_BYTES = 1024 * 1024
# Bytes in one stored chunk: small appends are merged into the last chunk up to this.
OUTPUT_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class OutputHead:
    """Where a generation's stored output stands: the execution it comes from (its latest
    attempt) and the offset after the last byte received from it."""

    attempt: int
    execution_id: str
    next_offset: int


@dataclass(frozen=True)
class OutputChunk:
    """Bytes ``start`` .. ``start + len(data)`` of an attempt's output."""

    start: int
    data: bytes

    @property
    def end(self) -> int:
        return self.start + len(self.data)


@dataclass(frozen=True)
class OutputRead:
    """What a reader gets: the attempt the chunks belong to, and the chunks past its cursor."""

    generation: int
    attempt: int
    chunks: tuple[OutputChunk, ...] = ()


def starts_new_output(
    job_id: str, head: OutputHead | None, attempt: int, execution_id: str
) -> bool:
    """True when this execution's output replaces what is stored (nothing yet, a later
    attempt, or the same attempt run again after its lease was given back); an earlier
    attempt than the stored one is refused: its output was replaced."""
    if head is None or attempt > head.attempt:
        return True
    if attempt == head.attempt:
        return execution_id != head.execution_id
    if attempt < head.attempt:
        raise FailedPrecondition(
            f"job {job_id}: the output of attempt {attempt} was replaced by attempt "
            f"{head.attempt}'s",
            subject=f"jobs/{job_id}",
            reason="STALE_ATTEMPT",
            metadata={"attempt": str(attempt), "current_attempt": str(head.attempt)},
        )
    return False
