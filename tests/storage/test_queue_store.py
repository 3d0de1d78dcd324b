"""The queue manager on real stores: SQLite and PostgreSQL, one replica and two."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from services.common import db
from services.common.clock import Clock
from services.common.errors import Aborted, FailedPrecondition
from services.queue.domain import ItemState, Outcome
from services.queue.manager import Lease, NewItem, QueueManager, _ClaimArgs
from tests.storage.queue_support import SteppedClock, make_manager, new


@pytest.fixture
def manager(database_url: str) -> QueueManager:
    return make_manager(database_url)


def test_enqueue_is_idempotent_by_job_and_generation(manager: QueueManager) -> None:
    _, created = manager.enqueue(new("j-1"))
    _, again = manager.enqueue(new("j-1"))
    assert created and not again
    assert manager.store.outbox.pending() == 1


def test_claim_order_priority_then_fifo_and_worker_type(manager: QueueManager) -> None:
    for job_id, priority in [("low", 0), ("high", 5), ("low-2", 0)]:
        manager.enqueue(new(job_id, priority))
    manager.enqueue(new("vm-only", 10, ("vm",)))
    leases = manager.claim("w-1", "process", {}, 10, 30)
    assert [lease.item.job_id for lease in leases] == ["high", "low", "low-2"]
    assert [lease.item.job_id for lease in manager.claim("w-2", "vm", {}, 10, 30)] == ["vm-only"]


def test_fencing_a_stale_token_changes_nothing(manager: QueueManager) -> None:
    manager.enqueue(new("j-1"))
    [lease] = manager.claim("w-1", "process", {}, 1, 30)
    manager.release(lease.token, "test")
    [second] = manager.claim("w-2", "process", {}, 1, 30)
    with pytest.raises(FailedPrecondition) as error:
        manager.complete(lease.token, Outcome.SUCCEEDED, 0, b"", "")
    assert error.value.reason == "LEASE_NOT_HELD"
    item = manager.get("j-1")
    assert item.state is ItemState.LEASED and item.worker_id == "w-2"
    manager.complete(second.token, Outcome.SUCCEEDED, 0, b"ok", "")
    assert manager.get("j-1").state is ItemState.SUCCEEDED


def test_failures_retry_then_dead_letter(manager: QueueManager) -> None:
    manager.enqueue(new("j-1"))
    [first] = manager.claim("w", "process", {}, 1, 30)
    manager.complete(first.token, Outcome.FAILED, 3, b"", "")
    assert manager.get("j-1").state is ItemState.WAITING
    [second] = manager.claim("w", "process", {}, 1, 30)
    assert second.item.attempt == 2
    manager.complete(second.token, Outcome.FAILED, 3, b"", "")
    item = manager.get("j-1")
    assert item.state is ItemState.DEAD_LETTERED and item.exit_code == 3
    manager.redrive("j-1")
    assert manager.get("j-1").state is ItemState.WAITING


def test_expired_leases_are_reaped(database_url: str) -> None:
    clock = SteppedClock()
    manager = make_manager(database_url, clock)
    manager.enqueue(new("j-1"))
    [lease] = manager.claim("w", "process", {}, 1, 5)
    clock.advance(10)
    assert manager.reap() == 1
    item = manager.get("j-1")
    assert item.state is ItemState.WAITING and "expired" in item.error
    with pytest.raises(FailedPrecondition):
        manager.heartbeat(lease.token, None)


def test_a_silent_workers_leases_are_released_at_once(database_url: str) -> None:
    clock = SteppedClock()
    manager = make_manager(database_url, clock, worker_timeout=30)
    manager.enqueue(new("j-1"))
    [lease] = manager.claim("w-1", "process", {}, 1, 3600)  # the lease is far from expiring
    clock.advance(31)  # no claim, heartbeat or worker call for longer than the timeout

    assert manager.reap() == 1

    item = manager.get("j-1")
    assert item.state is ItemState.WAITING and "w-1 went offline" in item.error
    assert [w.state.name for w in manager.workers()] == ["OFFLINE"]
    with pytest.raises(FailedPrecondition):
        manager.heartbeat(lease.token, None)
    [again] = manager.claim("w-2", "process", {}, 1, 30)
    assert again.item.attempt == 2


def test_a_wall_clock_stepped_forward_ends_no_lease_and_silences_no_worker(
    database_url: str,
) -> None:
    """NTP steps the clock an hour ahead while a job runs: its lease and its worker stay
    (the reaper also times them on the monotonic clock); once that much time has really
    passed without a heartbeat, the lease ends."""
    clock = SteppedClock()
    manager = make_manager(database_url, clock, worker_timeout=30)
    manager.enqueue(new("j-1"))
    [lease] = manager.claim("w-1", "process", {}, 1, 10)

    clock.offset += 3600
    assert manager.reap() == 0

    item = manager.get("j-1")
    assert item.state is ItemState.LEASED and item.lease_token == lease.token
    assert [w.state.name for w in manager.workers()] == ["ONLINE"]
    clock.elapsed += 11  # the lease's 10 s pass: it ends; the worker is not yet silent
    assert manager.reap() == 1
    assert manager.get("j-1").state is ItemState.WAITING
    assert [w.state.name for w in manager.workers()] == ["ONLINE"]
    clock.elapsed += 20  # 31 s since the worker was last heard from
    manager.reap()
    assert [w.state.name for w in manager.workers()] == ["OFFLINE"]


def test_a_dead_workers_lease_still_ends_after_the_wall_clock_steps_back(
    database_url: str,
) -> None:
    """NTP steps the clock back an hour while a worker holds a 10 s lease and dies: the
    lease ends within seconds (time goes on at half speed), not an hour later."""
    wall, mono = {"now": time.time()}, {"now": 0.0}
    clock = Clock(wall=lambda: wall["now"], monotonic=lambda: mono["now"])
    manager = make_manager(database_url, clock, worker_timeout=3600)
    manager.enqueue(new("j-1"))
    manager.claim("w-1", "process", {}, 1, 10)
    wall["now"] -= 3600

    def after(seconds: float) -> int:
        wall["now"] += seconds
        mono["now"] += seconds
        return manager.reap()

    assert after(10) == 0  # the clock goes on at half speed: 5 s of the 10 s lease
    assert after(12) == 1  # 11 s: it ran out on both clocks
    assert manager.get("j-1").state is ItemState.WAITING


def test_a_lease_another_replica_granted_ends_a_lease_after_this_one_finds_it_late(
    database_url: str,
) -> None:
    """Replica B granted the lease and went away; A never timed it: A ends it once it has
    watched it past its deadline for the lease's length (a step could have made it look
    late), not before."""
    clock = SteppedClock()
    a, b = make_manager(database_url, clock), make_manager(database_url, clock)
    b.enqueue(new("j-1"))
    assert len(b.claim("w-1", "process", {}, 1, 10)) == 1
    a.register_worker("w-1", "process", {}, 1)  # the worker is heard from through A

    clock.advance(11)
    assert a.reap() == 0  # A finds it late: it starts timing it
    clock.advance(9)
    assert a.reap() == 0
    clock.advance(2)
    assert a.reap() == 1
    assert a.get("j-1").state is ItemState.WAITING


def test_leases_not_yet_run_out_here_hide_none_that_have(database_url: str) -> None:
    """Replica B granted leases and went away; A's reaper ends each one lease length
    after it found it late, however many there are and whatever their lengths: a page of
    others it is still timing does not make it wait for them first."""
    clock = SteppedClock()
    a, b = (make_manager(database_url, clock, worker_timeout=1000) for _ in range(2))
    b.enqueue_many([new(f"long-{n}") for n in range(3)] + [new("short")])
    for n in range(3):
        b.claim(f"w-{n}", "process", {}, 1, 100)  # longer leases, earlier deadlines
    clock.advance(96)
    b.claim("w-3", "process", {}, 1, 5)  # its deadline is the last

    clock.advance(6)  # every lease is late
    assert a.reap(batch=2) == 0  # found late: timed from now
    clock.advance(6)
    assert a.reap(batch=2) == 1

    assert a.get("short").state is ItemState.WAITING
    assert {a.get(f"long-{n}").state for n in range(3)} == {ItemState.LEASED}


def test_a_drained_worker_that_went_offline_comes_back_drained(database_url: str) -> None:
    clock = SteppedClock()
    manager = make_manager(database_url, clock, worker_timeout=30)
    manager.register_worker("w-1", "process", {}, 1)
    manager.drain_worker("w-1")
    clock.advance(31)
    manager.reap()
    assert [(w.state.name, w.drained) for w in manager.workers()] == [("OFFLINE", True)]
    manager.enqueue(new("j-1"))

    assert manager.claim("w-1", "process", {}, 1, 30) == []  # heard from again: no work

    assert [(w.state.name, w.drained) for w in manager.workers()] == [("DRAINING", True)]
    assert manager.get("j-1").state is ItemState.WAITING
    manager.register_worker("w-1", "process", {}, 1)  # a restarted worker registers anew
    [lease] = manager.claim("w-1", "process", {}, 1, 30)
    assert lease.item.job_id == "j-1"
    assert [(w.state.name, w.drained) for w in manager.workers()] == [("ONLINE", False)]


def test_a_drain_through_one_replica_holds_on_the_other(database_url: str) -> None:
    """Replica A remembers the worker as seen and online; the drain is made through B."""
    a, b = make_manager(database_url), make_manager(database_url)
    a.enqueue_many([new("j-1"), new("j-2")])
    [first] = a.claim("w-1", "process", {}, 1, 30)

    b.drain_worker("w-1")

    assert a.claim("w-1", "process", {}, 1, 30) == []
    assert a.get("j-2").state is ItemState.WAITING
    assert a.cache.claimable() == {"j-2"} and a.cache.staged_count() == 0
    a.complete(first.token, Outcome.SUCCEEDED, 0, b"", "")  # its running work still ends
    [other] = a.claim("w-2", "process", {}, 1, 30)
    assert other.item.job_id == "j-2"


def _until_a_transaction_waits_for_a_lock(url: str, seconds: float = 10.0) -> None:
    """On PostgreSQL, until some transaction waits for a row lock; SQLite shows no such
    thing (a writer waits for the database in its busy handler): a short pause instead."""
    if not url.startswith("postgresql"):
        time.sleep(0.5)
        return
    engine = db.make_engine(url, setting="QUEUE_DATABASE_URL")
    deadline = time.monotonic() + seconds
    try:
        with engine.connect() as connection:
            query = text("SELECT count(*) FROM pg_locks WHERE NOT granted")
            while not connection.execute(query).scalar():
                assert time.monotonic() < deadline, "no transaction came to wait for a lock"
                connection.rollback()
                time.sleep(0.02)
    finally:
        engine.dispose()


def test_a_drain_committed_while_another_replica_reaps_the_worker_holds(
    database_url: str,
) -> None:
    """Replica B drains w-1 while replica A's reaper finds w-1 silent: A waits for B's
    transaction and writes OFFLINE over the drained worker, not over what it read before."""
    inside, go = threading.Event(), threading.Event()

    def pause_before_commit(point: str) -> None:
        if point == "after_write" and not go.is_set():
            inside.set()
            go.wait(10)

    clock = SteppedClock()
    a = make_manager(database_url, clock, worker_timeout=30)
    b = make_manager(database_url, faults=pause_before_commit)
    go.set()
    a.register_worker("w-1", "process", {}, 1)
    clock.advance(31)  # to A, w-1 has been silent past the timeout
    go.clear()
    drain = threading.Thread(target=b.drain_worker, args=("w-1",))
    drain.start()
    assert inside.wait(10)  # B wrote the drain and has not committed
    reap = threading.Thread(target=a.reap)
    reap.start()
    _until_a_transaction_waits_for_a_lock(database_url)
    go.set()
    drain.join(10)
    reap.join(10)

    assert [(w.state.name, w.drained) for w in a.workers()] == [("OFFLINE", True)]
    a.enqueue(new("j-1"))
    assert a.claim("w-1", "process", {}, 1, 30) == []  # heard from again, still drained


def count_attempts(manager: QueueManager) -> Counter[str]:
    """Claim attempts by worker id from now on (every poll's turn makes one)."""
    attempts: Counter[str] = Counter()
    claim_once = manager._claim_once

    def counted(args: _ClaimArgs) -> list[Lease]:
        attempts[args.worker_id] += 1
        return claim_once(args)

    manager._claim_once = counted  # type: ignore[method-assign]
    return attempts


class Poll:
    """A worker's long poll in a thread of its own."""

    def __init__(self, manager: QueueManager, worker_id: str, worker_type: str) -> None:
        self.leases: list[object] | None = None
        self.error: Exception | None = None
        asleep = manager.waiters.asleep()

        def run() -> None:
            try:
                self.leases = manager.claim(worker_id, worker_type, {}, 1, 30, wait_seconds=30)  # type: ignore[assignment]
            except Exception as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while manager.waiters.asleep() == asleep:  # until it tried and waits
            assert time.monotonic() < deadline, "the poll did not start waiting"
            time.sleep(0.01)

    def answered(self, seconds: float = 10) -> list[str]:
        self.thread.join(seconds)
        assert self.leases is not None, "the poll was not answered"
        return [lease.item.job_id for lease in self.leases]  # type: ignore[attr-defined]


def test_an_enqueue_wakes_a_waiting_poll_that_may_take_it(database_url: str) -> None:
    manager = make_manager(database_url)
    manager.look_again_seconds = 60  # only a wake can answer the polls within the test
    vm, process = Poll(manager, "w-vm", "vm"), Poll(manager, "w-p", "process")
    attempts = count_attempts(manager)

    manager.enqueue(new("j-process", worker_types=("process",)))
    assert process.answered() == ["j-process"]
    assert attempts == {"w-p": 1}  # the vm poll was not woken: not its kind
    manager.enqueue(new("j-vm", worker_types=("vm",)))
    assert vm.answered() == ["j-vm"]
    assert attempts == {"w-p": 1, "w-vm": 1}


def test_a_woken_poll_that_cannot_claim_hands_the_item_on(database_url: str) -> None:
    """The longest-waiting poll is woken for the item, but its worker was drained
    meanwhile: it answers empty, and the next poll is woken for the item."""
    manager = make_manager(database_url)
    manager.look_again_seconds = 60
    manager.register_worker("w-1", "process", {}, 1)
    first, second = Poll(manager, "w-1", "process"), Poll(manager, "w-2", "process")
    manager.drain_worker("w-1")

    manager.enqueue(new("j-1"))

    assert first.answered() == []
    assert second.answered() == ["j-1"]


def test_an_item_two_types_accept_wakes_no_poll_that_cannot_take_the_rest(
    database_url: str,
) -> None:
    """A vm-only item waits (no vm worker polls). An item that vm and process workers
    accept wakes a process poll, which takes it; what it hands on must not wake the other
    process polls for the vm-only item (they would find nothing and hand it on to each
    other for as long as it waits)."""
    manager = make_manager(database_url)
    manager.look_again_seconds = 60
    manager.enqueue(new("vm-only", worker_types=("vm",)))
    polls = [Poll(manager, f"w-{n}", "process") for n in range(3)]
    attempts = count_attempts(manager)

    manager.enqueue(new("either", worker_types=("vm", "process")))

    assert polls[0].answered() == ["either"]
    time.sleep(0.5)  # a ping-pong makes thousands of attempts in this time
    assert attempts == {"w-0": 1}


def test_a_released_item_goes_on_to_the_next_poll_if_the_woken_one_cannot_claim(
    database_url: str,
) -> None:
    manager = make_manager(database_url)
    manager.look_again_seconds = 60
    manager.enqueue(new("j-1"))
    [lease] = manager.claim("w-0", "process", {}, 1, 30)
    manager.register_worker("w-1", "process", {}, 1)
    first, second = Poll(manager, "w-1", "process"), Poll(manager, "w-2", "process")
    manager.drain_worker("w-1")

    manager.release(lease.token, "given back")  # run_at is the release's own now

    assert first.answered() == []
    assert second.answered() == ["j-1"]


def test_an_item_given_back_by_a_poll_whose_worker_went_away_reaches_another(
    database_url: str,
) -> None:
    manager = make_manager(database_url)
    manager.look_again_seconds = 60
    gone = threading.Event()
    answer: list[list[Lease]] = []

    def poll_of_a_worker_that_goes() -> None:
        def alive() -> bool:
            return not gone.is_set()

        answer.append(manager.claim("w-1", "process", {}, 1, 30, 30, caller_waiting=alive))

    leaving = threading.Thread(target=poll_of_a_worker_that_goes, daemon=True)
    leaving.start()
    while manager.waiters.asleep() < 1:
        time.sleep(0.01)
    second = Poll(manager, "w-2", "process")
    claim_once = manager._claim_once

    def worker_goes_as_it_gets_the_item(args: _ClaimArgs) -> list[Lease]:
        leases = claim_once(args)
        if args.worker_id == "w-1" and leases:
            gone.set()
        return leases

    manager._claim_once = worker_goes_as_it_gets_the_item  # type: ignore[method-assign]

    manager.enqueue(new("j-1"))

    leaving.join(10)
    assert answer == [[]]
    assert second.answered() == ["j-1"]


def test_what_a_refused_claim_put_back_wakes_a_poll_of_the_same_batch(database_url: str) -> None:
    """Claims C and P share a batch. C's worker was drained through replica B (A still
    remembers it as not drained): C takes j-1, P finds nothing, then C is refused. P must
    be woken for j-1, not sleep until its next look."""
    leading, go = threading.Event(), threading.Event()

    def hold_the_first_batch(point: str) -> None:
        if point == "before_write" and threading.current_thread().name == "leader":
            leading.set()
            go.wait(10)

    a = make_manager(database_url, faults=hold_the_first_batch)
    b = make_manager(database_url)
    a.look_again_seconds = 60
    a.enqueue_many([new("j-0"), new("j-1")])
    for worker_id in ("w-c", "w-p"):  # seen just now: their claims write no worker row
        a.register_worker(worker_id, "process", {}, 1)
    b.drain_worker("w-c")

    def claim(worker_id: str, wait: float, into: list[list[Lease]]) -> None:
        into.append(a.claim(worker_id, "process", {}, 1, 30, wait_seconds=wait))

    got: dict[str, list[list[Lease]]] = {"leader": [], "w-c": [], "w-p": []}
    threads = [
        threading.Thread(target=claim, args=("w-l", 0, got["leader"]), name="leader"),
        threading.Thread(target=claim, args=("w-c", 0, got["w-c"])),
        threading.Thread(target=claim, args=("w-p", 30, got["w-p"])),
    ]
    threads[0].start()
    assert leading.wait(10)  # the leader's batch holds j-0, before its write
    for thread, queued in zip(threads[1:], (1, 2), strict=True):
        thread.start()
        deadline = time.monotonic() + 10
        while len(a._claims._waiting) < queued:  # in this order, for the next batch
            assert time.monotonic() < deadline
            time.sleep(0.01)
    go.set()
    for thread in threads:
        thread.join(10)

    assert [[lease.item.job_id for lease in leases] for leases in got["leader"]] == [["j-0"]]
    assert got["w-c"] == [[]]
    assert [[lease.item.job_id for lease in leases] for leases in got["w-p"]] == [["j-1"]]


def test_a_woken_poll_whose_claim_fails_hands_the_item_on(database_url: str) -> None:
    failed: list[str] = []

    def fail_first_claim_write(point: str) -> None:
        if point == "before_write" and threading.current_thread() is first.thread and not failed:
            failed.append(point)
            raise RuntimeError("the store failed")

    manager = make_manager(database_url, faults=fail_first_claim_write)
    manager.look_again_seconds = 60
    first, second = Poll(manager, "w-1", "process"), Poll(manager, "w-2", "process")

    manager.enqueue(new("j-1"))

    first.thread.join(10)
    assert isinstance(first.error, RuntimeError) and failed == ["before_write"]
    assert second.answered() == ["j-1"]


def test_a_replica_finds_another_replicas_item_behind_a_page_of_labelled_ones(
    database_url: str,
) -> None:
    """Replica A's index is empty; B enqueued 100 GPU jobs ahead of a plain one. A worker
    without the label, claiming through A, gets the plain one now, not at A's next
    reconciliation."""
    a, b = make_manager(database_url), make_manager(database_url)
    gpu = [replace(new(f"gpu-{n:03d}", priority=5), labels={"gpu": "yes"}) for n in range(100)]
    b.enqueue_many([*gpu, new("plain")])

    [lease] = a.claim("w-1", "process", {}, 1, 30)

    assert lease.item.job_id == "plain"
    [first_gpu] = a.claim("w-2", "process", {"gpu": "yes"}, 1, 30)
    assert first_gpu.item.job_id == "gpu-000"


def test_a_replica_finds_an_item_requiring_some_of_a_workers_labels_behind_others(
    database_url: str,
) -> None:
    """The same with a labelled worker: 100 jobs requiring arch=arm ahead of one requiring
    gpu=yes, and one requiring a gpu of another kind. The worker carrying gpu=yes and
    zone=a gets its job through A now; none it may not take."""
    a, b = make_manager(database_url), make_manager(database_url)
    arm = [replace(new(f"arm-{n:03d}", priority=5), labels={"arch": "arm"}) for n in range(100)]
    other_gpu = replace(new("other-gpu", priority=1), labels={"gpu": "no"})
    its = replace(new("its"), labels={"gpu": "yes"})
    b.enqueue_many([*arm, other_gpu, its])

    leases = a.claim("w-1", "process", {"gpu": "yes", "zone": "a"}, 5, 30)

    assert [lease.item.job_id for lease in leases] == ["its"]


def test_claims_sharing_a_transaction_each_find_what_their_labels_allow(
    database_url: str,
) -> None:
    """The same, with a plain worker's claim and the GPU worker's in one group commit: the
    second read is made for each worker's labels, not only for the batch's first claim."""
    a, b = make_manager(database_url), make_manager(database_url)
    arm = [replace(new(f"arm-{n:03d}", priority=5), labels={"arch": "arm"}) for n in range(100)]
    b.enqueue_many([*arm, replace(new("its"), labels={"gpu": "yes"})])

    plain = _ClaimArgs("w-1", "process", {}, 1, 30, False)
    gpu = _ClaimArgs("w-2", "process", {"gpu": "yes"}, 1, 30, False)
    [(nothing, _), (leases, _)] = a._claim_batch([plain, gpu])

    assert nothing == []
    assert [lease.item.job_id for lease in leases] == ["its"]


def test_a_worker_waiting_in_a_long_poll_is_not_taken_for_silent(database_url: str) -> None:
    """A worker whose long poll outlasts the worker timeout and then gets an item keeps
    it: the reaper that runs next does not release it as a silent worker's."""
    manager = make_manager(database_url, worker_timeout=2.0)
    got: list[object] = []
    poll = threading.Thread(
        target=lambda: got.extend(manager.claim("w-1", "process", {}, 1, 60, wait_seconds=6))
    )
    poll.start()
    time.sleep(3.5)  # longer than the worker timeout
    manager.enqueue(new("j-1"))
    poll.join(timeout=30)

    assert len(got) == 1
    assert manager.reap() == 0
    item = manager.get("j-1")
    assert item.state is ItemState.LEASED and item.worker_id == "w-1"


def test_leases_made_as_the_caller_went_away_are_given_back_uncounted(
    manager: QueueManager,
) -> None:
    manager.enqueue(new("j-1"))
    answers = iter([True, False])  # waiting when the claim starts, gone when it answers

    assert manager.claim("w-1", "process", {}, 1, 30, caller_waiting=lambda: next(answers)) == []

    item = manager.get("j-1")
    assert item.state is ItemState.WAITING and item.attempt == 0 and item.lease_token is None
    [lease] = manager.claim("w-2", "process", {}, 1, 30)
    assert lease.item.attempt == 1


def test_a_batch_write_over_a_changed_item_aborts_and_writes_nothing(
    manager: QueueManager,
) -> None:
    """The store's own fence: an item whose version moved since it was read is not
    overwritten, and the rest of its batch is not written either."""
    manager.enqueue_many([new("j-1"), new("j-2")])
    one, two = manager.get("j-1"), manager.get("j-2")
    for item in (one, two):
        item.state, item.worker_id = ItemState.LEASED, "w-stale"

    with pytest.raises(Aborted) as error, manager.store.transaction() as tx:
        tx.save_many([(one, one.version), (two, two.version - 1)])  # j-2: stale

    assert error.value.reason == "CONFLICT"
    for job_id in ("j-1", "j-2"):
        item = manager.get(job_id)
        assert item.state is ItemState.WAITING and item.worker_id == ""


def test_batch_writes_keep_datetimes_as_the_rest_of_the_store_reads_them(
    manager: QueueManager,
) -> None:
    manager.enqueue(new("j-1"))
    [lease] = manager.claim("w-1", "process", {}, 1, 30)
    stored = manager.get("j-1")
    assert stored.lease_deadline == lease.deadline and stored.lease_deadline.tzinfo is not None
    # ... and SQL comparisons against them still hold: the lease is not yet expired, and
    # is once the clock passes its deadline.
    with manager.store.transaction() as tx:
        assert tx.overdue(lease.deadline - timedelta(seconds=1)) == []
        [overdue] = tx.overdue(lease.deadline + timedelta(seconds=1))
        assert overdue == (lease.token, lease.deadline, 30.0)


def test_each_committed_report_wakes_the_relay_a_claims_included(manager: QueueManager) -> None:
    """The relay sends RUNNING as soon as a claim commits, not with the next enqueue or
    completion (claims wake no long poll, so they cannot use the claim feed)."""
    reports = manager.store.reports
    seen = reports.version
    manager.enqueue(new("j-1"))
    assert reports.version != seen

    seen = reports.version
    with manager.waiters.waiting("process", {}, False) as poll:
        [lease] = manager.claim("w-1", "process", {}, 1, 30)
    assert reports.version != seen and not poll.woken.is_set()

    seen = reports.version
    manager.get("j-1")
    manager.workers()
    assert reports.version == seen
    manager.complete(lease.token, Outcome.SUCCEEDED, 0, b"", "")
    assert reports.version != seen


def test_concurrent_claimers_take_each_item_once(manager: QueueManager) -> None:
    for i in range(200):
        manager.enqueue(new(f"j-{i:03d}"))
    claimed: Counter[str] = Counter()
    lock = threading.Lock()

    def claimer(n: int) -> None:
        while True:
            leases = manager.claim(f"w-{n}", "process", {}, 4, 30)
            if not leases:
                return
            with lock:
                claimed.update(lease.item.job_id for lease in leases)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claimed) == 200 and set(claimed.values()) == {1}


