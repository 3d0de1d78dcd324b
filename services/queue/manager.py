"""The queue's use cases. Each is one transaction on the store: the item's conditional
update and its report to the jobs service commit together, or not at all."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy.exc import DBAPIError

from services.common.clock import Clock
from services.common.combiner import Combiner
from services.common.db import conflict_pause, is_conflict, refused_item
from services.common.errors import Aborted, BlixardError, LoopFailures, NotFound, first_line
from services.common.outbox import ParkedMessages
from services.queue import domain
from services.queue.cache import Entry, ItemCache
from services.queue.domain import (
    Item,
    ItemState,
    NewItem,
    NextGeneration,
    Outcome,
    Report,
    RetryPolicy,
    Worker,
    WorkerState,
)
from services.queue.store import (
    QueueStore,
    Transaction,
    check_item,
    check_transition,
)
from services.queue.timers import Timers
from services.queue.waiters import Waiters, kind_of

log = logging.getLogger(__name__)
T = TypeVar("T")


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
    parked_messages: int = 0  # reports the outbox relay gave up on
    outbox_pending: int = 0  # reports still to deliver


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
    output_tail: bytes = b""  # as the job wrote it
    error: str = ""
    # Every byte the attempt wrote, when the worker sends its output with the completion
    # (the jobs service then stores the tail as the attempt's output): passed on, not kept.
    output_bytes: int | None = None
    execution_id: str = ""


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
        worker_retention: float = 0.0,
    ) -> None:
        self.store = store
        self.clock = clock
        self.policy = policy or RetryPolicy()
        # The reports to jobs the outbox relay gave up on (the relay waits on reports).
        self.parked = ParkedMessages(store.outbox, clock, store.reports)
        self.worker_timeout = worker_timeout
        # Workers offline for longer than this are deleted by the reaper (0: kept).
        self.worker_retention = worker_retention
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
            except DBAPIError as exc:
                self.refresh([*job_ids, *written])
                if not is_conflict(exc):
                    raise
                # A deadlock or serialization failure: a lost race, run again.
                if attempt == attempts - 1:
                    raise  # the edge answers it ABORTED / STORE_CONFLICT
                log.info("a queue transaction lost a race (%s); retrying", first_line(exc))
                conflict_pause(attempt)
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
        result = self.enqueue_many([new])[0]
        if isinstance(result, BlixardError):
            raise result
        return result

    def enqueue_many(self, news: list[NewItem]) -> list[tuple[Item, bool] | BlixardError]:
        """Enqueue in one transaction, idempotent by (job id, generation): an item already
        there at this generation or a newer one is returned as it is (created False), so
        is a generation already cancelled (a cancel that came first left it cancelled),
        also when a concurrent enqueue of the same item (another relay) committed it
        first. A new generation of an item whose old one still holds a lease waits for
        that lease to end (two executions of one job never overlap); the old one is asked
        to stop. Each item succeeds or fails on its own: one its columns cannot hold gets
        its own INVALID_ARGUMENT, and the rest are enqueued."""

        now = self.clock.now()
        applied: list[Item] = []  # what the cache takes once this commits

        def run(isolate: bool) -> list[tuple[Item, bool] | BlixardError]:
            return self._write(
                lambda tx: self._enqueue_work(tx, news, now, isolate, applied),
                lambda _: applied,
                [n.job_id for n in news],
            )

        try:
            results = run(isolate=False)
        except DBAPIError as exc:
            if refused_item(exc) is None:
                raise
            results = run(isolate=True)  # a savepoint per item: the one refused fails alone
        # Due "now" means due from now on, even if the clock is stepped back later.
        self.cache.advance(now.timestamp())
        self._announce(applied)
        return results

    def _enqueue_work(
        self,
        tx: Transaction,
        news: list[NewItem],
        now: datetime,
        isolate: bool,
        applied: list[Item],
    ) -> list[tuple[Item, bool] | BlixardError]:
        applied.clear()
        seq = self._next_seqs(len(news))
        existing = tx.get_many([new.job_id for new in news])
        results: list[tuple[Item, bool] | BlixardError] = []
        # (position, item, the one it replaces, its report)
        planned: list[tuple[int, Item, Item | None, Report]] = []
        for offset, new in enumerate(news):
            old = existing.get(new.job_id)
            if old is not None and old.generation >= new.generation:
                results.append((old, False))
                continue
            if old is not None and old.state is ItemState.LEASED:
                try:
                    check_item(self._item_of(new, now, 0))  # as it will be, once it runs
                    with tx.savepoint() if isolate else nullcontext():
                        results.append(self._hold_next(tx, old, new, now))
                except BlixardError as exc:
                    results.append(exc)
                    continue
                except DBAPIError as exc:
                    refused = refused_item(exc)
                    if not isolate or refused is None:
                        raise
                    results.append(refused)
                    continue
                applied.append(old)  # asked to stop: a new version
                continue
            item = self._item_of(new, now, seq + offset)
            report = domain.enqueued(item, now)  # before the item is written: its report_seq
            try:
                check_item(item)
            except BlixardError as exc:
                results.append(exc)
                continue
            existing[new.job_id] = item
            planned.append((offset, item, old, report))
            results.append((item, True))
        if not isolate:
            self._write_enqueues(tx, planned, results)
        else:
            for one in planned:
                try:
                    with tx.savepoint():
                        self._write_enqueues(tx, [one], results)
                except DBAPIError as exc:
                    refused = refused_item(exc)
                    if refused is None:
                        raise
                    results[one[0]] = refused
        for position, *_ in planned:
            result = results[position]
            if isinstance(result, tuple) and result[1]:
                applied.append(result[0])
        return results

    def _write_enqueues(
        self,
        tx: Transaction,
        planned: list[tuple[int, Item, Item | None, Report]],
        results: list[tuple[Item, bool] | BlixardError],
    ) -> None:
        inserted = tx.insert_new([item for _, item, old, _ in planned if old is None])
        raced = [item.job_id for _, item, old, _ in planned if old is None]
        raced = [job_id for job_id in raced if job_id not in inserted]
        # Taken by a concurrent enqueue that committed first: theirs, read back locked.
        winners = tx.get_many(raced) if raced else {}
        replaces: list[tuple[Item, int]] = []
        reports = []
        for position, item, old, report in planned:
            if old is None and item.job_id not in inserted:
                winner = winners.get(item.job_id)
                if winner is None or winner.generation < item.generation:
                    raise Aborted(f"item {item.job_id} was enqueued concurrently")  # run again
                results[position] = (winner, False)
                continue
            if old is not None:  # a new generation (RetryJob) replaces the ended or waiting old
                replaces.append((item, old.version))
            reports.append(report)
        tx.replace_many(replaces)
        tx.report_many(reports)

    def _item_of(
        self, new: NewItem, now: datetime, seq: int, state: ItemState = ItemState.WAITING
    ) -> Item:
        return Item(
            job_id=new.job_id,
            generation=new.generation,
            spec=new.spec,
            state=state,
            priority=new.priority,
            run_at=new.run_at or now,
            seq=seq,
            max_attempts=new.max_attempts or self.policy.default_max_attempts,
            created_at=now,
            updated_at=now,
            worker_types=new.worker_types,
            labels=dict(new.labels),
            trace_context=dict(new.trace_context),
            cancel_requested=state is ItemState.CANCELLED,
            error="cancelled before it was enqueued" if state is ItemState.CANCELLED else "",
        )

    def _hold_next(
        self, tx: Transaction, old: Item, new: NewItem, now: datetime
    ) -> tuple[Item, bool]:
        """``new`` is a newer generation of ``old``, which still holds a lease: it waits
        for that lease to end (see _successor), and ``old``'s worker is asked to stop (at
        its next heartbeat). Answers the new generation as held (created), or what was
        held already (a repeat, or a generation cancelled before it came)."""
        held = tx.next_generation(old.job_id)
        if held is not None and held.new.generation >= new.generation:
            state = ItemState.CANCELLED if held.cancelled else ItemState.WAITING
            return self._item_of(held.new, held.created_at, 0, state), False
        tx.put_next(NextGeneration(new, False, now))
        self._stop_asked(tx, old, now)
        return self._item_of(new, now, 0), True

    def _stop_asked(self, tx: Transaction, item: Item, now: datetime) -> None:
        """A leased item's worker is to stop: it learns so at its next heartbeat."""
        if not item.cancel_requested:
            version = item.version
            item.cancel_requested = True
            item.updated_at = now
            tx.save(item, version)

    def _successor(self, tx: Transaction, item: Item, now: datetime) -> Item | None:
        """``item``'s lease has just ended: the next generation held for it, if any, as
        the item that replaces it (waiting, or cancelled if its cancel came first). Only
        an item asked to stop can have one (so the hot path reads nothing more)."""
        if not item.cancel_requested or item.state is ItemState.LEASED:
            return None
        held = tx.next_generation(item.job_id)
        if held is None:
            return None
        tx.drop_next(item.job_id)
        state = ItemState.CANCELLED if held.cancelled else ItemState.WAITING
        return self._item_of(held.new, now, self._next_seqs(1), state)

    def _ended(
        self,
        tx: Transaction,
        item: Item,
        version: int,
        now: datetime,
        changes: list[tuple[Item, int]],
        replaces: list[tuple[Item, int]],
        reports: list[Report],
    ) -> Item:
        """Plan the write of an item whose lease has just ended, or of the next
        generation held for it in its place; returns what will be written."""
        successor = self._successor(tx, item, now)
        if successor is None:
            changes.append((item, version))
            return item
        replaces.append((successor, version))
        if successor.state is ItemState.WAITING:
            reports.append(domain.enqueued(successor, now))
        return successor

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
            try:
                result = self._claims.submit(args)
            except DBAPIError as exc:
                if not is_conflict(exc):
                    raise
                continue  # a lost race (nothing was leased): look again
            if isinstance(result, BlixardError):
                raise result
            leases, conflicted = result
            if leases or not conflicted:
                return leases
        return []

    def _claim_batch(
        self, claims: list[_ClaimArgs]
    ) -> list[tuple[list[Lease], bool] | BlixardError]:
        """For each claim: (its leases, whether some items offered to it had been taken
        elsewhere), or why the database refused its write (that claim alone)."""
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
        failed: dict[int, BlixardError] = {}  # by claim: a write the database refused

        def write(isolate: bool) -> None:
            leased.clear()
            failed.clear()
            with self.store.transaction() as tx:
                # A drain made through another replica: this one's memory of the worker
                # may be older, the store's is not.
                refused.clear()
                refused.update(tx.drained_workers(sorted({c.worker_id for c in claims})))
                current = tx.get_many([entry.job_id for entry in every])
                changes: list[tuple[Item, int]] = []
                reports = []
                for n, (c, staged) in enumerate(zip(claims, staged_by_claim, strict=True)):
                    if c.worker_id in refused:
                        continue
                    mine: dict[str, Item] = {}
                    my_changes: list[tuple[Item, int]] = []
                    my_reports = []
                    for entry in staged:
                        item = current.get(entry.job_id)
                        if item is None or item.version != entry.version:
                            continue  # changed elsewhere: a conflict, repaired below
                        my_changes.append((item, item.version))
                        my_reports.append(domain.lease(item, c.worker_id, c.lease_seconds, now))
                        mine[entry.job_id] = item
                    if isolate and my_changes:
                        # Each claim in its own savepoint: one the database refuses fails
                        # alone, its items go back.
                        try:
                            with tx.savepoint():
                                tx.save_many(my_changes)
                                tx.report_many(my_reports)
                        except DBAPIError as exc:
                            problem = refused_item(exc)
                            if problem is None:
                                raise
                            failed[n] = problem
                            continue
                    changes.extend(my_changes)
                    reports.extend(my_reports)
                    leased.update(mine)
                if not isolate:
                    tx.save_many(changes)
                    tx.report_many(reports)

        try:
            try:
                write(isolate=False)
            except DBAPIError as exc:
                if refused_item(exc) is None:
                    raise
                write(isolate=True)
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
        results: list[tuple[list[Lease], bool] | BlixardError] = []
        for n, (c, staged) in enumerate(zip(claims, staged_by_claim, strict=True)):
            if n in failed:
                results.append(failed[n])
                continue
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
        self,
        token: str,
        outcome: Outcome,
        exit_code: int | None,
        output_tail: bytes,
        error: str,
        *,
        output_bytes: int | None = None,
        execution_id: str = "",
    ) -> Item:
        completion = Completion(
            token, outcome, exit_code, output_tail, error, output_bytes, execution_id
        )
        result = self.complete_many([completion])[0]
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
        """Each completion is written or fails on its own: a stale token, a value its
        column cannot hold (checked first), or a write the database refuses (the batch is
        then run again with a savepoint per completion) fails alone; the rest commit."""

        def work(tx: Transaction, isolate: bool) -> list[Item | BlixardError]:
            now = self.clock.now()
            held = tx.by_tokens([c.token for c in completions])
            results: list[Item | BlixardError] = []
            changes: list[tuple[Item, int]] = []
            replaces: list[tuple[Item, int]] = []
            reports: list[Report] = []
            written.clear()
            for c in completions:
                try:
                    item = domain.check_holder(held.pop(c.token, None), c.token)
                    version = item.version
                    report = domain.complete(
                        item, c.outcome, c.exit_code, c.output_tail, c.error, now, self.policy
                    )
                    if c.output_bytes is not None:
                        report = replace(
                            report, output_bytes=c.output_bytes, execution_id=c.execution_id
                        )
                    check_transition(item)
                    if isolate:
                        with tx.savepoint():
                            mine: list[tuple[Item, int]] = []
                            my_replaces: list[tuple[Item, int]] = []
                            my_reports = [report]
                            done = self._ended(
                                tx, item, version, now, mine, my_replaces, my_reports
                            )
                            tx.save_many(mine)
                            tx.replace_many(my_replaces)
                            tx.report_many(my_reports)
                except (BlixardError, DBAPIError) as exc:
                    refused = exc if isinstance(exc, BlixardError) else refused_item(exc)
                    if refused is None or isinstance(refused, Aborted):
                        raise
                    results.append(refused)
                    continue
                if not isolate:
                    reports.append(report)
                    done = self._ended(tx, item, version, now, changes, replaces, reports)
                results.append(item)
                written.append(done)
            if not isolate:
                tx.save_many(changes)
                tx.replace_many(replaces)
                tx.report_many(reports)
            return results

        written: list[Item] = []  # what the cache takes once this commits

        def run(isolate: bool) -> list[Item | BlixardError]:
            return self._write(lambda tx: work(tx, isolate), lambda _: written, [])

        try:
            results = run(isolate=False)
        except DBAPIError as exc:
            if refused_item(exc) is None:
                raise
            results = run(isolate=True)
        done = [c.token for c, r in zip(completions, results, strict=True) if isinstance(r, Item)]
        self._leases.forget(done)
        self._announce(written)  # retries due at once, next generations
        return results

    def release(self, token: str, reason: str) -> Item:
        def work(tx: Transaction) -> Item:
            now = self.clock.now()
            item = domain.check_holder(tx.by_tokens([token]).get(token), token)
            version = item.version
            tx.report(domain.release(item, reason, now))
            return self._save_ended(tx, item, version, now)

        item = self._write(work, lambda item: [item], [])
        self._leases.forget([token])
        self._announce([item])
        return item

    def _save_ended(self, tx: Transaction, item: Item, version: int, now: datetime) -> Item:
        """Write an item whose lease has just ended, or the next generation held for it
        in its place; returns what was written."""
        successor = self._successor(tx, item, now)
        if successor is None:
            tx.save(item, version)
            return item
        tx.replace_many([(successor, version)])
        if successor.state is ItemState.WAITING:
            tx.report(domain.enqueued(successor, now))
        return successor

    def _give_back(self, leases: list[Lease], reason: str) -> None:
        for lease in leases:
            try:
                self.release(lease.token, reason)
            except Exception:  # the store is down or the item moved on: the lease expires
                log.warning("could not give back %s; its lease will expire", lease.item.job_id)

    # ---- operators and the jobs service -----------------------------------------------

    def cancel(self, job_id: str, generation: int) -> Item:
        """Cancel the item's ``generation`` (0: whichever it is at). A generation this
        queue has not been sent yet is cancelled all the same: its enqueue, when it comes
        (perhaps late, through another jobs replica), finds it cancelled and it never runs.
        A cancel of an older generation changes nothing."""
        announce: list[Item] = []

        def work(tx: Transaction) -> Item:
            now = self.clock.now()
            announce.clear()
            item = tx.get(job_id, for_update=True)
            if item is None:
                if not generation:
                    raise NotFound("item", job_id)
                tomb = self._item_of(
                    domain.tombstone(job_id, generation, now).new,
                    now,
                    self._next_seqs(1),
                    ItemState.CANCELLED,
                )
                if job_id not in tx.insert_new([tomb]):  # another replica enqueued it meanwhile
                    raise Aborted(
                        f"item {job_id} was inserted concurrently",
                        reason="CONFLICT",
                        metadata={"job_id": job_id},
                    )
                return tomb
            if generation and item.generation > generation:
                return item  # a cancel of an older generation: nothing to do here
            if generation and item.generation < generation:
                return self._cancel_ahead(tx, item, generation, now)
            version = item.version
            report = domain.cancel(item, now)
            tx.save(item, version)
            if report is not None:
                tx.report(report)
            return item

        return self._write(work, lambda item: [item], [job_id])

    def _cancel_ahead(self, tx: Transaction, item: Item, generation: int, now: datetime) -> Item:
        """Cancel ``generation``, newer than the item's: a leased item's worker is asked to
        stop and the generation is held cancelled until that lease ends; any other item
        is replaced by the cancelled generation (nothing of the older one may run)."""
        if item.state is ItemState.LEASED:
            held = tx.next_generation(item.job_id)
            if held is None or held.new.generation < generation:
                tx.put_next(domain.tombstone(item.job_id, generation, now))
            elif held.new.generation == generation and not held.cancelled:
                tx.put_next(NextGeneration(held.new, True, held.created_at))
            self._stop_asked(tx, item, now)
            return item
        tomb = self._item_of(
            domain.tombstone(item.job_id, generation, now).new,
            now,
            self._next_seqs(1),
            ItemState.CANCELLED,
        )
        tx.replace_many([(tomb, item.version)])
        return tomb

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
            parked_messages=self.store.outbox.parked_count(),
            outbox_pending=self.store.outbox.pending(),
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
        clock stepped forward must not end every lease at once; see timers.py). Workers
        offline for longer than ``worker_retention`` are deleted, ``batch`` at a time."""

        ended: list[str] = []  # the tokens of the leases ended
        purged = [0]  # workers gone for good, deleted

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
            cutoff = now - timedelta(seconds=self.worker_timeout)
            silent = [
                worker.worker_id
                for worker in tx.silent_workers(cutoff, lock=False)
                if self._workers.ran_out(worker.worker_id, worker.last_seen, self.worker_timeout)
            ]
            # One lock order for every transaction, as a heartbeat takes them: the items
            # (in job_id order), then the workers (in worker_id order), then checked again.
            held = tx.lock_leases(ran_out, silent)
            offline = {w.worker_id: w for w in tx.silent_workers(cutoff, among=silent)}
            expiring = set(ran_out)
            for item in held:
                token = item.lease_token or ""
                if item.worker_id in offline:
                    why = f"worker {item.worker_id} went offline"
                elif (
                    token in expiring
                    and item.lease_deadline is not None
                    and item.lease_deadline < now
                    and self._leases.ran_out(token, item.lease_deadline, item.lease_seconds)
                ):
                    why = f"the lease of attempt {item.attempt} expired"
                else:
                    continue
                ended.append(token)
                version = item.version
                tx.report(domain.expire(item, now, self.policy, why))
                reaped.append(self._save_ended(tx, item, version, now))
            for worker in offline.values():
                self._seen_workers.pop(worker.worker_id, None)
                worker.state = WorkerState.OFFLINE
                tx.put_worker(worker)
            if self.worker_retention > 0:
                gone = now - timedelta(seconds=self.worker_retention)
                purged[0] = tx.purge_workers(gone, batch)
            return reaped

        reaped = self._write(work, lambda items: items, [])
        if purged[0]:
            log.info("purged %d workers offline for over %gs", purged[0], self.worker_retention)
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
