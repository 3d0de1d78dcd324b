"""The jobs manager on real stores: SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from services.common import db, migrations
from services.common.clock import Clock
from services.common.errors import AlreadyExists, FailedPrecondition, NotFound
from services.jobs.bootstrap import MIGRATIONS
from services.jobs.domain import JobFilter, JobState, SpecIndex, StatusUpdate
from services.jobs.fakes import FakeJobStore
from services.jobs.manager import JobManager
from services.jobs.store import JobStore

SPEC = '{"command": ["true"]}'


@pytest.fixture(params=["fake", "sqlite", "postgresql"])
def manager(request: pytest.FixtureRequest, tmp_path) -> JobManager:  # type: ignore[no-untyped-def]
    """The same contract on the in-memory fake, real SQLite and real PostgreSQL."""
    if request.param == "fake":
        return JobManager(FakeJobStore(), Clock())  # type: ignore[arg-type]
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/jobs.sqlite3"
    else:
        url = request.getfixturevalue("postgres_cluster").new_database()
    engine = db.make_engine(url, setting="JOBS_DATABASE_URL")
    migrations.upgrade(engine, MIGRATIONS, "jobs_alembic_version", "JOBS_DATABASE_URL")
    return JobManager(JobStore(engine), Clock())


def update(
    job_id: str, sequence: int, state: JobState, generation: int = 1, **fields: object
) -> StatusUpdate:
    return StatusUpdate(
        job_id=job_id,
        generation=generation,
        sequence=sequence,
        state=state,
        at=datetime.now(UTC),
        **fields,
    )  # type: ignore[arg-type]


def test_submit_stores_the_job_and_one_outbox_message(manager: JobManager) -> None:
    job, created = manager.submit("r-1", SPEC, {})
    assert created
    stored = manager.get(job.job_id)
    assert stored.state is JobState.PENDING and stored.spec_json == SPEC
    assert manager.store.outbox.pending() == 1
    assert [e.state for e in manager.events(job.job_id)] == [JobState.PENDING]


def test_request_id_idempotency(manager: JobManager) -> None:
    first, _ = manager.submit("r-1", SPEC, {})
    again, created = manager.submit("r-1", SPEC, {})
    assert again.job_id == first.job_id and not created
    with pytest.raises(AlreadyExists) as error:
        manager.submit("r-1", '{"command": ["false"]}', {})
    assert error.value.reason == "REQUEST_ID_REUSED"
    assert manager.store.outbox.pending() == 1


def test_concurrent_submits_with_one_request_id_make_one_job(manager: JobManager) -> None:
    results: list[str] = []
    errors: list[BaseException] = []

    def submit() -> None:
        try:
            results.append(manager.submit("same", SPEC, {})[0].job_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(set(results)) == 1 and len(results) == 8
    assert manager.store.outbox.pending() == 1


def test_status_updates_apply_in_sequence_and_duplicates_are_no_ops(manager: JobManager) -> None:
    job, _ = manager.submit(None, SPEC, {})
    assert manager.update_status(update(job.job_id, 1, JobState.QUEUED))
    assert manager.update_status(update(job.job_id, 2, JobState.RUNNING, worker_id="w-1"))
    assert not manager.update_status(update(job.job_id, 2, JobState.RUNNING))  # duplicate
    assert not manager.update_status(update(job.job_id, 1, JobState.QUEUED))  # late
    assert manager.update_status(
        update(job.job_id, 3, JobState.SUCCEEDED, exit_code=0, output_tail=b"ok\n")
    )
    stored = manager.get(job.job_id)
    assert stored.state is JobState.SUCCEEDED
    assert (stored.exit_code, stored.output_tail, stored.worker_id) == (0, b"ok\n", "w-1")
    assert stored.attempts == 1
    assert [e.state for e in manager.events(job.job_id)] == [
        JobState.PENDING,
        JobState.QUEUED,
        JobState.RUNNING,
        JobState.SUCCEEDED,
    ]


def test_cancel_and_retry_write_history_and_outbox(manager: JobManager) -> None:
    job, _ = manager.submit(None, SPEC, {})
    manager.cancel(job.job_id, "no longer needed")
    with pytest.raises(FailedPrecondition) as error:
        manager.cancel(job.job_id, "again")
    assert error.value.metadata["current_state"] == "CANCELLED"
    retried = manager.retry(job.job_id)
    assert retried.generation == 2 and retried.state is JobState.PENDING
    # an update for the old generation changes nothing
    assert not manager.update_status(update(job.job_id, 9, JobState.SUCCEEDED, generation=1))
    assert manager.get(job.job_id).state is JobState.PENDING
    topics = [m.topic for m in manager.store.outbox.due(datetime.now(UTC) + timedelta(1), 10)]
    assert topics == ["enqueue", "cancel", "enqueue"]


def test_unknown_job_is_not_found(manager: JobManager) -> None:
    with pytest.raises(NotFound):
        manager.get("00000000-0000-0000-0000-000000000000")
    with pytest.raises(NotFound):
        manager.cancel("00000000-0000-0000-0000-000000000000", "")


def test_pagination_returns_every_job_once(manager: JobManager) -> None:
    ids = {manager.submit(None, SPEC, {})[0].job_id for _ in range(7)}
    seen: list[str] = []
    after: tuple[datetime, str] | None = None
    pages = 0
    while True:
        jobs, after = manager.list_jobs(3, after)
        seen.extend(j.job_id for j in jobs)
        pages += 1
        if after is None:
            break
        manager.submit(None, SPEC, {})  # jobs added while paging are not a problem
    assert ids <= set(seen) and len(seen) == len(set(seen))
    assert pages >= 3


def test_outbox_postpone_and_delivery(manager: JobManager) -> None:
    manager.submit(None, SPEC, {})
    now = datetime.now(UTC)
    [message] = manager.store.outbox.due(now + timedelta(seconds=1), 10)
    manager.store.outbox.postpone(message.id, now + timedelta(seconds=60), "queue down")
    assert manager.store.outbox.due(now + timedelta(seconds=1), 10) == []
    [later] = manager.store.outbox.due(now + timedelta(seconds=61), 10)
    assert later.attempts == 1
    manager.store.outbox.delivered(later.id)
    assert manager.store.outbox.pending() == 0


def test_filters_by_state_label_worker_type_and_time(manager: JobManager) -> None:
    infra, _ = manager.submit(None, SPEC, {}, SpecIndex({"team": "infra"}, ("vm",)))
    web, _ = manager.submit(None, SPEC, {}, SpecIndex({"team": "web"}, ()))
    manager.cancel(web.job_id, "")

    def ids(where: JobFilter) -> list[str]:
        return [j.job_id for j in manager.list_jobs(100, None, where)[0]]

    assert ids(JobFilter(labels=(("team", "infra"),))) == [infra.job_id]
    assert ids(JobFilter(states=(JobState.CANCELLED,))) == [web.job_id]
    # a job naming no worker type may run on any
    assert ids(JobFilter(worker_type="vm")) == [infra.job_id, web.job_id]
    assert ids(JobFilter(worker_type="process")) == [web.job_id]
    assert ids(JobFilter(created_before=infra.created_at)) == []
    assert ids(JobFilter(created_after=web.created_at)) == [web.job_id]
    assert ids(JobFilter(labels=(("team", "infra"),), states=(JobState.CANCELLED,))) == []


def test_a_failed_use_case_changes_nothing(manager: JobManager) -> None:
    job, _ = manager.submit(None, SPEC, {})
    with pytest.raises(RuntimeError), manager.store.transaction() as tx:
        stored = tx.get(job.job_id, for_update=True)
        assert stored is not None
        stored.state = JobState.RUNNING
        tx.save(stored)
        tx.send("cancel", stored, stored.created_at)
        raise RuntimeError("the store failed mid-transaction")
    assert manager.get(job.job_id).state is JobState.PENDING
    assert manager.store.outbox.pending() == 1
