"""The queue's invariants, checked on the real store with failures injected at every
step: no ghost items (the cache's committed view equals the store), a failed step changes
nothing observable, never two live leases on one item, at most one successful completion
per (item, generation); and with concurrent claimers and two replicas."""

from __future__ import annotations

import tempfile
import threading
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sqlalchemy import text

from services.common.errors import BlixardError
from services.queue.domain import ItemState, Outcome
from services.queue.manager import Completion, QueueManager
from tests.storage.queue_support import SteppedClock, make_manager, new

# Before the database commits (the step must change nothing), and after it committed
# (the step's change stands, yet its caller sees an error: the cache must not lie).
FAULT_POINTS = ("before_write", "after_write", "commit", "after_commit")
# Half the steps fail at one of them; the others succeed, so the queue gets somewhere.
FAULTS = st.sampled_from((None,) * len(FAULT_POINTS) + FAULT_POINTS)


class InjectedFault(Exception):
    pass


class Faults:
    """Fails the store once at the armed point."""

    def __init__(self) -> None:
        self.armed: str | None = None

    def __call__(self, point: str) -> None:
        if self.armed == point:
            self.armed = None
            raise InjectedFault(point)


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
    """Random operations, some with a store failure injected; the invariants after each."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.clock = SteppedClock()
        self.faults = Faults()
        self.manager = make_manager(
            f"sqlite:///{Path(self.dir.name)}/q.sqlite3", self.clock, self.faults
        )
        self.enqueued = 0
        self.tokens: dict[str, str] = {}  # token -> job id, every token ever handed out
        self.successes: Counter[tuple[str, int]] = Counter()

    def teardown(self) -> None:
        self.manager.store.engine.dispose()
        self.dir.cleanup()

    def _attempt(self, operation, fault: str | None):  # type: ignore[no-untyped-def]
        """Run one operation, with a failure at ``fault``; a failed step must change
        nothing observable: neither the store nor the cache's committed view."""
        before_store = store_snapshot(self.manager)
        before_reports = reports(self.manager)
        before_view = self.manager.cache.view()
        self.faults.armed = fault
        try:
            result = operation()
        except InjectedFault as failed:
            if failed.args[0] != "after_commit":  # else it committed: the invariants judge
                assert store_snapshot(self.manager) == before_store
                assert reports(self.manager) == before_reports
                assert self.manager.cache.view() == before_view
            return None
        except BlixardError:
            assert store_snapshot(self.manager) == before_store
            assert reports(self.manager) == before_reports
            assert self.manager.cache.view() == before_view
            return None
        finally:
            self.faults.armed = None
        return result

    @rule(priority=st.integers(-2, 2), fault=FAULTS)
    def enqueue(self, priority: int, fault: str | None) -> None:
        job_id = f"j-{self.enqueued}"
        if self._attempt(lambda: self.manager.enqueue(new(job_id, priority)), fault):
            self.enqueued += 1

    @precondition(lambda self: self.enqueued > 0)
    @rule(data=st.data(), fault=FAULTS)
    def enqueue_again(self, data: st.DataObject, fault: str | None) -> None:
        job_id = f"j-{data.draw(st.integers(0, self.enqueued - 1))}"
        item = self.manager.store.get(job_id)
        assert item is not None
        bump = data.draw(st.sampled_from((0, 1)))  # the same generation, or a RetryJob
        again = new(job_id, generation=item.generation + bump)
        self._attempt(lambda: self.manager.enqueue(again), fault)

    @rule(max_items=st.integers(1, 4), fault=FAULTS)
    def claim(self, max_items: int, fault: str | None) -> None:
        leases = self._attempt(
            lambda: self.manager.claim("w", "process", {}, max_items, 30.0), fault
        )
        for lease in leases or []:
            assert lease.token not in self.tokens
            self.tokens[lease.token] = lease.item.job_id

    @precondition(lambda self: self.tokens)
    @rule(
        data=st.data(),
        outcome=st.sampled_from(list(Outcome)),
        fault=FAULTS,
    )
    def complete(self, data: st.DataObject, outcome: Outcome, fault: str | None) -> None:
        token = data.draw(st.sampled_from(list(self.tokens)))
        item = self._attempt(lambda: self.manager.complete(token, outcome, 0, b"", ""), fault)
        if item is not None and outcome is Outcome.SUCCEEDED:
            self.successes[(item.job_id, item.generation)] += 1

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), fault=FAULTS)
    def heartbeat(self, data: st.DataObject, fault: str | None) -> None:
        token = data.draw(st.sampled_from(list(self.tokens)))
        self._attempt(lambda: self.manager.heartbeat(token, None), fault)

    @precondition(lambda self: self.enqueued > 0)
    @rule(data=st.data(), fault=FAULTS)
    def cancel(self, data: st.DataObject, fault: str | None) -> None:
        job_id = f"j-{data.draw(st.integers(0, self.enqueued - 1))}"
        self._attempt(lambda: self.manager.cancel(job_id, 0), fault)

    # Tokens are random: rules pick them in an order that is not (by job id, by when they
    # were handed out), or hypothesis could not replay a run.
    def _live_tokens(self) -> list[str]:
        snapshot = sorted(store_snapshot(self.manager).items())
        return [token for _, (_, _, token, _) in snapshot if token]

    def _in_state(self, state: str) -> list[str]:
        return sorted(j for j, (s, _, _, _) in store_snapshot(self.manager).items() if s == state)

    # The rules above draw from every token ever handed out (mostly stale ones, refused);
    # these draw from live leases and dead letters, so those paths run often too.
    @precondition(lambda self: self._live_tokens())
    @rule(
        data=st.data(),
        outcome=st.sampled_from(list(Outcome)),
        fault=FAULTS,
    )
    def complete_live(self, data: st.DataObject, outcome: Outcome, fault: str | None) -> None:
        token = data.draw(st.sampled_from(self._live_tokens()))
        item = self._attempt(lambda: self.manager.complete(token, outcome, 1, b"", ""), fault)
        if item is not None and outcome is Outcome.SUCCEEDED:
            self.successes[(item.job_id, item.generation)] += 1

    @precondition(lambda self: self._live_tokens())
    @rule(data=st.data(), fault=FAULTS)
    def release(self, data: st.DataObject, fault: str | None) -> None:
        token = data.draw(st.sampled_from(self._live_tokens()))
        self._attempt(lambda: self.manager.release(token, "given back"), fault)

    @precondition(lambda self: self._in_state("DEAD_LETTERED"))
    @rule(data=st.data(), fault=FAULTS)
    def redrive(self, data: st.DataObject, fault: str | None) -> None:
        job_id = data.draw(st.sampled_from(self._in_state("DEAD_LETTERED")))
        self._attempt(lambda: self.manager.redrive(job_id), fault)

    @rule(fault=FAULTS)
    def expire(self, fault: str | None) -> None:
        self.clock.advance(31.0)  # every lease handed out here so far runs out
        self._attempt(self.manager.reap, fault)

    @invariant()
    def no_ghosts(self) -> None:
        store = live_view_of_store(self.manager)
        assert self.manager.cache.view() == store
        assert self.manager.cache.staged_count() == 0
        # and every waiting item can be claimed: none lost from the index
        waiting = {job_id for job_id, (state, _) in store.items() if state is ItemState.WAITING}
        assert self.manager.cache.claimable() == waiting

    @invariant()
    def one_live_lease_per_item(self) -> None:
        snapshot = store_snapshot(self.manager)
        for _job_id, (state, _, token, _) in snapshot.items():
            assert (state == "LEASED") == (token is not None)
        live = [s[2] for s in snapshot.values() if s[2] is not None]
        assert len(live) == len(set(live))
        # only the newest token of an item is honoured: every older one is refused
        for token, job_id in self.tokens.items():
            if snapshot[job_id][2] != token:
                with pytest.raises(BlixardError):
                    self.manager.heartbeat(token, None)

    @invariant()
    def completes_at_most_once(self) -> None:
        assert all(count == 1 for count in self.successes.values())


QueueMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_queue_invariants_under_injected_failures = QueueMachine.TestCase


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
