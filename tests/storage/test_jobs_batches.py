"""BatchUpdateJobStatus on real databases: every item of a batch succeeds or fails on its
own, overlapping batches never deadlock, repeats of a job apply in sequence order."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from services.common import db, migrations
from services.common.clock import Clock
from services.common.errors import BlixardError, InvalidArgument, NotFound
from services.jobs.bootstrap import MIGRATIONS
from services.jobs.domain import JobState, StatusUpdate
from services.jobs.manager import JobManager
from services.jobs.store import JobStore

SPEC = '{"command": ["true"]}'


def make_manager(url: str) -> JobManager:
    engine = db.make_engine(url, setting="JOBS_DATABASE_URL")
    migrations.upgrade(engine, MIGRATIONS, "jobs_alembic_version", "JOBS_DATABASE_URL")
    return JobManager(JobStore(engine), Clock())


@pytest.fixture
def manager(database_url: str) -> JobManager:
    return make_manager(database_url)


@pytest.fixture
def pg_manager(postgres_cluster) -> JobManager:  # type: ignore[no-untyped-def]
    return make_manager(postgres_cluster.new_database())


def update(job_id: str, sequence: int, state: JobState, **fields: object) -> StatusUpdate:
    return StatusUpdate(
        job_id=job_id, generation=1, sequence=sequence, state=state, at=datetime.now(UTC), **fields
    )  # type: ignore[arg-type]


def jobs(manager: JobManager, count: int) -> list[str]:
    return [manager.submit(None, SPEC, {})[0].job_id for _ in range(count)]


@pytest.mark.parametrize(
    "poison",
    [
        {"worker_id": "w" * 300},  # longer than its column
        {"worker_id": "w-\x00"},  # PostgreSQL stores no NUL in text
        {"attempt": 2**31},  # the job's attempt count out of its column's range
    ],
    ids=["long-worker-id", "nul-in-worker-id", "attempt-out-of-range"],
)
def test_one_bad_report_fails_alone(manager: JobManager, poison: dict[str, str]) -> None:
    first, bad, last = jobs(manager, 3)
    results = manager.update_status_many(
        [
            update(first, 1, JobState.RUNNING, worker_id="w-1"),
            update(bad, 1, JobState.RUNNING, **poison),
            update(last, 1, JobState.RUNNING, worker_id="w-1"),
        ]
    )
    assert results[0] is True and results[2] is True
    assert isinstance(results[1], InvalidArgument)
    assert {"worker_id": "worker_id", "attempt": "attempts"}[next(iter(poison))] in (
        results[1].message
    )
    assert manager.get(first).state is JobState.RUNNING
    assert manager.get(last).state is JobState.RUNNING
    refused = manager.get(bad)
    assert refused.state is JobState.PENDING and refused.last_sequence == 0
    # The job's later reports still apply.
    assert manager.update_status_many([update(bad, 2, JobState.RUNNING)]) == [True]


def test_a_write_the_database_refuses_fails_alone(pg_manager: JobManager) -> None:
    """What no check foresees (here a trigger refusing one value, as a constraint would)
    fails that update alone: the others commit and get their own result."""
    first, bad, last = jobs(pg_manager, 3)
    with pg_manager.store.engine.begin() as connection:
        connection.execute(
            text(
                "CREATE FUNCTION refuse_poison() RETURNS trigger AS $$ BEGIN "
                "IF NEW.exit_code = 77 THEN RAISE EXCEPTION 'poison refused' "
                "USING ERRCODE = '22023'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
            )
        )
        connection.execute(
            text(
                "CREATE TRIGGER refuse_poison BEFORE UPDATE ON jobs "
                "FOR EACH ROW EXECUTE FUNCTION refuse_poison()"
            )
        )
    results = pg_manager.update_status_many(
        [
            update(first, 1, JobState.FAILED, exit_code=1),
            update(bad, 1, JobState.FAILED, exit_code=77),
            update(bad, 2, JobState.QUEUED),  # the same job's next report still applies
            update(last, 1, JobState.FAILED, exit_code=1),
        ]
    )
    assert results[0] is True and results[2] is True and results[3] is True
    assert isinstance(results[1], InvalidArgument) and "poison refused" in results[1].message
    assert pg_manager.get(first).state is JobState.FAILED
    assert pg_manager.get(last).state is JobState.FAILED
    assert pg_manager.get(bad).state is JobState.QUEUED
    assert [e.state for e in pg_manager.events(bad)] == [JobState.PENDING, JobState.QUEUED]


def test_repeats_of_a_job_in_one_batch_apply_in_sequence_order(manager: JobManager) -> None:
    [job] = jobs(manager, 1)
    results = manager.update_status_many(
        [
            update(job, 3, JobState.SUCCEEDED, exit_code=0),
            update(job, 1, JobState.QUEUED),
            update(job, 2, JobState.RUNNING, worker_id="w-1"),
            update(job, 2, JobState.RUNNING, worker_id="w-1"),  # a duplicate
        ]
    )
    assert results[:3] == [True, True, True]
    assert results[3] is False
    stored = manager.get(job)
    assert (stored.state, stored.worker_id, stored.last_sequence) == (
        JobState.SUCCEEDED,
        "w-1",
        3,
    )
    assert [e.state for e in manager.events(job)] == [
        JobState.PENDING,
        JobState.QUEUED,
        JobState.RUNNING,
        JobState.SUCCEEDED,
    ]


def test_an_unknown_job_fails_alone(manager: JobManager) -> None:
    [job] = jobs(manager, 1)
    unknown = "00000000-0000-0000-0000-000000000000"
    results = manager.update_status_many(
        [update(unknown, 1, JobState.RUNNING), update(job, 1, JobState.RUNNING)]
    )
    assert isinstance(results[0], NotFound) and results[1] is True


def test_overlapping_batches_in_opposite_orders_never_deadlock(pg_manager: JobManager) -> None:
    """Two senders (two queue replicas' relays) report on the same jobs at once, one in
    one order, the other in the reverse order: no deadlock surfaces, every report is
    taken, and each job ends where its highest sequence says."""
    errors: list[BaseException] = []
    answers: dict[int, list[bool | BlixardError]] = {}
    barrier = threading.Barrier(2)

    def send(which: int, batch: list[StatusUpdate]) -> None:
        barrier.wait()
        try:
            answers[which] = pg_manager.update_status_many(batch)
        except BaseException as exc:
            errors.append(exc)

    for _ in range(5):
        ids = jobs(pg_manager, 40)
        running = [update(job, 1, JobState.RUNNING, worker_id="w-1") for job in ids]
        done = [update(job, 2, JobState.SUCCEEDED, exit_code=0) for job in reversed(ids)]
        threads = [
            threading.Thread(target=send, args=(0, running)),
            threading.Thread(target=send, args=(1, done)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert all(a is True for a in answers[1])  # seq 2 is never late
        assert all(isinstance(a, bool) for a in answers[0])  # seq 1 may come late: no-op
        assert {pg_manager.get(job).state for job in ids} == {JobState.SUCCEEDED}
    # One lock order: no deadlock at all, not even one retried.
    pg_manager.store.engine.dispose()  # each connection reports its statistics as it closes
    time.sleep(0.5)
    with pg_manager.store.engine.connect() as connection:
        found = connection.scalar(
            text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
        )
    assert found == 0
