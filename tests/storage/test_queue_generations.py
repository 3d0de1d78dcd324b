"""Cancels and generations at the queue, on real stores: a cancel that comes before its
enqueue still wins, a new generation never runs beside a still-leased old one, and
workers gone for good are purged."""

from __future__ import annotations

import pytest

from services.common.errors import FailedPrecondition
from services.queue.domain import ItemState, Outcome
from services.queue.manager import QueueManager
from tests.postgres import Cluster
from tests.storage.queue_support import SteppedClock, make_manager, new


@pytest.fixture
def manager(database_url: str) -> QueueManager:
    return make_manager(database_url)


def claimed(manager: QueueManager, worker_id: str = "w-2") -> list[str]:
    return [lease.item.job_id for lease in manager.claim(worker_id, "process", {}, 10, 30)]


# ---- a cancel that reaches the queue before its enqueue ----------------------------------


def test_a_cancel_before_the_enqueue_leaves_the_generation_cancelled(
    manager: QueueManager,
) -> None:
    cancelled = manager.cancel("j-1", 1)  # the enqueue is late (another jobs replica's relay)
    assert cancelled.state is ItemState.CANCELLED

    item, created = manager.enqueue(new("j-1"))

    assert not created and item.state is ItemState.CANCELLED
    assert claimed(manager) == []
    assert manager.get("j-1").state is ItemState.CANCELLED
    # A later generation (RetryJob) is enqueued and runs as usual.
    _, created = manager.enqueue(new("j-1", generation=2))
    assert created and claimed(manager) == ["j-1"]


def test_an_operators_cancel_of_an_unknown_item_is_still_not_found(manager: QueueManager) -> None:
    from services.common.errors import NotFound

    with pytest.raises(NotFound):
        manager.cancel("nobody", 0)  # no generation named: nothing to stand for


def test_a_cancel_of_a_generation_not_yet_enqueued_replaces_the_ended_old_one(
    manager: QueueManager,
) -> None:
    manager.enqueue(new("j-1"))
    [lease] = manager.claim("w-1", "process", {}, 1, 30)
    manager.complete(lease.token, Outcome.FAILED, 1, b"", "boom")  # attempts left: waits
    manager.cancel("j-1", 1)
    manager.cancel("j-1", 2)  # generation 2's cancel overtook its enqueue

    item, created = manager.enqueue(new("j-1", generation=2))

    assert not created and (item.generation, item.state) == (2, ItemState.CANCELLED)
    assert claimed(manager) == []


def test_a_cancel_of_an_older_generation_changes_nothing(manager: QueueManager) -> None:
    manager.enqueue(new("j-1", generation=2))
    item = manager.cancel("j-1", 1)
    assert (item.generation, item.state) == (2, ItemState.WAITING)
    assert claimed(manager) == ["j-1"]


# ---- a new generation while the old one still holds a lease ------------------------------


def test_a_new_generation_waits_for_the_old_lease_to_be_completed(
    manager: QueueManager,
) -> None:
    manager.enqueue(new("j-1"))
    [old] = manager.claim("w-1", "process", {}, 1, 30)
    manager.cancel("j-1", 1)  # the worker learns at its next heartbeat

    item, created = manager.enqueue(new("j-1", generation=2))  # RetryJob

    assert created and item.generation == 2
    assert claimed(manager) == []  # generation 1 still runs on w-1
    assert manager.get("j-1").generation == 1
    assert manager.heartbeat(old.token, None).cancel_requested
    manager.enqueue(new("j-1", generation=2))  # a redelivery holds nothing twice

    manager.complete(old.token, Outcome.CANCELLED, None, b"", "killed")

    [lease] = manager.claim("w-2", "process", {}, 10, 30)
    assert (lease.item.job_id, lease.item.generation) == ("j-1", 2)
    assert lease.item.attempt == 1
    with pytest.raises(FailedPrecondition):  # the old lease is over
        manager.heartbeat(old.token, None)
    # The jobs service heard of both: generation 1 cancelled, then generation 2 queued.
    reports = [
        (m.payload["generation"], m.payload["job_state"])
        for m in manager.store.outbox.due(manager.clock.now(), 100)
    ]
    assert reports[-3:] == [(1, "CANCELLED"), (2, "QUEUED"), (2, "RUNNING")]


