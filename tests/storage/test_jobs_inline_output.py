"""Output that came with a completion (the tail and the total in the queue's status report),
on real databases: stored as the attempt's output as if it were the execution's last
AppendJobOutput: by offset (nothing stored twice), a later attempt or execution replacing
an earlier one's, the last 1 MiB kept, and the job's output_bytes the total."""

from __future__ import annotations

from datetime import UTC, datetime

from services.common import db, migrations
from services.common.clock import Clock
from services.jobs.bootstrap import MIGRATIONS
from services.jobs.domain import OUTPUT_KEEP_BYTES, JobState, StatusUpdate
from services.jobs.manager import JobManager
from services.jobs.store import JobStore

SPEC = '{"command": ["true"]}'
TAIL = 64 * 1024


def make_manager(url: str) -> JobManager:
    engine = db.make_engine(url, setting="JOBS_DATABASE_URL")
    migrations.upgrade(engine, MIGRATIONS, "jobs_alembic_version", "JOBS_DATABASE_URL")
    return JobManager(JobStore(engine), Clock())


def report(
    job_id: str, sequence: int, state: JobState, attempt: int = 1, **fields: object
) -> StatusUpdate:
    return StatusUpdate(
        job_id=job_id,
        generation=1,
        sequence=sequence,
        state=state,
        at=datetime.now(UTC),
        attempt=attempt,
        worker_id="w-1",
        **fields,  # type: ignore[arg-type]
    )


def ended(
    job_id: str, sequence: int, tail: bytes, total: int, *, attempt: int = 1, execution: str = "e1"
) -> StatusUpdate:
    return report(
        job_id,
        sequence,
        JobState.SUCCEEDED,
        attempt,
        exit_code=0,
        output_tail=tail,
        output_bytes=total,
        execution_id=execution,
    )


def output(manager: JobManager, job_id: str) -> tuple[int, int, bytes]:
    """The attempt read, where its stored output starts, and the bytes."""
    read = manager.read_output(job_id, 1, 0, 0)
    start = read.chunks[0].start if read.chunks else 0
    return read.attempt, start, b"".join(c.data for c in read.chunks)


def test_a_completions_tail_becomes_the_output(database_url: str) -> None:
    manager = make_manager(database_url)
    job_id = manager.submit(None, SPEC, {})[0].job_id
    manager.update_status_many([report(job_id, 1, JobState.RUNNING)])

    assert manager.update_status_many([ended(job_id, 2, b"hi\n", 3)]) == [True]

    assert output(manager, job_id) == (1, 0, b"hi\n")
    job = manager.get(job_id)
    assert (job.state, job.output_bytes, job.output_tail) == (JobState.SUCCEEDED, 3, b"hi\n")
    # A repeat of the report changes nothing.
    assert manager.update_status_many([ended(job_id, 2, b"hi\n", 3)]) == [False]
    assert output(manager, job_id) == (1, 0, b"hi\n")


def test_streamed_output_is_not_stored_twice_and_a_missing_end_is_filled_in(
    database_url: str,
) -> None:
    manager = make_manager(database_url)
    job_id = manager.submit(None, SPEC, {})[0].job_id
    manager.update_status_many([report(job_id, 1, JobState.RUNNING)])
    manager.append_output(job_id, 1, 1, 0, b"line 1\nline 2\n", execution_id="e1")

    # The execution's last call never arrived: the completion's tail has its end.
    manager.update_status_many([ended(job_id, 2, b"line 2\nline 3\n", 21)])

    assert output(manager, job_id) == (1, 0, b"line 1\nline 2\nline 3\n")
    assert manager.get(job_id).output_bytes == 21


def test_a_later_attempt_and_a_new_execution_replace_the_output(database_url: str) -> None:
    manager = make_manager(database_url)
    job_id = manager.submit(None, SPEC, {})[0].job_id
    manager.update_status_many([report(job_id, 1, JobState.RUNNING)])
    manager.append_output(job_id, 1, 1, 0, b"streamed by e1, then given back\n", execution_id="e1")
    # The same attempt, run again by another execution after its lease was given back.
    manager.update_status_many(
        [
            report(
                job_id,
                2,
                JobState.QUEUED,
                1,
                exit_code=1,
                output_tail=b"one\n",
                output_bytes=4,
                execution_id="e2",
                error="exited with 1",
            )
        ]
    )
    assert output(manager, job_id) == (1, 0, b"one\n")

    manager.update_status_many(
        [report(job_id, 3, JobState.RUNNING, 2), ended(job_id, 4, b"two!\n", 5, attempt=2)]
    )

    assert output(manager, job_id) == (2, 0, b"two!\n")
    assert manager.get(job_id).output_bytes == 5
    # A late report of attempt 1's end does not bring its output back.
    manager.update_status_many([ended(job_id, 5, b"late\n", 5, attempt=1)])
    assert output(manager, job_id) == (2, 0, b"two!\n")


def test_a_tail_of_a_longer_output_keeps_its_offsets_and_the_last_mebibyte(
    database_url: str,
) -> None:
    manager = make_manager(database_url)
    job_id = manager.submit(None, SPEC, {})[0].job_id
    manager.update_status_many([report(job_id, 1, JobState.RUNNING)])
    total = 3 * OUTPUT_KEEP_BYTES
    tail = b"t" * TAIL

    # Nothing was streamed: the bytes before the tail are a gap.
    manager.update_status_many([ended(job_id, 2, tail, total)])

    assert output(manager, job_id) == (1, total - TAIL, tail)
    assert manager.get(job_id).output_bytes == total


def test_streamed_output_past_the_mebibyte_stays_bounded(database_url: str) -> None:
    manager = make_manager(database_url)
    job_id = manager.submit(None, SPEC, {})[0].job_id
    manager.update_status_many([report(job_id, 1, JobState.RUNNING)])
    streamed = OUTPUT_KEEP_BYTES + 1000
    for offset in range(0, streamed, TAIL):
        data = b"s" * min(TAIL, streamed - offset)
        manager.append_output(job_id, 1, 1, offset, data, execution_id="e1")
    total = streamed + 500

    manager.update_status_many([ended(job_id, 2, b"e" * TAIL, total)])

    attempt, start, data = output(manager, job_id)
    assert attempt == 1
    assert start + len(data) == total
    assert len(data) <= OUTPUT_KEEP_BYTES + TAIL  # chunks dropped whole past the last MiB
    assert data.endswith(b"s" * (TAIL - 500) + b"e" * 500)


def test_a_report_without_a_total_stores_no_output(database_url: str) -> None:
    """A queue or worker from before the field: the job's tail as before, no output."""
    manager = make_manager(database_url)
    job_id = manager.submit(None, SPEC, {})[0].job_id
    manager.update_status_many(
        [report(job_id, 1, JobState.SUCCEEDED, exit_code=0, output_tail=b"old\n")]
    )

    assert output(manager, job_id) == (0, 0, b"")
    job = manager.get(job_id)
    assert (job.output_tail, job.output_bytes) == (b"old\n", 0)
