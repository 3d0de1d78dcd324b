"""What the queue storage tests share: a manager on a real store, items, a clock to step."""

from __future__ import annotations

from datetime import datetime

from blixard.common.v1 import job_spec_pb2

from services.common import db, migrations
from services.common.clock import Clock
from services.queue.bootstrap import MIGRATIONS
from services.queue.domain import RetryPolicy
from services.queue.manager import NewItem, QueueManager
from services.queue.store import Fault, QueueStore, no_faults


def make_manager(
    url: str,
    clock: Clock | None = None,
    faults: Fault = no_faults,
    max_attempts: int = 2,
    worker_timeout: float = 30.0,
    backoff: float = 0.0,
    migrate: bool = True,
) -> QueueManager:
    """A queue manager on the database at ``url``, migrated (unless another one did
    already); retries wait ``backoff`` seconds at most (by default they do not wait)."""
    engine = db.make_engine(url, setting="QUEUE_DATABASE_URL")
    if migrate:
        migrations.upgrade(engine, MIGRATIONS, "queue_alembic_version", "QUEUE_DATABASE_URL")
    policy = RetryPolicy(
        default_max_attempts=max_attempts, base_seconds=backoff, cap_seconds=backoff
    )
    return QueueManager(
        QueueStore(engine, faults), clock or Clock(), policy=policy, worker_timeout=worker_timeout
    )


def new(
    job_id: str,
    priority: int = 0,
    worker_types: tuple[str, ...] = (),
    generation: int = 1,
    run_at: datetime | None = None,
    labels: dict[str, str] | None = None,
) -> NewItem:
    return NewItem(
        job_id=job_id,
        generation=generation,
        spec=job_spec_pb2.JobSpec(command=["true"]).SerializeToString(),
        priority=priority,
        max_attempts=0,
        run_at=run_at,
        worker_types=worker_types,
        labels=labels or {},
        trace_context={},
    )


class SteppedClock(Clock):
    """The real clock plus offsets the test moves: ``advance`` lets time pass (both
    clocks); ``offset`` alone steps the wall clock (as NTP may)."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = 0.0  # the wall clock's
        self.elapsed = 0.0  # the monotonic clock's

    def advance(self, seconds: float) -> None:
        self.offset += seconds
        self.elapsed += seconds

    def timestamp(self) -> float:
        return super().timestamp() + self.offset

    def monotonic(self) -> float:
        return super().monotonic() + self.elapsed


class ManualClock(Clock):
    """A clock that stands still until the test moves it (both clocks at once), so which
    items are due never depends on how fast the test runs."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.wall = start
        self.mono = 1_000.0
        super().__init__(wall=lambda: self.wall, monotonic=lambda: self.mono)

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds
