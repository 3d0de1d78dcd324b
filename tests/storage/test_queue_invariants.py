"""The queue's invariants, checked on the real store with failures injected at every
step: no ghost items (each replica's committed view equals the store), a failed step
changes nothing observable, never two live leases on one item, at most one successful
completion per (item, generation); with delayed items, reconciles, two replicas on one
database, and failures in the middle of a batch; and with concurrent claimers."""

from __future__ import annotations

import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import event, text

from services.common.errors import BlixardError
from services.queue.domain import ItemState, Outcome
from services.queue.manager import Completion, QueueManager, _ClaimArgs
from tests.postgres import Cluster
from tests.storage.queue_support import ManualClock, make_manager, new

# Before the database commits (the step must change nothing), and after it committed
# (the step's change stands, yet its caller sees an error: the cache must not lie).
FAULT_POINTS = ("before_write", "after_write", "commit", "after_commit")
# In the middle of a batch: the step's n-th write statement fails after those before it
# ran (a batch's items written, its reports not yet; a batch's new items inserted, its
# new generations not yet written).
MID_BATCH = ("write-2", "write-3")
# Half the steps fail at one of them; the others succeed, so the queue gets somewhere.
FAULTS = st.sampled_from((None,) * (len(FAULT_POINTS) + len(MID_BATCH)) + FAULT_POINTS + MID_BATCH)
# Mostly the first replica, so that its cache is often the store's (and its claims can be
# held to taking every item that is due); the second one's changes make it stale.
REPLICA = st.sampled_from((0, 0, 1))
DELAYS = st.sampled_from((None, None, 5.0, 60.0))  # run_at now, or in the future
BACKOFF = 10.0  # a failed attempt waits 5-10 s for its retry
# The worker types an item accepts (none: any) and the labels it requires.
KINDS = st.sampled_from(
    (
        ((), {}),
        ((), {}),
        (("vm",), {}),
        (("process", "vm"), {}),
        ((), {"gpu": "yes"}),
        (("vm",), {"gpu": "yes"}),
    )
)
# The workers: (id, type, labels, named_only: takes only items that name its type).
WORKERS = (
    ("w-0", "process", {}, False),
    ("w-1", "vm", {"gpu": "yes"}, False),
    ("w-2", "vm", {}, True),
)
WORKER = st.sampled_from(range(len(WORKERS)))


class InjectedFault(Exception):
    pass


class Faults:
    """Fails the store once at the armed point: one of the store's fault points, or the
    step's n-th write statement ("write-n")."""

    def __init__(self) -> None:
        self.armed: str | None = None
        self.writes = 0

    def arm(self, point: str | None) -> None:
        self.armed = point
        self.writes = 0

    def __call__(self, point: str) -> None:
        if self.armed == point:
            self.armed = None
            raise InjectedFault(point)

    def statement(self, *args: Any) -> None:
        """SQLAlchemy's before_cursor_execute: counts the write statements."""
        sql: str = args[2]
        if sql.lstrip()[:6].upper() in ("INSERT", "UPDATE", "DELETE"):
            self.writes += 1
            self(f"write-{self.writes}")


def store_snapshot(manager: QueueManager) -> dict[str, tuple[str, int, str | None, int]]:
    with manager.store.engine.connect() as connection:
        rows = connection.execute(
            text("SELECT job_id, state, version, lease_token, attempt FROM items")
        ).all()
    return {r.job_id: (r.state, r.version, r.lease_token, r.attempt) for r in rows}


def reports(manager: QueueManager) -> list[tuple[object, ...]]:
    """The outbox: the reports a step owes the jobs service besides its item writes. (A
    claim's record that its worker was seen is its own transaction, made before.)"""
    with manager.store.engine.connect() as connection:
        rows = connection.execute(text("SELECT id, key, payload FROM outbox ORDER BY id"))
        return [tuple(r) for r in rows]


