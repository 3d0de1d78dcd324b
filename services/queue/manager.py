"""The queue's use cases. Each is one transaction on the store: the item's conditional
update and its report to the jobs service commit together, or not at all."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from services.common.clock import Clock
from services.common.combiner import Combiner
from services.common.errors import Aborted, BlixardError, LoopFailures, NotFound
from services.queue import domain
from services.queue.cache import Entry, ItemCache
from services.queue.domain import (
    Item,
    ItemState,
    Outcome,
    RetryPolicy,
    Worker,
    WorkerState,
)
from services.queue.store import QueueStore, Transaction
from services.queue.timers import Timers
from services.queue.waiters import Waiters, kind_of

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class NewItem:
    job_id: str
    generation: int
    spec: bytes  # a serialized JobSpec
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


@dataclass(frozen=True)
class Stats:
    by_state: dict[str, int]
    oldest_waiting_age: float
    waiting_by_worker_types: dict[str, int]
    leases_expiring: int


@dataclass(frozen=True)
class _ClaimArgs:
    worker_id: str
    worker_type: str
    labels: dict[str, str]
    max_items: int
    lease_seconds: float
    named_only: bool


@dataclass(frozen=True)
class Completion:
    """One Complete of a batch."""

    token: str
    outcome: Outcome
    exit_code: int | None = None
    output_tail: str = ""
    error: str = ""


class QueueManager:
    """The use cases. Item writes go to the store first and reach the cache only once
    committed; claims take their items from the cache (see cache.py)."""

    def __init__(
        self,
        store: QueueStore,
        clock: Clock,
        *,
        policy: RetryPolicy | None = None,
        worker_timeout: float = 30.0,
        cache: ItemCache | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.policy = policy or RetryPolicy()
        self.worker_timeout = worker_timeout
        self._stop = threading.Event()
        self._seen_workers: dict[str, tuple[float, Worker]] = {}
        # Expiry on this replica's monotonic clock too (see timers.py): by lease token and
        # by worker id.
        self._leases = Timers(clock.monotonic)
        self._workers = Timers(clock.monotonic)
        self._pruned = clock.monotonic()
        self._claims = Combiner(self._claim_batch, max_batch=32)
        self._completions = Combiner(self._complete_batches, max_batch=32)
        if cache is None:
            cache = ItemCache()
            cache.load_entries(store.live_entries(), clock.timestamp())
        self.cache = cache
        # Long polls, woken for items they may take.
        self.waiters = Waiters(lambda kind: cache.ready_kind(kind, clock.timestamp()))
        # How often a long poll looks again unwoken (other replicas' items, delayed ones).
        self.look_again_seconds = 0.5
        # Enqueue order (FIFO within a priority): the clock in microseconds, but never
        # behind the last number given, so a clock stepped back cannot jump the line.
        self._seq_lock = threading.Lock()
        self._last_seq = cache.max_seq()

    # ---- the two halves of every write ------------------------------------------------

    def _write(
        self,
        work: Callable[[Transaction], T],
        touched: Callable[[T], list[Item]],
        job_ids: list[str],
        attempts: int = 5,
    ) -> T:
        """Run ``work`` in one store transaction; once it committed, the cache takes the
        items it wrote. If it failed, the items it may have touched are read back from
        the store (a failure after the database committed must not leave a ghost)."""
        for attempt in range(attempts):
            written: list[str] = []
            try:
                with self.store.transaction() as tx:
                    written = tx.written
                    result = work(tx)
            except Aborted:
                self.refresh([*job_ids, *written])
                if attempt == attempts - 1:
                    raise
                continue
            except BaseException:
                self.refresh([*job_ids, *written])
                raise
            for item in touched(result):
                self.cache.apply(item)
            return result
        raise AssertionError("unreachable")

    def refresh(self, job_ids: list[str]) -> None:
        """Make the cache's view of these items the store's, if the store can be read."""
        for job_id in job_ids:
            seen = self.cache.version(job_id)  # before the read: what is applied after stands
            try:
                item = self.store.get(job_id)
            except Exception:
                log.warning("cannot read item %s back from the store", job_id, exc_info=True)
                continue
            if item is None:
                self.cache.forget(job_id, seen)
            else:
                self.cache.apply(item)

    def reconcile(self) -> int:
        """Make the whole cache the store's: every live item loaded (a newer version
        wins), every entry the store no longer has live forgotten. Another replica's
        changes reach this cache here, and, item by item, when a claim meets a conflict.
        Returns how many entries were dropped."""
        live: set[str] = set()
        for item in self.store.live_items():
            live.add(item.job_id)
            self.cache.apply(item)
        stale = [job_id for job_id in self.cache.ids() if job_id not in live]
        self.refresh(stale)  # read each back: it may have become live again meanwhile
        return len(stale)

    # ---- enqueue ----------------------------------------------------------------------

    def enqueue(self, new: NewItem) -> tuple[Item, bool]:
        return self.enqueue_many([new])[0]

    def enqueue_many(self, news: list[NewItem]) -> list[tuple[Item, bool]]:
        """Enqueue in one transaction, idempotent by (job id, generation): an item already
        there at this generation or a newer one is returned as it is (created False)."""

        now = self.clock.now()

        def work(tx: Transaction) -> list[tuple[Item, bool]]:
            seq = self._next_seqs(len(news))
            existing = tx.get_many([new.job_id for new in news])
            results: list[tuple[Item, bool]] = []
            inserts: list[Item] = []
            replaces: list[tuple[Item, int]] = []
            reports = []
            for offset, new in enumerate(news):
                old = existing.get(new.job_id)
                if old is not None and old.generation >= new.generation:
                    results.append((old, False))
                    continue
                item = Item(
                    job_id=new.job_id,
                    generation=new.generation,
                    spec=new.spec,
                    state=ItemState.WAITING,
                    priority=new.priority,
                    run_at=new.run_at or now,
                    seq=seq + offset,
                    max_attempts=new.max_attempts or self.policy.default_max_attempts,
                    created_at=now,
                    updated_at=now,
                    worker_types=new.worker_types,
                    labels=dict(new.labels),
                    trace_context=dict(new.trace_context),
                )
                reports.append(domain.enqueued(item, now))
                if old is None:
                    inserts.append(item)
                else:  # a new generation (RetryJob) replaces the old item; its lease is stale
                    replaces.append((item, old.version))
                existing[new.job_id] = item
                results.append((item, True))
            tx.insert_many(inserts)
            tx.replace_many(replaces)
            tx.report_many(reports)
            return results

        results = self._write(
            work, lambda rs: [item for item, created in rs if created], [n.job_id for n in news]
        )
        # Due "now" means due from now on, even if the clock is stepped back later.
        self.cache.advance(now.timestamp())
        self._announce([item for item, created in results if created])
        return results

    def _announce(self, items: list[Item]) -> None:
        """Wake the long polls that may take one of these items, if it can be claimed now."""
        now = self.clock.now()
        self.waiters.claimable(
            kind_of(item)
            for item in items
            if item.state is ItemState.WAITING and item.run_at <= now
        )

    def _next_seqs(self, count: int) -> int:
        """The first of ``count`` consecutive enqueue numbers, after every one given."""
        with self._seq_lock:
            first = max(int(self.clock.timestamp() * 1_000_000), self._last_seq + 1)
            self._last_seq = first + count - 1
            return first

    # ---- claim ------------------------------------------------------------------------

    def claim(
        self,
        worker_id: str,
        worker_type: str,
        labels: dict[str, str],
        max_items: int,
        lease_seconds: float,
        wait_seconds: float = 0.0,
        named_only: bool = False,
        caller_waiting: Callable[[], bool] = lambda: True,
    ) -> list[Lease]:
        """Lease up to ``max_items``, waiting up to ``wait_seconds`` for work.
        ``caller_waiting`` says whether the worker still waits for the answer (its RPC is
        alive): a worker that died in a long poll must not be handed items it will never
        run, and leases made as it went are given back at once, the attempt not counted."""
        args = _ClaimArgs(worker_id, worker_type, labels, max_items, lease_seconds, named_only)
        leases = self._claim_waiting(args, wait_seconds, caller_waiting)
        if leases and not caller_waiting():
            # Given back once the poll is no longer registered, so they wake another.
            self._give_back(leases, "the claiming worker went away before the answer")
            return []
        return leases

    def _claim_waiting(
        self, args: _ClaimArgs, wait_seconds: float, caller_waiting: Callable[[], bool]
    ) -> list[Lease]:
        worker_id, worker_type, labels = args.worker_id, args.worker_type, args.labels
        deadline = self.clock.monotonic() + wait_seconds
        # A long poll is registered across its attempts and waits, so an item announced
        # between an attempt and the wait is not missed.
        registration = (
            self.waiters.waiting(worker_type, labels, args.named_only, args.max_items)
            if wait_seconds > 0
            else nullcontext(None)
        )
        with registration as waiter:
            while True:
                if not caller_waiting():
                    return []
                # A worker waiting in a long poll is alive: it is seen on every turn
                # (written at most every worker_timeout/4), so the reaper never takes it
                # for silent and releases a lease it has just been given. A drain ends
                # the wait.
                worker = self._touch_worker(worker_id, worker_type, labels)
                if not worker.may_claim:
                    return []
                offered = self.waiters.attempting(waiter) if waiter is not None else []
                try:
                    leases = self._claim_once(args)
                finally:
                    if offered:  # what it was woken for and left goes to others
                        assert waiter is not None
                        self.waiters.hand_on(offered, waiter)
                remaining = deadline - self.clock.monotonic()
                if leases or remaining <= 0 or self._stop.is_set():
                    return leases
                assert waiter is not None
                # Woken for an item it may take; looks again now and then for other
                # replicas' items and delayed items whose time came.
                waiter.wait(min(remaining, self.look_again_seconds))

    def _claim_once(self, args: _ClaimArgs) -> list[Lease]:
        """Claim what the cache offers. When every item it offered had been taken by
        another replica meanwhile (conflicts, now refreshed), look again at once rather
        than answer empty while items wait. Claims made at the same time share one store
        transaction (group commit)."""
        for _ in range(8):
            leases, conflicted = self._claims.submit(args)
            if leases or not conflicted:
                return leases
        return []

    def _claim_batch(self, claims: list[_ClaimArgs]) -> list[tuple[list[Lease], bool]]:
        """For each claim: (its leases, whether some items offered to it had been taken
        elsewhere)."""
        now = self.clock.now()
        staged_by_claim: list[list[Entry]] = []
        # The store is read at most once per batch and worker type, for the most any of
        # the batch's claims of that type may take (a second read would find what the
        # first loaded); when that read was a full page, once more per set of labels
        # workers carry (see below).
        limits: dict[tuple[str, bool], int] = {}
        for c in claims:
            key = (c.worker_type, c.named_only)
            limits[key] = max(limits.get(key, 0), 4 * c.max_items, 64)
        full_page: dict[tuple[str, bool], bool] = {}
        carried_read: set[tuple[str, bool, tuple[tuple[str, str], ...]]] = set()

        def stage(c: _ClaimArgs) -> list[Entry]:
            return self.cache.stage_claim(
                c.worker_type, c.labels, c.max_items, now.timestamp(), c.named_only
            )

        try:
            for c in claims:
                key = (c.worker_type, c.named_only)
                staged = stage(c)
                if not staged and key not in full_page:
                    # Nothing here: pick up what another replica enqueued, then look again.
                    waiting = self.store.waiting(c.worker_type, now, limits[key], c.named_only)
                    self.cache.load(waiting)
                    full_page[key] = len(waiting) == limits[key]
                    staged = stage(c)
                carried = (*key, tuple(sorted(c.labels.items())))
                if not staged and full_page.get(key) and carried not in carried_read:
                    # A full page of items requiring labels this worker lacks may hide
                    # ones it may take behind it.
                    carried_read.add(carried)
                    self.cache.load(
                        self.store.waiting(
                            c.worker_type, now, limits[key], c.named_only, carried=c.labels
                        )
                    )
                    staged = stage(c)
                staged_by_claim.append(staged)
        except BaseException:
            # A later claim's read failed: what the earlier ones took goes back.
            taken = [entry for staged in staged_by_claim for entry in staged]
            for entry in taken:
                self.cache.rollback(entry)
            self._put_back(taken)
            raise
        every = [entry for staged in staged_by_claim for entry in staged]
        if not every:
            return [([], False) for _ in claims]
        leased: dict[str, Item] = {}
        refused: set[str] = set()
        try:
            with self.store.transaction() as tx:
                # A drain made through another replica: this one's memory of the worker
                # may be older, the store's is not.
                refused = tx.drained_workers(sorted({c.worker_id for c in claims}))
                current = tx.get_many([entry.job_id for entry in every])
                changes: list[tuple[Item, int]] = []
                reports = []
                for c, staged in zip(claims, staged_by_claim, strict=True):
                    if c.worker_id in refused:
                        continue
                    for entry in staged:
                        item = current.get(entry.job_id)
                        if item is None or item.version != entry.version:
                            continue  # changed elsewhere: a conflict, repaired below
                        changes.append((item, item.version))
                        reports.append(domain.lease(item, c.worker_id, c.lease_seconds, now))
                        leased[entry.job_id] = item
                tx.save_many(changes)
                tx.report_many(reports)
        except BaseException:
            for entry in every:
                self.cache.rollback(entry)
            self.refresh([entry.job_id for entry in every])
            self._put_back(every)
            raise
        conflicts, put_back = [], []
        for c, staged in zip(claims, staged_by_claim, strict=True):
            for entry in staged:
                item = leased.get(entry.job_id)
                if item is not None:
                    self.cache.commit(entry, item)
                    self._lease_started(item)
                    continue
                self.cache.rollback(entry)
                put_back.append(entry)
                if c.worker_id not in refused:
                    conflicts.append(entry.job_id)
        self.refresh(conflicts)
        for worker_id in refused:
            self._seen_workers.pop(worker_id, None)  # its next claim reads the drain
        self._put_back(put_back)
        results: list[tuple[list[Lease], bool]] = []
        for c, staged in zip(claims, staged_by_claim, strict=True):
            if c.worker_id in refused:
                results.append(([], False))
                continue
            leases = []
            for entry in staged:
                item = leased.get(entry.job_id)
                if item is not None:
                    assert item.lease_token is not None and item.lease_deadline is not None
                    leases.append(Lease(item, item.lease_token, item.lease_deadline))
            results.append((leases, len(leases) < len(staged)))
        return results

    def _put_back(self, entries: list[Entry]) -> None:
        """Staged entries went back to the index (a refused claim, a conflict, a failed
        write): wake the polls that may take those of them that are claimable."""
        if not entries:
            return
        now = self.clock.timestamp()
        ready = {kind: self.cache.ready_kind(kind, now) for kind in {e.kind for e in entries}}
        self.waiters.claimable(r[0] for e in entries if (r := ready[e.kind]) is not None)

    def _touch_worker(self, worker_id: str, worker_type: str, labels: dict[str, str]) -> Worker:
        """Record that the worker was seen. A worker claiming in a loop is written at most
        every worker_timeout/4 (what this replica last wrote is remembered), so claims do
        not each pay a write transaction; DrainWorker and offline marks reset that."""
        seen = self._seen_workers.get(worker_id)
        now_mono = self.clock.monotonic()
        if seen is not None and now_mono - seen[0] < self.worker_timeout / 4:
            return seen[1]
        worker = self._write_worker_seen(worker_id, worker_type, labels)
        self._seen_workers[worker_id] = (now_mono, worker)
        self._worker_seen(worker)
        return worker

    def _lease_started(self, item: Item) -> None:
        """This replica granted or extended the lease: it runs out here a lease from now."""
        assert item.lease_token is not None
        self._leases.start(item.lease_token, item.lease_deadline, item.lease_seconds)

    def _worker_seen(self, worker: Worker) -> None:
        self._workers.start(worker.worker_id, worker.last_seen, self.worker_timeout)

    def _write_worker_seen(
        self, worker_id: str, worker_type: str, labels: dict[str, str]
    ) -> Worker:
        def work(tx: Transaction) -> Worker:
            now = self.clock.now()
            worker = tx.worker(worker_id)
            if worker is None:
                worker = Worker(worker_id, worker_type, dict(labels), 0, WorkerState.ONLINE, now)
            else:
                worker.seen(now)
            tx.put_worker(worker)
            return worker

        return self._write(work, lambda _: [], [])

    # ---- the lease holder's calls -----------------------------------------------------

    def heartbeat(self, token: str, lease_seconds: float | None) -> Item:
        seen: list[Worker] = []

        def work(tx: Transaction) -> Item:
            now = self.clock.now()
            item = domain.check_holder(tx.by_tokens([token]).get(token), token)
            version = item.version
            domain.heartbeat(item, lease_seconds, now)
            tx.save(item, version)
            worker = tx.worker(item.worker_id)
            seen[:] = []
            if worker is not None:
                worker.seen(now)
                tx.put_worker(worker)
                seen.append(worker)
            return item

        item = self._write(work, lambda item: [item], [])
        self._lease_started(item)
        for worker in seen:
            self._worker_seen(worker)
        return item

    def complete(
        self, token: str, outcome: Outcome, exit_code: int | None, output_tail: str, error: str
    ) -> Item:
        result = self.complete_many([Completion(token, outcome, exit_code, output_tail, error)])[0]
        if isinstance(result, BlixardError):
            raise result
        return result

    def complete_many(self, completions: list[Completion]) -> list[Item | BlixardError]:
        """Complete a batch in one transaction; each completion succeeds or gets its own
        error (a stale token fails alone, and changes nothing). Batches sent at the same
        time share one transaction (group commit)."""
        return self._completions.submit(completions)

    def _complete_batches(self, batches: list[list[Completion]]) -> list[list[Item | BlixardError]]:
        results = self._complete_all([c for batch in batches for c in batch])
        split, start = [], 0
        for batch in batches:
            split.append(results[start : start + len(batch)])
            start += len(batch)
        return split

    def _complete_all(self, completions: list[Completion]) -> list[Item | BlixardError]:
        def work(tx: Transaction) -> list[Item | BlixardError]:
            now = self.clock.now()
            held = tx.by_tokens([c.token for c in completions])
            results: list[Item | BlixardError] = []
            changes: list[tuple[Item, int]] = []
            reports = []
            for c in completions:
                try:
                    item = domain.check_holder(held.pop(c.token, None), c.token)
                except BlixardError as exc:
                    results.append(exc)
                    continue
                changes.append((item, item.version))
                reports.append(
                    domain.complete(
                        item, c.outcome, c.exit_code, c.output_tail, c.error, now, self.policy
                    )
                )
                results.append(item)
            tx.save_many(changes)
            tx.report_many(reports)
            return results

        results = self._write(work, lambda rs: [r for r in rs if isinstance(r, Item)], [])
        self._leases.forget([c.token for c in completions])
        self._announce([r for r in results if isinstance(r, Item)])  # retries due at once
        return results

    def release(self, token: str, reason: str) -> Item:
        def work(tx: Transaction) -> Item:
            now = self.clock.now()
            item = domain.check_holder(tx.by_tokens([token]).get(token), token)
            version = item.version
            tx.report(domain.release(item, reason, now))
            tx.save(item, version)
            return item

        item = self._write(work, lambda item: [item], [])
        self._leases.forget([token])
        self._announce([item])
        return item

    def _give_back(self, leases: list[Lease], reason: str) -> None:
        for lease in leases:
            try:
                self.release(lease.token, reason)
            except Exception:  # the store is down or the item moved on: the lease expires
                log.warning("could not give back %s; its lease will expire", lease.item.job_id)

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

        return self._write(work, lambda item: [item], [job_id])

    def redrive(self, job_id: str) -> Item:
        def work(tx: Transaction) -> Item:
            item = tx.get(job_id, for_update=True)
            if item is None:
                raise NotFound("item", job_id)
            version = item.version
            tx.report(domain.redrive(item, self.clock.now()))
            tx.save(item, version)
            return item

        item = self._write(work, lambda item: [item], [job_id])
        self._announce([item])
        return item

    def get(self, job_id: str) -> Item:
        item = self.store.get(job_id)
        if item is None:
            raise NotFound("item", job_id)
        return item

    def stats(self, expiring_within: float) -> Stats:
        now = self.clock.now()
        oldest = self.store.oldest_due(now)
        return Stats(
            by_state={state.value: 0 for state in ItemState} | self.store.counts(),
            oldest_waiting_age=max(0.0, (now - oldest).total_seconds()) if oldest else 0.0,
            waiting_by_worker_types=self.store.waiting_by_worker_types(),
            leases_expiring=self.store.leases_expiring(now + timedelta(seconds=expiring_within)),
        )

    def list_items(
        self, page_size: int, after: str, states: list[ItemState], worker_type: str
    ) -> tuple[list[Item], str]:
        """A page of items in job_id order from just past ``after`` ("" for the first page),
        and the job_id the next page starts after ("" when there is no next page)."""
        items = self.store.list_items(
            limit=page_size + 1, after=after, states=states, worker_type=worker_type
        )
        if len(items) <= page_size:
            return items, ""
        return items[:page_size], items[page_size - 1].job_id

    # ---- workers ----------------------------------------------------------------------

    def register_worker(
        self, worker_id: str, worker_type: str, labels: dict[str, str], slots: int
    ) -> Worker:
        def work(tx: Transaction) -> Worker:
            now = self.clock.now()
            worker = Worker(worker_id, worker_type, dict(labels), slots, WorkerState.ONLINE, now)
            tx.put_worker(worker)
            return worker

        worker = self._write(work, lambda _: [], [])
        self._seen_workers[worker_id] = (self.clock.monotonic(), worker)
        self._worker_seen(worker)
        return worker

    def drain_worker(self, worker_id: str) -> Worker:
        def work(tx: Transaction) -> Worker:
            worker = tx.worker(worker_id)
            if worker is None:
                raise NotFound("worker", worker_id)
            worker.drain()
            tx.put_worker(worker)
            return worker

        worker = self._write(work, lambda _: [], [])
        self._seen_workers.pop(worker_id, None)
        return worker

    def workers(self) -> list[Worker]:
        return self.store.workers()

    # ---- the reaper -------------------------------------------------------------------

    def reap(self, batch: int = 200) -> int:
        """Expire leases past their deadline, and release the leases of silent workers:
        past their time on the wall clock and on this replica's monotonic clock (a wall
        clock stepped forward must not end every lease at once; see timers.py)."""

        ended: list[str] = []  # the tokens of the leases ended

        def work(tx: Transaction) -> list[Item]:
            now = self.clock.now()
            reaped: list[Item] = []
            ended.clear()
            # Every overdue lease is timed here, not only a page of them (a page of leases
            # not yet run out here must not hide one that has); those that ran out are
            # locked and checked again (a heartbeat may have moved one meanwhile).
            ran_out = [
                token
                for token, deadline, seconds in tx.overdue(now)
                if self._leases.ran_out(token, deadline, seconds)
            ][:batch]
            held = tx.by_tokens(ran_out) if ran_out else {}
            for token in ran_out:
                item = held.get(token)
                if item is None or not (
                    item.lease_deadline is not None
                    and item.lease_deadline < now
                    and self._leases.ran_out(token, item.lease_deadline, item.lease_seconds)
                ):
                    continue
                ended.append(token)
                version = item.version
                why = f"the lease of attempt {item.attempt} expired"
                tx.report(domain.expire(item, now, self.policy, why))
                tx.save(item, version)
                reaped.append(item)
            cutoff = now - timedelta(seconds=self.worker_timeout)
            for worker in tx.silent_workers(cutoff):
                if not self._workers.ran_out(
                    worker.worker_id, worker.last_seen, self.worker_timeout
                ):
                    continue
                self._seen_workers.pop(worker.worker_id, None)
                worker.state = WorkerState.OFFLINE
                tx.put_worker(worker)
                for item in tx.leased_by(worker.worker_id):
                    ended.append(item.lease_token or "")
                    version = item.version
                    why = f"worker {worker.worker_id} went offline"
                    tx.report(domain.expire(item, now, self.policy, why))
                    tx.save(item, version)
                    reaped.append(item)
            return reaped

        reaped = self._write(work, lambda items: items, [])
        self._leases.forget(ended)
        self._announce(reaped)
        self._prune_timers()
        return len(reaped)

    def _prune_timers(self) -> None:
        """Now and then, drop the timers of leases and workers that ran out long ago
        (ended through another replica; a worker gone for good)."""
        grace = 60.0
        if self.clock.monotonic() - self._pruned >= grace:
            self._pruned = self.clock.monotonic()
            self._leases.prune(grace)
            self._workers.prune(grace)

    def stop(self) -> None:
        self._stop.set()
        self.waiters.wake_all()


class Reaper:
    """Runs ``QueueManager.reap`` on an interval (no user cron), and reconciles the cache
    with the store every ``sync_interval`` seconds (other replicas' changes)."""

    def __init__(self, manager: QueueManager, interval: float, sync_interval: float = 30.0) -> None:
        self.manager = manager
        self.interval = interval
        self.sync_interval = sync_interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        next_sync = self.manager.clock.monotonic() + self.sync_interval
        failures = LoopFailures("the lease reaper")
        while not self._stopping.wait(self.interval):
            try:
                reaped = self.manager.reap()
                if reaped:
                    log.info("reaped %d expired leases", reaped)
                if self.manager.clock.monotonic() >= next_sync:
                    next_sync = self.manager.clock.monotonic() + self.sync_interval
                    dropped = self.manager.reconcile()
                    if dropped:
                        log.info("cache reconciled: %d entries changed elsewhere", dropped)
                failures.succeeded()
            except Exception as exc:
                failures.failed(exc)
