"""The queue's use cases. Each is one transaction on the store: the item's conditional
update and its report to the jobs service commit together, or not at all."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from services.common.clock import Clock
from services.common.errors import Aborted, NotFound
from services.common.feed import ChangeFeed
from services.queue import domain
from services.queue.domain import (
    Item,
    ItemState,
    Outcome,
    RetryPolicy,
    Worker,
    WorkerState,
)
from services.queue.store import QueueStore, Transaction

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class NewItem:
    job_id: str
    generation: int
    spec_json: str
    priority: int
    max_attempts: int
    run_at: datetime | None
    worker_types: tuple[str, ...]
    labels: dict[str, str]
    trace_context: dict[str, str]


@dataclass(frozen=True)
class Lease:
    item: Item
    token: str
    deadline: datetime


class QueueManager:
    def __init__(
        self,
        store: QueueStore,
        clock: Clock,
        *,
        policy: RetryPolicy | None = None,
        worker_timeout: float = 30.0,
        feed: ChangeFeed | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.policy = policy or RetryPolicy()
        self.worker_timeout = worker_timeout
        self.feed = feed or ChangeFeed()
        self._stop = threading.Event()

    def _in_transaction(self, work: Callable[[Transaction], T], attempts: int = 5) -> T:
        """Run ``work`` in one transaction; a version conflict is retried a few times."""
        for attempt in range(attempts):
            try:
                with self.store.transaction() as tx:
                    return work(tx)
            except Aborted:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    # ---- enqueue ----------------------------------------------------------------------

    def enqueue(self, new: NewItem) -> tuple[Item, bool]:
        def work(tx: Transaction) -> tuple[Item, bool]:
            now = self.clock.now()
            existing = tx.get(new.job_id, for_update=True)
            if existing is not None and existing.generation >= new.generation:
                return existing, False
            item = Item(
                job_id=new.job_id,
                generation=new.generation,
                spec_json=new.spec_json,
                state=ItemState.WAITING,
                priority=new.priority,
                run_at=new.run_at or now,
                seq=int(self.clock.timestamp() * 1_000_000),
                max_attempts=new.max_attempts or self.policy.default_max_attempts,
                created_at=now,
                updated_at=now,
                worker_types=new.worker_types,
                labels=dict(new.labels),
                trace_context=dict(new.trace_context),
            )
            tx.report(domain.enqueued(item, now))
            if existing is None:
                tx.insert(item)
            else:  # a new generation (RetryJob) replaces the old item; its lease is stale
                tx.save(item, existing.version)
            return item, True

        item, created = self._in_transaction(work)
        if created:
            self.feed.changed()
        return item, created

    # ---- claim ------------------------------------------------------------------------

    def claim(
        self,
        worker_id: str,
        worker_type: str,
        labels: dict[str, str],
        max_items: int,
        lease_seconds: float,
        wait_seconds: float = 0.0,
    ) -> list[Lease]:
        deadline = self.clock.monotonic() + wait_seconds
        while True:
            seen = self.feed.version
            leases = self._claim_once(worker_id, worker_type, labels, max_items, lease_seconds)
            remaining = deadline - self.clock.monotonic()
            if leases or remaining <= 0 or self._stop.is_set():
                return leases
            # Wake on a local enqueue; poll now and then for other replicas and run_at.
            self.feed.wait(seen, min(remaining, 0.5))

    def _claim_once(
        self,
        worker_id: str,
        worker_type: str,
        labels: dict[str, str],
        max_items: int,
        lease_seconds: float,
    ) -> list[Lease]:
        def work(tx: Transaction) -> list[Lease]:
            now = self.clock.now()
            worker = self._seen(tx, worker_id, worker_type, labels, now)
            if worker.state is WorkerState.DRAINING:
                return []
            leases: list[Lease] = []
            for item in tx.available(worker_type, now, max_items * 4):
                if len(leases) == max_items:
                    break
                if not item.accepts(worker_type, labels):
                    continue
                version = item.version
                report = domain.lease(item, worker_id, lease_seconds, now)
                tx.save(item, version)
                tx.report(report)
                assert item.lease_token and item.lease_deadline
                leases.append(Lease(item, item.lease_token, item.lease_deadline))
            return leases

        return self._in_transaction(work)

    def _seen(
        self,
        tx: Transaction,
        worker_id: str,
        worker_type: str,
        labels: dict[str, str],
        now: datetime,
        slots: int = 0,
    ) -> Worker:
        worker = tx.worker(worker_id)
        if worker is None:
            worker = Worker(worker_id, worker_type, dict(labels), slots, WorkerState.ONLINE, now)
        else:
            worker.last_seen = now
            if worker.state is WorkerState.OFFLINE:
                worker.state = WorkerState.ONLINE
        tx.put_worker(worker)
        return worker

    # ---- the lease holder's calls -----------------------------------------------------

    def heartbeat(self, token: str, lease_seconds: float | None) -> Item:
        def work(tx: Transaction) -> Item:
            now = self.clock.now()
            item = domain.check_holder(tx.by_token(token), token)
            version = item.version
            domain.heartbeat(item, lease_seconds, now)
            tx.save(item, version)
            worker = tx.worker(item.worker_id)
            if worker is not None:
                worker.last_seen = now
                if worker.state is WorkerState.OFFLINE:
                    worker.state = WorkerState.ONLINE
                tx.put_worker(worker)
            return item

        return self._in_transaction(work)

    def complete(
        self, token: str, outcome: Outcome, exit_code: int | None, output_tail: str, error: str
    ) -> Item:
        def work(tx: Transaction) -> Item:
            now = self.clock.now()
            item = domain.check_holder(tx.by_token(token), token)
            version = item.version
            report = domain.complete(item, outcome, exit_code, output_tail, error, now, self.policy)
            tx.save(item, version)
            tx.report(report)
            return item

        item = self._in_transaction(work)
        self.feed.changed()
        return item

    def release(self, token: str, reason: str) -> Item:
        def work(tx: Transaction) -> Item:
            now = self.clock.now()
            item = domain.check_holder(tx.by_token(token), token)
            version = item.version
            tx.report(domain.release(item, reason, now))
            tx.save(item, version)
            return item

        item = self._in_transaction(work)
        self.feed.changed()
        return item

    # ---- operators and the jobs service -----------------------------------------------

    def cancel(self, job_id: str, generation: int) -> Item:
        def work(tx: Transaction) -> Item:
            item = tx.get(job_id, for_update=True)
            if item is None:
                raise NotFound("item", job_id)
            if generation and item.generation != generation:
                return item  # a cancel for another generation: nothing to do here
            version = item.version
            report = domain.cancel(item, self.clock.now())
            tx.save(item, version)
            if report is not None:
                tx.report(report)
            return item

        return self._in_transaction(work)

    def redrive(self, job_id: str) -> Item:
        def work(tx: Transaction) -> Item:
            item = tx.get(job_id, for_update=True)
            if item is None:
                raise NotFound("item", job_id)
            version = item.version
            tx.report(domain.redrive(item, self.clock.now()))
            tx.save(item, version)
            return item

        item = self._in_transaction(work)
        self.feed.changed()
        return item

    def get(self, job_id: str) -> Item:
        item = self.store.get(job_id)
        if item is None:
            raise NotFound("item", job_id)
        return item

    def stats(self) -> tuple[dict[str, int], float]:
        oldest = self.store.oldest_waiting()
        age = max(0.0, (self.clock.now() - oldest).total_seconds()) if oldest else 0.0
        return self.store.counts(), age

    # ---- workers ----------------------------------------------------------------------

    def register_worker(
        self, worker_id: str, worker_type: str, labels: dict[str, str], slots: int
    ) -> Worker:
        def work(tx: Transaction) -> Worker:
            now = self.clock.now()
            worker = Worker(worker_id, worker_type, dict(labels), slots, WorkerState.ONLINE, now)
            tx.put_worker(worker)
            return worker

        return self._in_transaction(work)

    def drain_worker(self, worker_id: str) -> Worker:
        def work(tx: Transaction) -> Worker:
            worker = tx.worker(worker_id)
            if worker is None:
                raise NotFound("worker", worker_id)
            worker.state = WorkerState.DRAINING
            tx.put_worker(worker)
            return worker

        return self._in_transaction(work)

    def workers(self) -> list[Worker]:
        return self.store.workers()

    # ---- the reaper -------------------------------------------------------------------

    def reap(self, batch: int = 200) -> int:
        """Expire leases past their deadline, and release the leases of silent workers."""

        def work(tx: Transaction) -> int:
            now = self.clock.now()
            count = 0
            for item in tx.expired(now, batch):
                version = item.version
                tx.report(
                    domain.expire(
                        item, now, self.policy, f"the lease of attempt {item.attempt} expired"
                    )
                )
                tx.save(item, version)
                count += 1
            cutoff = now - timedelta(seconds=self.worker_timeout)
            for worker in tx.silent_workers(cutoff):
                worker.state = WorkerState.OFFLINE
                tx.put_worker(worker)
                for item in tx.leased_by(worker.worker_id):
                    version = item.version
                    tx.report(
                        domain.expire(
                            item, now, self.policy, f"worker {worker.worker_id} went offline"
                        )
                    )
                    tx.save(item, version)
                    count += 1
            return count

        count = self._in_transaction(work)
        if count:
            self.feed.changed()
        return count

    def stop(self) -> None:
        self._stop.set()
        self.feed.changed()


class Reaper:
    """Runs ``QueueManager.reap`` on an interval: no user cron."""

    def __init__(self, manager: QueueManager, interval: float) -> None:
        self.manager = manager
        self.interval = interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            try:
                reaped = self.manager.reap()
                if reaped:
                    log.info("reaped %d expired leases", reaped)
            except Exception:
                log.exception("the lease reaper failed; retrying")