def live_view_of_store(manager: QueueManager) -> dict[str, tuple[ItemState, int]]:
    return {
        job_id: (ItemState(state), version)
        for job_id, (state, version, _, _) in store_snapshot(manager).items()
        if ItemState(state).live
    }


class QueueMachine(RuleBasedStateMachine):
    """Random operations through two replicas on one database, some with a store failure
    injected; the invariants after each.

    A replica's cache learns what the other replica did when it reconciles, or item by
    item when its claims meet conflicts. So each replica has its "dirty" items: those the
    other changed since, which its cache may still hold as they were. On every other item
    its committed view must equal the store exactly, and a dirty item is clean again once
    its view agrees with the store."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.url = self.database_url()
        self.clock = ManualClock()
        self.faults = Faults()
        self.replicas = [self._replica(migrate=True), self._replica()]
        self.dirty: list[set[str]] = [set(), set()]
        self.next_id = 0
        self.tokens: dict[str, str] = {}  # token -> job id, every token ever handed out
        self.successes: Counter[tuple[str, int]] = Counter()

    def database_url(self) -> str:
        return f"sqlite:///{Path(self.dir.name)}/q.sqlite3"

    def _replica(self, migrate: bool = False) -> QueueManager:
        manager = make_manager(self.url, self.clock, self.faults, backoff=BACKOFF, migrate=migrate)
        event.listen(manager.store.engine, "before_cursor_execute", self.faults.statement)
        return manager

    def teardown(self) -> None:
        for manager in self.replicas:
            manager.store.engine.dispose()
        self.dir.cleanup()

    def _attempt(self, r: int, operation: Callable[[], Any], fault: str | None) -> Any:
        """Run one operation through replica ``r``, with a failure at ``fault``; a failed
        step must change nothing observable: neither the store nor the replica's committed
        view (but for dirty items, which it may have read back from the store)."""
        manager = self.replicas[r]
        before_store = store_snapshot(manager)
        before_reports = reports(manager)
        before_view = manager.cache.view()
        self.faults.arm(fault)
        failed = False
        try:
            result = operation()
        except InjectedFault as fault_seen:
            failed = fault_seen.args[0] != "after_commit"  # else it committed: the
            result = None  # invariants judge
        except BlixardError:
            failed, result = True, None
        finally:
            self.faults.arm(None)
        after_store = store_snapshot(manager)
        if failed:
            assert after_store == before_store
            assert reports(manager) == before_reports
            store, view = live_view_of_store(manager), manager.cache.view()
            for job_id in set(before_view) | set(view):
                if job_id in self.dirty[r]:
                    assert view.get(job_id) in (before_view.get(job_id), store.get(job_id))
                else:
                    assert view.get(job_id) == before_view.get(job_id)
        # What this step changed, the other replica's cache does not know yet.
        changed = {
            job_id
            for job_id in set(before_store) | set(after_store)
            if before_store.get(job_id) != after_store.get(job_id)
        }
        self.dirty[1 - r] |= changed
        return result

    def _ids(self) -> list[str]:
        return sorted(store_snapshot(self.replicas[0]))

    # Tokens are random: rules pick them in an order that is not (by job id, by when they
    # were handed out), or hypothesis could not replay a run.
    def _live_tokens(self) -> list[str]:
        snapshot = sorted(store_snapshot(self.replicas[0]).items())
        return [token for _, (_, _, token, _) in snapshot if token]

    def _in_state(self, state: str) -> list[str]:
        snapshot = store_snapshot(self.replicas[0])
        return sorted(j for j, (s, _, _, _) in snapshot.items() if s == state)

    def _new_id(self) -> str:
        self.next_id += 1
        return f"j-{self.next_id:03d}"

    def _run_at(self, delay: float | None):  # type: ignore[no-untyped-def]
        return None if delay is None else self.clock.now() + timedelta(seconds=delay)

    def _leased(self, leases: list[Any] | None) -> None:
        for lease in leases or []:
            assert lease.token not in self.tokens
            self.tokens[lease.token] = lease.item.job_id

    def _succeeded(self, results: list[Any], outcomes: list[Outcome]) -> None:
        for result, outcome in zip(results, outcomes, strict=True):
            if not isinstance(result, BaseException) and outcome is Outcome.SUCCEEDED:
                self.successes[(result.job_id, result.generation)] += 1

    # ---- enqueue ----------------------------------------------------------------------

    @rule(r=REPLICA, priority=st.integers(-2, 2), kind=KINDS, delay=DELAYS, fault=FAULTS)
    def enqueue(
        self,
        r: int,
        priority: int,
        kind: tuple[tuple[str, ...], dict[str, str]],
        delay: float | None,
        fault: str | None,
    ) -> None:
        types, labels = kind
        item = new(self._new_id(), priority, types, run_at=self._run_at(delay), labels=labels)
        self._attempt(r, lambda: self.replicas[r].enqueue(item), fault)

    @precondition(lambda self: self._ids())
    @rule(r=REPLICA, data=st.data(), kind=KINDS, delay=DELAYS, fault=FAULTS)
    def enqueue_again(
        self,
        r: int,
        data: st.DataObject,
        kind: tuple[tuple[str, ...], dict[str, str]],
        delay: float | None,
        fault: str | None,
    ) -> None:
        """The same generation again (a no-op), or a new one (RetryJob), perhaps of
        another kind (its index entry moves)."""
        job_id = data.draw(st.sampled_from(self._ids()))
        item = self.replicas[r].store.get(job_id)
        assert item is not None
        bump = data.draw(st.sampled_from((0, 1)))
        types, labels = kind
        again = new(
            job_id,
            worker_types=types,
            generation=item.generation + bump,
            run_at=self._run_at(delay),
            labels=labels,
        )
        self._attempt(r, lambda: self.replicas[r].enqueue(again), fault)

    @rule(r=REPLICA, data=st.data(), fresh=st.integers(1, 3), delay=DELAYS, fault=FAULTS)
    def enqueue_batch(
        self, r: int, data: st.DataObject, fresh: int, delay: float | None, fault: str | None
    ) -> None:
        """New items and new generations of old ones in one batch (inserts, then
        replaces, then reports: a fault can fall between them)."""
        ids = self._ids()
        again = data.draw(st.lists(st.sampled_from(ids), max_size=2, unique=True)) if ids else []
        run_at = self._run_at(delay)
        batch = [new(self._new_id(), run_at=run_at) for _ in range(fresh)]
        for job_id in again:
            item = self.replicas[r].store.get(job_id)
            assert item is not None
            batch.append(new(job_id, generation=item.generation + 1, run_at=run_at))
        self._attempt(r, lambda: self.replicas[r].enqueue_many(batch), fault)

    # ---- claims -----------------------------------------------------------------------

    def _drained(self, worker_id: str) -> bool:
        return any(w.drained for w in self.replicas[0].store.workers() if w.worker_id == worker_id)

    @rule(r=REPLICA, w=WORKER, max_items=st.integers(1, 4), fault=FAULTS)
    def claim(self, r: int, w: int, max_items: int, fault: str | None) -> None:
        self._claim(r, w, max_items, fault)

    def _claim(self, r: int, w: int, max_items: int, fault: str | None) -> None:
        manager = self.replicas[r]
        worker_id, worker_type, labels, named_only = WORKERS[w]
        now = self.clock.now()
        due = len(manager.store.waiting(worker_type, now, 1000, named_only, carried=labels))
        drained = self._drained(worker_id)
        # What this replica last wrote of the worker: it trusts that for a while (a
        # drain made elsewhere it reads in the claim's transaction; a registration made
        # elsewhere that ended a drain, not before that while is over).
        remembered = manager._seen_workers.get(worker_id)
        stale = remembered is not None and remembered[1].drained != drained
        clean = not self.dirty[r]
        leases = self._attempt(
            r,
            lambda: manager.claim(
                worker_id, worker_type, labels, max_items, 30.0, named_only=named_only
            ),
            fault,
        )
        self._leased(leases)
        for lease in leases or []:  # only what this worker may take
            types = lease.item.worker_types
            assert worker_type in types or not (types or named_only)
            assert all(labels.get(k) == v for k, v in lease.item.labels.items())
        if fault is None and clean and not stale:
            # A replica whose cache is the store's misses no item that is due (a
            # delayed one whose time came, a retry after its backoff) and offers none
            # that is not; a drained worker gets nothing.
            assert leases is not None
            assert len(leases) == (0 if drained else min(max_items, due))

    @rule(
        r=REPLICA,
        claims=st.lists(st.tuples(WORKER, st.integers(1, 3)), min_size=2, max_size=3),
        fault=FAULTS,
    )
    def claim_together(self, r: int, claims: list[tuple[int, int]], fault: str | None) -> None:
        """Claims that share one store transaction (the group commit of claims), perhaps
        of a drained worker among them."""
        manager = self.replicas[r]
        claims = [
            _ClaimArgs(*WORKERS[w][:3], size, 30.0, WORKERS[w][3])  # type: ignore[misc]
            for w, size in claims
        ]
        results = self._attempt(r, lambda: manager._claim_batch(claims), fault)
        for leases, _ in results or []:
            self._leased(leases)

    # ---- the lease holder's calls -----------------------------------------------------

    @precondition(lambda self: self.tokens)
    @rule(r=REPLICA, data=st.data(), outcome=st.sampled_from(list(Outcome)), fault=FAULTS)
    def complete(self, r: int, data: st.DataObject, outcome: Outcome, fault: str | None) -> None:
        token = data.draw(st.sampled_from(list(self.tokens)))
        item = self._attempt(
            r, lambda: self.replicas[r].complete(token, outcome, 0, b"", ""), fault
        )
        if item is not None:
            self._succeeded([item], [outcome])

    # The rules above draw from every token ever handed out (mostly stale ones, refused);
    # these draw from live leases and dead letters, so those paths run often too.
    @precondition(lambda self: self._live_tokens())
    @rule(r=REPLICA, data=st.data(), outcome=st.sampled_from(list(Outcome)), fault=FAULTS)
    def complete_live(
        self, r: int, data: st.DataObject, outcome: Outcome, fault: str | None
    ) -> None:
        token = data.draw(st.sampled_from(self._live_tokens()))
        item = self._attempt(
            r, lambda: self.replicas[r].complete(token, outcome, 1, b"", ""), fault
        )
        if item is not None:
            self._succeeded([item], [outcome])

    @precondition(lambda self: self._live_tokens())
    @rule(r=REPLICA, data=st.data(), fault=FAULTS)
    def complete_together(self, r: int, data: st.DataObject, fault: str | None) -> None:
        """Batches of completions sharing one store transaction (the group commit), live
        and stale tokens mixed: each completion succeeds or fails on its own."""
        tokens = st.sampled_from(self._live_tokens() + list(self.tokens)[-3:])
        completion = st.builds(
            Completion, tokens, st.sampled_from(list(Outcome)), st.just(0), st.just(b"")
        )
        batches = data.draw(
            st.lists(st.lists(completion, min_size=1, max_size=3), min_size=1, max_size=2)
        )
        manager = self.replicas[r]
        results = self._attempt(r, lambda: manager._complete_batches(batches), fault)
        for batch, answers in zip(batches, results or [], strict=False):
            self._succeeded(answers, [c.outcome for c in batch])

    @precondition(lambda self: self.tokens)
    @rule(r=REPLICA, data=st.data(), fault=FAULTS)
    def heartbeat(self, r: int, data: st.DataObject, fault: str | None) -> None:
        token = data.draw(st.sampled_from(list(self.tokens)))
        self._attempt(r, lambda: self.replicas[r].heartbeat(token, None), fault)

    @precondition(lambda self: self._live_tokens())
    @rule(r=REPLICA, data=st.data(), fault=FAULTS)
    def release(self, r: int, data: st.DataObject, fault: str | None) -> None:
        token = data.draw(st.sampled_from(self._live_tokens()))
        self._attempt(r, lambda: self.replicas[r].release(token, "given back"), fault)

    # ---- operators, the jobs service, time and the reaper -----------------------------

    @precondition(lambda self: self._ids())
    @rule(r=REPLICA, data=st.data(), fault=FAULTS)
    def cancel(self, r: int, data: st.DataObject, fault: str | None) -> None:
        job_id = data.draw(st.sampled_from(self._ids()))
        self._attempt(r, lambda: self.replicas[r].cancel(job_id, 0), fault)

    @rule(r=REPLICA, w=WORKER, fault=FAULTS)
    def drain(self, r: int, w: int, fault: str | None) -> None:
        worker_id, worker_type, labels, _ = WORKERS[w]
        manager = self.replicas[r]
        if not any(x.worker_id == worker_id for x in manager.store.workers()):
            manager.register_worker(worker_id, worker_type, labels, 4)
        self._attempt(r, lambda: manager.drain_worker(worker_id), fault)

    @rule(r=REPLICA, w=WORKER, fault=FAULTS)
    def register(self, r: int, w: int, fault: str | None) -> None:
        """The worker (re)starts: registering ends a drain."""
        worker_id, worker_type, labels, _ = WORKERS[w]
        manager = self.replicas[r]
        self._attempt(r, lambda: manager.register_worker(worker_id, worker_type, labels, 4), fault)

    @precondition(lambda self: self._in_state("DEAD_LETTERED"))
    @rule(r=REPLICA, data=st.data(), fault=FAULTS)
    def redrive(self, r: int, data: st.DataObject, fault: str | None) -> None:
        job_id = data.draw(st.sampled_from(self._in_state("DEAD_LETTERED")))
        self._attempt(r, lambda: self.replicas[r].redrive(job_id), fault)

    @rule(seconds=st.sampled_from((1.0, 10.0)))
    def time_passes(self, seconds: float) -> None:
        """Delayed items and retries come due."""
        self.clock.advance(seconds)

    @rule(r=REPLICA, fault=FAULTS)
    def expire(self, r: int, fault: str | None) -> None:
        self.clock.advance(31.0)  # every lease handed out here so far runs out
        self._attempt(r, self.replicas[r].reap, fault)

    @rule(r=REPLICA, then=st.none() | st.tuples(WORKER, st.integers(1, 4)))
    def reconcile(self, r: int, then: tuple[int, int] | None) -> None:
        """The replica reconciles (its cache is the store's after), and perhaps claims
        at once (it takes every item due, up to what it asked for)."""
        manager = self.replicas[r]
        manager.reconcile()
        store = live_view_of_store(manager)
        assert manager.cache.view() == store
        waiting = {job_id for job_id, (state, _) in store.items() if state is ItemState.WAITING}
        assert manager.cache.claimable() == waiting
        self.dirty[r].clear()
        if then is not None:
            self._claim(r, *then, fault=None)

    @rule(r=REPLICA)
    def restart(self, r: int) -> None:
        """A replica restarts: its cache is loaded from the store."""
        self.replicas[r].store.engine.dispose()
        self.replicas[r] = self._replica()
        self.dirty[r].clear()

    # ---- the invariants ---------------------------------------------------------------

    @invariant()
    def no_ghosts(self) -> None:
        store = live_view_of_store(self.replicas[0])
        waiting = {job_id for job_id, (state, _) in store.items() if state is ItemState.WAITING}
        for r, manager in enumerate(self.replicas):
            view = manager.cache.view()
            self.dirty[r] = {j for j in self.dirty[r] if view.get(j) != store.get(j)}
            clean = (set(view) | set(store)) - self.dirty[r]
            assert {j: view[j] for j in clean & set(view)} == {
                j: store[j] for j in clean & set(store)
            }
            assert manager.cache.staged_count() == 0
            # every waiting item can be claimed: none lost from the index
            assert manager.cache.claimable() - self.dirty[r] == waiting - self.dirty[r]
            # and the delayed heap stays proportional to the live items
            assert manager.cache.delayed_size() <= 2 * len(view) + 64

    @invariant()
    def one_live_lease_per_item(self) -> None:
        snapshot = store_snapshot(self.replicas[0])
        for _job_id, (state, _, token, _) in snapshot.items():
            assert (state == "LEASED") == (token is not None)
        live = [s[2] for s in snapshot.values() if s[2] is not None]
        assert len(live) == len(set(live))
        # only the newest token of an item is honoured: every older one is refused
        for token, job_id in self.tokens.items():
            if snapshot[job_id][2] != token:  # (the store judges, for either replica)
                with pytest.raises(BlixardError):
                    self.replicas[0].heartbeat(token, None)

    @invariant()
    def completes_at_most_once(self) -> None:
        assert all(count == 1 for count in self.successes.values())


MACHINE_SETTINGS = settings(
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
QueueMachine.TestCase.settings = MACHINE_SETTINGS
test_queue_invariants_under_injected_failures = QueueMachine.TestCase


def test_queue_invariants_under_injected_failures_on_postgres(
    postgres_cluster: Cluster,
) -> None:
    """The same machine, both replicas on one PostgreSQL database (one per run)."""

    class OnPostgres(QueueMachine):
        def database_url(self) -> str:
            return postgres_cluster.new_database()

    run_state_machine_as_test(OnPostgres, settings=settings(MACHINE_SETTINGS, max_examples=20))


def test_sixteen_claimers_take_ten_thousand_items_exactly_once(tmp_path: Path) -> None:
    manager = make_manager(f"sqlite:///{tmp_path}/q.sqlite3")
    for start in range(0, 10_000, 1000):
        manager.enqueue_many([new(f"j-{i:05d}", i % 3) for i in range(start, start + 1000)])
    claimed: Counter[str] = Counter()
    lock = threading.Lock()

    def claimer(n: int) -> None:
        while True:
            leases = manager.claim(f"w-{n}", "process", {}, 16, 60)
            if not leases:
                return
            with lock:
                claimed.update(lease.item.job_id for lease in leases)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claimed) == 10_000
    assert set(claimed.values()) == {1}
    assert manager.store.counts() == {"LEASED": 10_000}
    assert manager.cache.view() == live_view_of_store(manager)


def test_two_replicas_on_postgres_eight_workers_twenty_thousand_items(
    postgres_cluster,  # type: ignore[no-untyped-def]
) -> None:
    url = postgres_cluster.new_database()
    replicas = [make_manager(url), make_manager(url)]
    for start in range(0, 20_000, 2000):
        replica = replicas[(start // 2000) % 2]
        replica.enqueue_many([new(f"j-{i:05d}") for i in range(start, start + 2000)])
    leased: Counter[str] = Counter()
    completed: Counter[str] = Counter()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        replica = replicas[n % 2]
        try:
            while True:
                leases = replica.claim(f"w-{n}", "process", {}, 32, 60)
                if not leases:
                    return
                results = replica.complete_many(
                    [Completion(lease.token, Outcome.SUCCEEDED, 0) for lease in leases]
                )
                with lock:
                    leased.update(lease.item.job_id for lease in leases)
                    completed.update(r.job_id for r in results if not isinstance(r, Exception))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    assert len(leased) == 20_000 and set(leased.values()) == {1}, "a duplicate lease"
    assert len(completed) == 20_000 and set(completed.values()) == {1}
    assert replicas[0].store.counts() == {"SUCCEEDED": 20_000}
    # What one replica did reaches the other's cache by reconciliation.
    for replica in replicas:
        replica.reconcile()
        assert replica.cache.view() == live_view_of_store(replica) == {}
