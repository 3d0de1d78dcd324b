"""The queue's batches on real databases: every item of an enqueue batch, a completion
batch or a group commit succeeds or fails on its own; duplicate and overlapping batches
from two replicas never fail or deadlock; the reaper and heartbeats never deadlock."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.queue.domain import ItemState, Outcome
from services.queue.manager import Completion, QueueManager
from tests.storage.queue_support import make_manager, new


@pytest.fixture
def manager(database_url: str) -> QueueManager:
    return make_manager(database_url)


def refuse_on_postgres(manager: QueueManager, event: str, condition: str) -> None:
    """A trigger that makes PostgreSQL refuse one item's write, as a constraint or a byte
    it cannot store would: a refusal no check in Python foresees."""
    with manager.store.engine.begin() as connection:
        connection.execute(
            text(
                "CREATE FUNCTION refuse_poison() RETURNS trigger AS $$ BEGIN "
                f"IF {condition} THEN RAISE EXCEPTION 'poison refused' "
                "USING ERRCODE = '22023'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
            )
        )
        connection.execute(
            text(
                f"CREATE TRIGGER refuse_poison BEFORE {event} ON items "
                "FOR EACH ROW EXECUTE FUNCTION refuse_poison()"
            )
        )


def deadlocks(*managers: QueueManager) -> int:
    """How many deadlocks PostgreSQL detected in the managers' database (a retried one
    included): their connections are closed first, so each reports its statistics."""
    for manager in managers:
        manager.store.engine.dispose()
    engine = managers[0].store.engine
    time.sleep(0.5)
    with engine.connect() as connection:
        return int(
            connection.scalar(
                text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
            )
        )


def statuses(manager: QueueManager) -> list[tuple[str, str]]:
    """(job id, state) of every status report waiting in the outbox."""
    due = manager.store.outbox.due(datetime.now(UTC) + timedelta(days=1), 1000)
    return sorted((m.key, m.payload["job_state"]) for m in due)


@pytest.mark.parametrize(
    "poison",
    [{"generation": 2**31}, {"worker_types": tuple(f"type-{n}" for n in range(100))}],
    ids=["generation-out-of-range", "worker-types-too-long"],
)
def test_one_bad_enqueue_fails_alone(manager: QueueManager, poison: dict[str, object]) -> None:
    results = manager.enqueue_many([new("a"), replace(new("bad"), **poison), new("c")])  # type: ignore[arg-type]
    assert isinstance(results[1], InvalidArgument)
    assert next(iter(poison)) in results[1].message
    for result in (results[0], results[2]):
        assert isinstance(result, tuple) and result[1] is True
    assert manager.get("a").state is ItemState.WAITING
    with pytest.raises(NotFound):
        manager.get("bad")
    assert statuses(manager) == [("a", "QUEUED"), ("c", "QUEUED")]
    assert {lease.item.job_id for lease in manager.claim("w", "process", {}, 10, 30)} == {
        "a",
        "c",
    }
    # Each report of an item follows the one before it (the jobs service drops a late one).
    due = manager.store.outbox.due(datetime.now(UTC) + timedelta(days=1), 1000)
    assert [(m.payload["job_state"], m.payload["sequence"]) for m in due if m.key == "a"] == [
        ("QUEUED", 1),
        ("RUNNING", 2),
    ]


def test_an_enqueue_the_database_refuses_fails_alone(postgres_cluster) -> None:  # type: ignore[no-untyped-def]
    manager = make_manager(postgres_cluster.new_database())
    refuse_on_postgres(manager, "INSERT", "NEW.job_id = 'poison'")
    results = manager.enqueue_many([new("a"), new("poison"), new("c")])
    assert isinstance(results[1], InvalidArgument) and "poison refused" in results[1].message
    assert [r[1] for r in (results[0], results[2]) if isinstance(r, tuple)] == [True, True]
    assert statuses(manager) == [("a", "QUEUED"), ("c", "QUEUED")]
    assert manager.reconcile() == 0  # the cache holds what the store holds
    assert sorted(lease.item.job_id for lease in manager.claim("w", "process", {}, 10, 30)) == [
        "a",
        "c",
    ]


def test_two_replicas_enqueue_the_same_batch_at_once(postgres_cluster) -> None:  # type: ignore[no-untyped-def]
    """Two relays deliver one outbox page to two queue replicas at the same time, one in
    the reverse order: both answer success, each item exists once, enqueued once."""
    url = postgres_cluster.new_database()
    a, b = make_manager(url), make_manager(url)
    barrier = threading.Barrier(2)
    answers: dict[str, list[object]] = {}
    errors: list[BaseException] = []

    def send(name: str, replica: QueueManager, order: list[str]) -> None:
        barrier.wait()
        try:
            answers[name] = list(replica.enqueue_many([new(job_id) for job_id in order]))
        except BaseException as exc:
            errors.append(exc)

    for round_ in range(4):
        ids = [f"r{round_}-{n:03d}" for n in range(60)]
        threads = [
            threading.Thread(target=send, args=("a", a, ids)),
            threading.Thread(target=send, args=("b", b, list(reversed(ids)))),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        created = [
            r[0].job_id for side in answers.values() for r in side if isinstance(r, tuple) and r[1]
        ]
        assert all(isinstance(r, tuple) for side in answers.values() for r in side)
        assert sorted(created) == ids  # each item created once, by one of the two
    queued = [key for key, state in statuses(a) if state == "QUEUED"]
    assert len(queued) == len(set(queued)) == 240
    assert deadlocks(a, b) == 0  # one lock order: none at all, not even one retried


def claimed(manager: QueueManager, count: int) -> list[str]:
    manager.enqueue_many([new(f"j-{n:02d}") for n in range(count)])
    leases = manager.claim("w-1", "process", {}, count, 30)
    assert len(leases) == count
    return [lease.token for lease in sorted(leases, key=lambda lease: lease.item.job_id)]


def test_one_bad_completion_fails_alone(manager: QueueManager) -> None:
    first, bad, last = claimed(manager, 3)
    results = manager.complete_many(
        [
            Completion(first, Outcome.SUCCEEDED, 0),
            Completion(bad, Outcome.FAILED, 2**31),  # an exit code out of its column's range
            Completion(last, Outcome.SUCCEEDED, 0),
            Completion("no-such-token", Outcome.SUCCEEDED, 0),
        ]
    )
    assert isinstance(results[1], InvalidArgument) and "exit_code" in results[1].message
    assert isinstance(results[3], FailedPrecondition)
    assert manager.get("j-00").state is ItemState.SUCCEEDED
    assert manager.get("j-02").state is ItemState.SUCCEEDED
    assert manager.get("j-01").state is ItemState.LEASED  # its holder may still complete it
    assert manager.complete(bad, Outcome.FAILED, 1, "", "").state is not ItemState.LEASED


def test_a_completion_the_database_refuses_fails_alone(postgres_cluster) -> None:  # type: ignore[no-untyped-def]
    manager = make_manager(postgres_cluster.new_database())
    first, bad, last = claimed(manager, 3)
    refuse_on_postgres(manager, "UPDATE", "NEW.exit_code = 77")
    results = manager.complete_many(
        [
            Completion(first, Outcome.SUCCEEDED, 0),
            Completion(bad, Outcome.FAILED, 77),
            Completion(last, Outcome.SUCCEEDED, 0),
        ]
    )
    assert isinstance(results[1], InvalidArgument) and "poison refused" in results[1].message
    assert [manager.get(f"j-{n:02d}").state for n in range(3)] == [
        ItemState.SUCCEEDED,
        ItemState.LEASED,
        ItemState.SUCCEEDED,
    ]
    assert ("j-01", "SUCCEEDED") not in statuses(manager)
    assert manager.reconcile() == 0


def test_a_bad_completion_in_a_group_commit_fails_only_its_caller(manager: QueueManager) -> None:
    """Completions sent at the same time share one transaction (the combiner): one bad
    caller gets its own error, every other caller its success."""
    tokens = claimed(manager, 12)
    entered, release = threading.Event(), threading.Event()
    inner = manager._complete_all
    batches: list[int] = []

    def gathered(completions: list[Completion]) -> list[object]:
        entered.set()
        release.wait(10)  # the first leader waits, so the others gather into one batch
        batches.append(len(completions))
        return inner(completions)  # type: ignore[return-value]

    manager._complete_all = gathered  # type: ignore[assignment]
    answers: dict[int, object] = {}

    def complete(n: int, token: str) -> None:
        code = 2**31 if n == 5 else 0  # an exit code out of its column's range
        try:
            answers[n] = manager.complete(token, Outcome.SUCCEEDED, code, "", "")
        except Exception as exc:
            answers[n] = exc

    threads = [threading.Thread(target=complete, args=(n, t)) for n, t in enumerate(tokens)]
    threads[0].start()
    assert entered.wait(10)
    for thread in threads[1:]:
        thread.start()
    while len(manager._completions._waiting) < len(tokens) - 1:
        time.sleep(0.01)
    release.set()
    for thread in threads:
        thread.join()
    assert batches == [1, 11]  # the eleven shared one transaction
    assert isinstance(answers[5], InvalidArgument)
    assert all(not isinstance(a, Exception) for n, a in answers.items() if n != 5)
    states = [manager.get(f"j-{n:02d}").state for n in range(12)]
    assert states.count(ItemState.SUCCEEDED) == 11
    assert states[5] is ItemState.LEASED


def test_a_claim_the_database_refuses_fails_alone_in_its_group_commit(postgres_cluster) -> None:  # type: ignore[no-untyped-def]
    """Claims made at the same time share one transaction: one whose write the database
    refuses gets its own error, the other claims their leases, its items stay claimable."""
    manager = make_manager(postgres_cluster.new_database())
    manager.enqueue_many([new(f"j-{n:02d}") for n in range(6)])
    refuse_on_postgres(manager, "UPDATE", "NEW.worker_id = 'w-poison'")
    entered, release = threading.Event(), threading.Event()
    inner = manager._claims._run_batch
    batches: list[int] = []

    def gathered(claims):  # type: ignore[no-untyped-def]
        entered.set()
        release.wait(10)  # the first leader waits, so the others gather into one batch
        batches.append(len(claims))
        return inner(claims)

    manager._claims._run_batch = gathered
    answers: dict[str, object] = {}

    def claim(worker_id: str) -> None:
        try:
            answers[worker_id] = manager.claim(worker_id, "process", {}, 1, 30)
        except Exception as exc:
            answers[worker_id] = exc

    workers = ["w-first", "w-a", "w-poison", "w-b"]
    threads = {w: threading.Thread(target=claim, args=(w,)) for w in workers}
    threads["w-first"].start()
    assert entered.wait(10)
    for w in workers[1:]:
        threads[w].start()
    while len(manager._claims._waiting) < 3:
        time.sleep(0.01)
    release.set()
    for thread in threads.values():
        thread.join()
    assert batches == [1, 3]
    assert isinstance(answers["w-poison"], InvalidArgument)
    for w in ("w-first", "w-a", "w-b"):
        assert len(answers[w]) == 1, answers[w]  # type: ignore[arg-type]
    leased = {lease.item.job_id for lease in manager.claim("w-c", "process", {}, 10, 30)}
    assert len(leased) == 3  # the refused claim's item went back, claimable
    assert manager.reconcile() == 0


def test_reaper_and_heartbeats_never_deadlock(postgres_cluster) -> None:  # type: ignore[no-untyped-def]
    """Many workers heartbeat short leases, some of them late, while two replicas' reapers
    expire leases and mark silent workers offline: no deadlock surfaces (what a late
    heartbeat may get is FAILED_PRECONDITION: its lease ended)."""
    url = postgres_cluster.new_database()
    a = make_manager(url, worker_timeout=0.4)
    b = make_manager(url, worker_timeout=0.4)
    a.enqueue_many([new(f"j-{n:03d}") for n in range(200)])
    errors: list[BaseException] = []
    stop = threading.Event()

    def worker(n: int) -> None:
        name = f"w-{n:02d}"
        replica = a if n % 2 else b
        rng = random.Random(n)
        try:
            while not stop.is_set():
                leases = replica.claim(name, "process", {}, 3, 0.5)
                for _ in range(4):
                    time.sleep(rng.uniform(0.05, 0.5))  # some beats come after the timeout
                    for lease in leases:
                        try:
                            replica.heartbeat(lease.token, 0.5)
                        except FailedPrecondition:
                            pass  # reaped meanwhile
                for lease in leases:
                    try:
                        replica.complete(lease.token, Outcome.FAILED, 1, "", "")
                    except FailedPrecondition:
                        pass
        except BaseException as exc:
            errors.append(exc)

    def reaper(replica: QueueManager) -> None:
        try:
            while not stop.is_set():
                replica.reap()
                time.sleep(0.01)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(24)]
    threads += [threading.Thread(target=reaper, args=(r,)) for r in (a, b)]
    for thread in threads:
        thread.start()
    time.sleep(8)
    stop.set()
    for thread in threads:
        thread.join(30)
    surfaced = [e for e in errors if isinstance(e, DBAPIError) or "deadlock" in str(e)]
    assert not surfaced, surfaced[:3]
    assert not errors, errors[:3]
    assert deadlocks(a, b) == 0  # none at all, not even one retried


def test_a_bad_next_generation_held_behind_a_lease_fails_alone(manager: QueueManager) -> None:
    """A new generation of a leased item waits for that lease; one its columns cannot hold
    is refused then, not later when it would replace the item (and not with the batch)."""
    manager.enqueue_many([new("a"), new("b")])
    manager.claim("w", "process", {}, 10, 30)  # both leased
    too_long = tuple(f"type-{n}" for n in range(100))
    results = manager.enqueue_many(
        [replace(new("a"), generation=2, worker_types=too_long), replace(new("b"), generation=2)]
    )  # type: ignore[arg-type]
    assert isinstance(results[0], InvalidArgument) and "worker_types" in results[0].message
    assert isinstance(results[1], tuple) and results[1][1] is True  # held behind b's lease
    assert manager.get("a").cancel_requested is False  # a's worker is not asked to stop
    assert manager.get("b").cancel_requested is True