def test_a_new_generation_waits_for_the_old_lease_to_expire(database_url: str) -> None:
    clock = SteppedClock()
    manager = make_manager(database_url, clock, worker_timeout=3600)
    other = make_manager(database_url, clock, worker_timeout=3600)  # a second replica
    manager.enqueue(new("j-1"))
    manager.claim("w-1", "process", {}, 1, 10)
    manager.cancel("j-1", 1)
    manager.enqueue(new("j-1", generation=2))
    assert claimed(manager) == [] and claimed(other) == []

    clock.advance(11)  # w-1 died: its lease runs out
    assert manager.reap() == 1

    assert claimed(other) == ["j-1"]
    assert other.get("j-1").generation == 2


def test_a_new_generation_waits_for_the_old_lease_to_be_released(manager: QueueManager) -> None:
    manager.enqueue(new("j-1"))
    [old] = manager.claim("w-1", "process", {}, 1, 30)
    manager.cancel("j-1", 1)
    manager.enqueue(new("j-1", generation=2))
    assert claimed(manager) == []

    manager.release(old.token, "draining")

    assert claimed(manager) == ["j-1"]


def test_a_held_generation_cancelled_before_the_old_lease_ends_never_runs(
    manager: QueueManager,
) -> None:
    manager.enqueue(new("j-1"))
    [old] = manager.claim("w-1", "process", {}, 1, 30)
    manager.cancel("j-1", 1)
    manager.enqueue(new("j-1", generation=2))
    manager.cancel("j-1", 2)  # cancelled again before generation 1 stopped

    manager.complete(old.token, Outcome.CANCELLED, None, b"", "")

    assert claimed(manager) == []
    item = manager.get("j-1")
    assert (item.generation, item.state) == (2, ItemState.CANCELLED)
    again, created = manager.enqueue(new("j-1", generation=2))  # a late redelivery
    assert not created and again.state is ItemState.CANCELLED


def test_a_retry_of_a_job_still_leased_asks_the_old_execution_to_stop(
    manager: QueueManager,
) -> None:
    manager.enqueue(new("j-1"))
    [old] = manager.claim("w-1", "process", {}, 1, 30)

    manager.enqueue(new("j-1", generation=2))  # never cancelled in the queue

    assert manager.heartbeat(old.token, None).cancel_requested
    assert claimed(manager) == []
    manager.complete(old.token, Outcome.SUCCEEDED, 0, b"", "")
    assert claimed(manager) == ["j-1"]


# ---- workers gone for good ---------------------------------------------------------------


def test_workers_offline_past_the_retention_are_purged(database_url: str) -> None:
    clock = SteppedClock()
    manager = make_manager(database_url, clock, worker_timeout=30)
    manager.worker_retention = 3600.0
    for worker_id in ("gone-1", "gone-2", "gone-3"):
        manager.register_worker(worker_id, "process", {}, 1)
    clock.advance(31)
    manager.reap()  # all three silent: offline
    assert {w.state.name for w in manager.workers()} == {"OFFLINE"}
    clock.advance(3000)
    manager.register_worker("recent", "process", {}, 1)
    clock.advance(31)
    manager.reap()  # "recent" goes offline, long after the others
    clock.advance(600)  # the first three: last heard of over an hour ago; "recent": not
    manager.register_worker("live", "process", {}, 1)

    manager.reap(batch=2)  # small batches
    manager.reap(batch=2)

    assert sorted((w.worker_id, w.state.name) for w in manager.workers()) == [
        ("live", "ONLINE"),
        ("recent", "OFFLINE"),
    ]


def test_a_retention_of_zero_keeps_offline_workers(database_url: str) -> None:
    clock = SteppedClock()
    manager = make_manager(database_url, clock, worker_timeout=30)
    manager.worker_retention = 0.0
    manager.register_worker("gone", "process", {}, 1)
    clock.advance(31)
    manager.reap()
    clock.advance(10 * 365 * 86400)
    manager.reap()
    assert [(w.worker_id, w.state.name) for w in manager.workers()] == [("gone", "OFFLINE")]


def test_a_cancel_racing_the_enqueue_on_another_replica_still_wins(
    postgres_cluster: Cluster,
) -> None:
    url = postgres_cluster.new_database()
    other = make_manager(url)
    raced: list[bool] = []

    def enqueue_meanwhile(point: str) -> None:
        # The cancel found no item; before it writes its cancelled generation, the other
        # replica commits the enqueue.
        if point == "before_write" and not raced:
            raced.append(True)
            other.enqueue(new("j-1"))

    manager = make_manager(url, faults=enqueue_meanwhile)

    item = manager.cancel("j-1", 1)

    assert raced and item.state is ItemState.CANCELLED
    assert claimed(other) == [] and claimed(manager) == []
