"""The jobs outbox's delivery to the queue, on real stores: runs of enqueues go in one
batch, a cancel goes on its own in its place, and nothing after a failure is sent."""

from __future__ import annotations

from datetime import timedelta

import pytest

from services.common import db, migrations
from services.common.clock import Clock
from services.common.outbox import Message, Transient
from services.jobs.bootstrap import MIGRATIONS
from services.jobs.domain import Job
from services.jobs.manager import JobManager
from services.jobs.relay import QueueDelivery
from services.jobs.store import JobStore

SPEC = '{"command": ["true"]}'


class RecordingQueue:
    """A queue port that records what it is sent; ``refuse`` names jobs it refuses."""

    def __init__(self, refuse: set[str] | None = None, down: bool = False) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.refuse = refuse or set()
        self.down = down

    def enqueue(self, job: Job) -> None:
        raise AssertionError("the relay sends batches")

    def enqueue_many(self, jobs: list[Job]) -> list[Exception | None]:
        self.calls.append(("enqueue", [job.job_id for job in jobs]))
        if self.down:
            raise Transient("the queue is down")
        return [ValueError("refused") if j.job_id in self.refuse else None for j in jobs]

    def cancel(self, job_id: str, generation: int) -> None:
        self.calls.append(("cancel", [job_id]))


@pytest.fixture
def manager(database_url: str) -> JobManager:
    engine = db.make_engine(database_url, setting="JOBS_DATABASE_URL")
    migrations.upgrade(engine, MIGRATIONS, "jobs_alembic_version", "JOBS_DATABASE_URL")
    return JobManager(JobStore(engine), Clock())


def due(manager: JobManager) -> list[Message]:
    store = manager.store
    assert isinstance(store, JobStore)
    return store.outbox.due(Clock().now() + timedelta(days=1), 100)


def test_enqueues_go_in_one_batch_and_a_cancel_in_its_place(manager: JobManager) -> None:
    a, _ = manager.submit("r-a", SPEC, {})
    b, _ = manager.submit("r-b", SPEC, {})
    manager.cancel(b.job_id, "not needed")  # b: an enqueue no longer worth sending, a cancel
    c, _ = manager.submit("r-c", SPEC, {})
    queue = RecordingQueue()
    delivery = QueueDelivery(manager.store, queue)  # type: ignore[arg-type]
    messages = due(manager)

    outcomes = delivery.many(messages)

    assert outcomes == [None] * len(messages)
    assert queue.calls == [
        ("enqueue", [a.job_id]),
        ("cancel", [b.job_id]),
        ("enqueue", [c.job_id]),
    ]


def test_a_cancel_waits_for_the_enqueues_before_it(manager: JobManager) -> None:
    earlier, _ = manager.submit("r-earlier", SPEC, {})
    queue = RecordingQueue()
    delivery = QueueDelivery(manager.store, queue)  # type: ignore[arg-type]
    store = manager.store
    assert isinstance(store, JobStore)
    store.outbox.delivered_many([m.id for m in due(manager)])  # an earlier round sent it
    later, _ = manager.submit("r-later", SPEC, {})
    manager.cancel(earlier.job_id, "not needed")
    messages = due(manager)  # enqueue later, then cancel earlier

    outcomes = delivery.many(messages)

    assert outcomes == [None, None]
    assert queue.calls == [("enqueue", [later.job_id]), ("cancel", [earlier.job_id])]


def test_nothing_after_a_refused_job_is_sent(manager: JobManager) -> None:
    jobs = [manager.submit(f"r-{n}", SPEC, {})[0] for n in range(3)]
    manager.cancel(jobs[2].job_id, "not needed")
    queue = RecordingQueue(refuse={jobs[1].job_id})
    delivery = QueueDelivery(manager.store, queue)  # type: ignore[arg-type]
    messages = due(manager)  # enqueue 0, 1, 2, then cancel 2

    outcomes = delivery.many(messages)

    assert outcomes[0] is None and isinstance(outcomes[1], ValueError)
    assert len(outcomes) == len(messages) and all(o is not None for o in outcomes[1:])
    assert queue.calls == [("enqueue", [jobs[0].job_id, jobs[1].job_id])]  # no cancel sent


def test_a_queue_that_is_down_fails_the_whole_batch(manager: JobManager) -> None:
    for n in range(3):
        manager.submit(f"r-{n}", SPEC, {})
    delivery = QueueDelivery(manager.store, RecordingQueue(down=True))  # type: ignore[arg-type]

    outcomes = delivery.many(due(manager))

    assert len(outcomes) == 3 and all(isinstance(o, Transient) for o in outcomes)