def test_a_failed_read_in_a_shared_claim_batch_puts_every_staged_item_back(
    manager: QueueManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two claims share one group commit; the first stages items, the second finds none
    for its worker type and reads the store, which fails: nothing may stay taken."""
    manager.enqueue_many([new(f"j-{i}") for i in range(3)])

    def unreadable(*args: object, **kwargs: object) -> list[object]:
        raise RuntimeError("the store cannot be read")

    monkeypatch.setattr(manager.store, "waiting", unreadable)
    together = [
        _ClaimArgs("w-1", "process", {}, 2, 30.0, False),
        _ClaimArgs("w-2", "vm", {}, 1, 30.0, True),  # only items naming "vm": none here
    ]
    with pytest.raises(RuntimeError):
        manager._claim_batch(together)
    monkeypatch.undo()

    assert manager.cache.staged_count() == 0
    assert manager.cache.claimable() == {"j-0", "j-1", "j-2"}
    assert sorted(lease.item.job_id for lease in manager.claim("w-3", "process", {}, 5, 30)) == [
        "j-0",
        "j-1",
        "j-2",
    ]


def test_two_replicas_on_one_postgres_never_double_lease(postgres_cluster) -> None:  # type: ignore[no-untyped-def]
    url = postgres_cluster.new_database()
    replicas = [make_manager(url), make_manager(url)]
    for i in range(300):
        replicas[i % 2].enqueue(new(f"j-{i:03d}"))
    claimed: Counter[str] = Counter()
    lock = threading.Lock()

    def claimer(n: int) -> None:
        replica = replicas[n % 2]
        while True:
            leases = replica.claim(f"w-{n}", "process", {}, 8, 30)
            if not leases:
                return
            for lease in leases:
                replica.complete(lease.token, Outcome.SUCCEEDED, 0, b"", "")
            with lock:
                claimed.update(lease.item.job_id for lease in leases)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claimed) == 300 and set(claimed.values()) == {1}
    assert replicas[0].store.counts() == {"SUCCEEDED": 300}


def test_the_oldest_waiting_age_counts_from_when_an_item_became_claimable(
    database_url: str,
) -> None:
    clock = SteppedClock()
    manager = make_manager(database_url, clock)
    assert manager.stats(30).oldest_waiting_age == 0.0  # nothing waits
    later = clock.now() + timedelta(hours=1)
    manager.enqueue(NewItem(**{**new("scheduled").__dict__, "run_at": later}))

    clock.offset = 60
    assert manager.stats(30).oldest_waiting_age == 0.0  # its hour has not come: not late

    manager.enqueue(new("due"))
    clock.offset = 90
    assert manager.stats(30).oldest_waiting_age == pytest.approx(30, abs=1)
    clock.offset = 3600 + 600  # "scheduled" has been due for 10 min, "due" for longer
    assert manager.stats(30).oldest_waiting_age == pytest.approx(3600 + 600 - 60, abs=1)
    assert manager.stats(30).by_state["WAITING"] == 2
    assert manager.stats(30).by_state["DEAD_LETTERED"] == 0


def test_fifo_holds_when_the_clock_steps_back(database_url: str) -> None:
    clock = SteppedClock()
    manager = make_manager(database_url, clock)
    manager.enqueue(new("first"))
    clock.offset = -3600  # NTP steps the clock back an hour
    manager.enqueue_many([new("second"), new("third")])

    order = [lease.item.job_id for lease in manager.claim("w", "process", {}, 3, 30)]

    assert order == ["first", "second", "third"]
    restarted = make_manager(database_url, clock)  # it goes on after what the store holds
    restarted.enqueue(new("fourth"))
    assert restarted.get("fourth").seq > restarted.get("third").seq


def test_run_at_in_the_future_is_not_claimed(manager: QueueManager) -> None:
    item = new("later")
    manager.enqueue(NewItem(**{**item.__dict__, "run_at": datetime.now(UTC) + timedelta(hours=1)}))
    assert manager.claim("w", "process", {}, 1, 30) == []


def test_a_restarted_queue_loads_its_items_from_the_store(database_url: str) -> None:
    first = make_manager(database_url)
    for job_id, priority in [("a", 0), ("b", 3), ("c", 0)]:
        first.enqueue(new(job_id, priority))
    [lease] = first.claim("w", "process", {}, 1, 30)
    assert lease.item.job_id == "b"

    restarted = make_manager(database_url)

    assert restarted.cache.view() == first.cache.view()
    assert [x.item.job_id for x in restarted.claim("w", "process", {}, 5, 30)] == ["a", "c"]


def test_reconciles_keep_the_delayed_heap_to_one_entry_per_delayed_item(database_url: str) -> None:
    clock = SteppedClock()
    manager = make_manager(database_url, clock)
    later = clock.now() + timedelta(hours=1)
    manager.enqueue_many([new(f"later-{i}", run_at=later) for i in range(10)])
    manager.enqueue(new("now"))

    for _ in range(500):  # the reaper reconciles every 30 s: this is about four hours
        manager.reconcile()

    assert manager.cache.delayed_size() == 10
    assert [lease.item.job_id for lease in manager.claim("w", "process", {}, 20, 30)] == ["now"]
    clock.advance(3601)
    leases = manager.claim("w", "process", {}, 20, 30)
    assert sorted(lease.item.job_id for lease in leases) == [f"later-{i}" for i in range(10)]
    assert manager.cache.delayed_size() == 0


def test_delayed_items_that_end_early_leave_no_heap_entries_behind(database_url: str) -> None:
    clock = SteppedClock()
    manager = make_manager(database_url, clock)
    later = clock.now() + timedelta(days=1)
    manager.enqueue(new("kept", run_at=later))
    for i in range(300):  # scheduled for tomorrow, cancelled today
        manager.enqueue(new(f"cancelled-{i}", run_at=later))
        manager.cancel(f"cancelled-{i}", 0)

    assert manager.cache.delayed_size() <= 2 * 1 + 64
    clock.advance(86_401)
    assert [lease.item.job_id for lease in manager.claim("w", "process", {}, 5, 30)] == ["kept"]


def test_a_read_back_that_found_nothing_keeps_an_item_committed_meanwhile(
    database_url: str,
) -> None:
    """A failed write reads its items back; one that was not there yet may be enqueued by
    another call between that read and the cache's update: it must stay claimable."""
    manager = make_manager(database_url)
    manager.enqueue(new("other"))
    read = manager.store.get

    def read_then_enqueued_meanwhile(job_id: str):  # type: ignore[no-untyped-def]
        found = read(job_id)
        manager.store.get = read  # type: ignore[method-assign]
        manager.enqueue(new(job_id))
        return found

    manager.store.get = read_then_enqueued_meanwhile  # type: ignore[method-assign]
    manager.refresh(["late"])

    assert manager.cache.view() == {
        job_id: (ItemState.WAITING, manager.get(job_id).version) for job_id in ("late", "other")
    }
    leases = manager.claim("w", "process", {}, 5, 30)
    assert sorted(lease.item.job_id for lease in leases) == ["late", "other"]
