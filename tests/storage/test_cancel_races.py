"""A cancel racing an enqueue between two jobs replicas on one database, driven step by
step: whichever replica's relay delivers what, a job cancelled before it reached a worker
never runs."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from services.common import db, migrations
from services.common.clock import Clock
from services.common.errors import FailedPrecondition, NotFound
from services.common.outbox import Message
from services.jobs import convert
from services.jobs.bootstrap import MIGRATIONS
from services.jobs.domain import Job
from services.jobs.manager import JobManager
from services.jobs.relay import QueueDelivery
from services.jobs.store import JobStore
from services.queue.domain import ItemState, NewItem
from services.queue.manager import QueueManager
from tests.postgres import Cluster
from tests.storage.queue_support import make_manager

SPEC = '{"command": ["true"]}'


class QueueOnManager:
    """The jobs service's queue port over a real queue manager, answering as GrpcQueue
    does (a cancel of nothing there is done). ``before_enqueue`` runs between the relay's
    read of the job and the enqueue reaching the queue: the race's window."""

    def __init__(self, queue: QueueManager) -> None:
        self.queue = queue
        self.before_enqueue: Callable[[], None] = lambda: None

    def enqueue(self, job: Job) -> None:
        [outcome] = self.enqueue_many([job])
        if outcome is not None:
            raise outcome

    def enqueue_many(self, jobs: list[Job]) -> list[Exception | None]:
        self.before_enqueue()
        self.queue.enqueue_many(
            [
                NewItem(
                    job_id=job.job_id,
                    generation=job.generation,
                    spec=convert.spec_message(job.spec_json).SerializeToString(),
                    priority=0,
                    max_attempts=0,
                    run_at=None,
                    worker_types=(),
                    labels={},
                    trace_context={},
                )
                for job in jobs
            ]
        )
        return [None] * len(jobs)

    def cancel(self, job_id: str, generation: int, timeout: float = 5.0) -> None:
        try:
            self.queue.cancel(job_id, generation)
        except (NotFound, FailedPrecondition):
            pass  # as GrpcQueue: nothing (more) to cancel there


def jobs_replica(url: str, queue: QueueOnManager | None = None) -> JobManager:
    engine = db.make_engine(url, setting="JOBS_DATABASE_URL")
    migrations.upgrade(engine, MIGRATIONS, "jobs_alembic_version", "JOBS_DATABASE_URL")
    return JobManager(JobStore(engine), Clock(), queue=queue)


def due(replica: JobManager) -> list[Message]:
    store = replica.store
    assert isinstance(store, JobStore)
    return store.outbox.due(Clock().now() + timedelta(days=1), 100)


@pytest.fixture
def queue_url(database_url: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The queue's own database, of the same kind as the jobs service's."""
    if database_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path}/queue.sqlite3"
    cluster: Cluster = request.getfixturevalue("postgres_cluster")
    return cluster.new_database()


@pytest.mark.parametrize("told_at_once", [False, True], ids=["outbox-only", "cancel-told-at-once"])
def test_a_cancel_through_one_replica_wins_over_the_other_replicas_late_enqueue(
    database_url: str, queue_url: str, told_at_once: bool
) -> None:
    queue = make_manager(queue_url)
    port_a, port_b = QueueOnManager(queue), QueueOnManager(queue)
    replica_a = jobs_replica(database_url)
    replica_b = jobs_replica(database_url, port_b if told_at_once else None)
    relay_a = QueueDelivery(replica_a.store, port_a)  # type: ignore[arg-type]
    relay_b = QueueDelivery(replica_b.store, port_b)  # type: ignore[arg-type]
    job, _ = replica_a.submit("r-1", SPEC, {})
    page_a = due(replica_a)  # replica A's relay reads the enqueue...

    def cancel_through_b() -> None:
        # ...and while it sends it, the job is cancelled through replica B, whose relay
        # delivers what it may: on SQLite (no claims) the cancel first, skipping the
        # enqueue of a cancelled job; on PostgreSQL nothing yet, since replica A's relay
        # holds a claim on the job's enqueue, which holds back the job's later messages
        # on every relay (the cancel cannot overtake it there).
        replica_b.cancel(job.job_id, "not needed")
        page_b = due(replica_b)
        assert relay_b.many(page_b) == [None] * len(page_b)
        on_postgres = not database_url.startswith("sqlite")
        assert [m.topic for m in page_b] == ([] if on_postgres else ["enqueue", "cancel"])

    port_a.before_enqueue = cancel_through_b
    assert relay_a.many(page_a) == [None]  # the enqueue lands last
    if told_at_once or database_url.startswith("sqlite"):
        # The queue heard of the cancel first: the late enqueue landed cancelled.
        assert queue.claim("w-1", "process", {}, 10, 30) == []
    replica_a.store.outbox.delivered_many([m.id for m in page_a])  # as A's relay does next
    rest = due(replica_b)  # then B's relay sends what was held back: the cancel
    assert relay_b.many(rest) == [None] * len(rest)

    assert queue.claim("w-1", "process", {}, 10, 30) == []
    assert queue.get(job.job_id).state is ItemState.CANCELLED
    # Each relay sending again what it read changes nothing.
    port_a.before_enqueue = lambda: None
    relay_a.many(page_a)
    assert queue.claim("w-1", "process", {}, 10, 30) == []
