"""The outbox relay's batch delivery on real stores: what is delivered is deleted, in
order up to the first failure; that one waits with backoff, the rest are sent again on the
next round (receivers are idempotent, and the jobs service ignores a late update)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select, update

from services.common import db, migrations
from services.common.clock import Clock
from services.common.feed import ChangeFeed
from services.common.outbox import Message, Refused, Relay, SqlOutbox, Transient
from services.queue.bootstrap import MIGRATIONS
from services.queue.models import OutboxRow
from tests.storage.queue_support import SteppedClock


@pytest.fixture
def engine(database_url: str) -> Engine:
    engine = db.make_engine(database_url, setting="QUEUE_DATABASE_URL")
    migrations.upgrade(engine, MIGRATIONS, "queue_alembic_version", "QUEUE_DATABASE_URL")
    return engine


@pytest.fixture
def outbox(engine: Engine) -> SqlOutbox:
    outbox = SqlOutbox(engine, OutboxRow)
    add(engine, outbox, list(range(5)))
    return outbox


def add(engine: Engine, outbox: SqlOutbox, numbers: list[int], **extra: str) -> None:
    """Messages numbered ``numbers`` (payload {"n": n, **extra}), due a second ago."""
    now = Clock().now() - timedelta(seconds=1)
    with engine.begin() as connection:
        outbox.add_many(connection, [("status", f"j-{n}", {"n": n, **extra}, now) for n in numbers])


def relay_with(outbox: SqlOutbox, answer, **options) -> tuple[Relay, list[list[int]]]:  # type: ignore[no-untyped-def]
    """A relay delivering in batches (``answer`` says how each went), and the numbers
    of every batch call; ``options`` go to the Relay."""
    calls: list[list[int]] = []

    def deliver_many(messages: list[Message]) -> list[Exception | None]:
        calls.append([m.payload["n"] for m in messages])
        return answer(messages)  # type: ignore[no-any-return]

    def one(message: Message) -> None:
        raise AssertionError("batch delivery was not used")

    relay = Relay("test", outbox, one, Clock(), ChangeFeed(), deliver_many=deliver_many, **options)
    return relay, calls


def rows(outbox: SqlOutbox) -> list[dict[str, Any]]:
    """Every row of the table, as a look at it (due() would claim them on PostgreSQL)."""
    table = OutboxRow.__table__
    with outbox._engine.connect() as connection:
        found = connection.execute(select(table).order_by(table.c.id)).mappings().all()
    return [{**row, "n": json.loads(row["payload"])["n"]} for row in found]


def left(outbox: SqlOutbox) -> list[int]:
    """The numbers of the messages still to deliver (not parked)."""
    return [row["n"] for row in rows(outbox) if row["parked_at"] is None]


def test_a_delivered_batch_is_deleted_in_one_call(outbox: SqlOutbox) -> None:
    relay, calls = relay_with(outbox, lambda ms: [None] * len(ms))

    assert relay.run_once() is False  # fewer than a batch: nothing more waits
    assert calls == [[0, 1, 2, 3, 4]] and outbox.pending() == 0


def test_the_first_failure_waits_and_the_rest_go_again(outbox: SqlOutbox) -> None:
    relay, _ = relay_with(outbox, lambda ms: [None, None, Transient("down"), None, None])
    before = Clock().now()  # the postponed one is due only after its backoff (>= 0.1 s)

    relay.run_once()

    assert left(outbox) == [2, 3, 4]
    assert [m.payload["n"] for m in outbox.due(before, 100)] == [3, 4]  # 2 backs off
    assert [row["attempts"] for row in rows(outbox)] == [1, 0, 0]


def test_a_failed_call_delivers_nothing(outbox: SqlOutbox) -> None:
    def down(messages: list[Message]) -> list[Exception | None]:
        raise Transient("the jobs service is down")

    relay, _ = relay_with(outbox, down)
    before = Clock().now()  # the postponed one is due only after its backoff (>= 0.1 s)

    relay.run_once()

    assert left(outbox) == [0, 1, 2, 3, 4]
    assert [m.payload["n"] for m in outbox.due(before, 100)] == [1, 2, 3, 4]


def test_a_message_that_waits_holds_back_the_later_ones_of_its_key(
    engine: Engine, outbox: SqlOutbox
) -> None:
    """A job's RUNNING fails to go (the call failed); its SUCCEEDED, written after it,
    must not overtake it (the jobs service would take RUNNING for a late no-op and lose
    the start time): it waits for RUNNING; other jobs' messages go on."""
    calls_made = {"n": 0}

    def answer(messages: list[Message]) -> list[Exception | None]:
        calls_made["n"] += 1
        if calls_made["n"] == 2:
            raise Transient("the jobs service is down")
        return [None] * len(messages)

    relay, calls = relay_with(outbox, answer)
    relay.run_once()  # the fixture's 0-4 go
    now = Clock().now() - timedelta(seconds=1)
    with engine.begin() as connection:
        outbox.add_many(
            connection,
            [
                ("status", "job-a", {"n": 10}, now),  # RUNNING
                ("status", "job-b", {"n": 11}, now),
                ("status", "job-a", {"n": 12}, now),  # SUCCEEDED
            ],
        )
    relay.run_once()  # one call, which fails: 10 waits, and 12 with it
    relay.run_once()
    assert calls[1:] == [[10, 11, 12], [11]]

    time.sleep(0.5)  # 10's backoff (0.1-0.2 s) passes
    relay.run_once()
    assert calls[3] == [10, 12]  # in order, together
    assert outbox.pending() == 0


def test_an_answer_of_the_wrong_length_delivers_nothing(outbox: SqlOutbox) -> None:
    relay, _ = relay_with(outbox, lambda ms: [None])

    relay.run_once()

    assert left(outbox) == [0, 1, 2, 3, 4]


def test_a_busy_relay_gathers_commits_into_few_rounds_an_idle_one_sends_at_once(
    engine: Engine, outbox: SqlOutbox
) -> None:
    feed = ChangeFeed()
    calls: list[tuple[float, list[int]]] = []

    def deliver_many(messages: list[Message]) -> list[Exception | None]:
        calls.append((time.monotonic(), [m.payload["n"] for m in messages]))
        return [None] * len(messages)

    # Long enough that a relay not woken by the commit, or one running a round per
    # commit, cannot pass on a slow machine either.
    relay = Relay(
        "test",
        outbox,
        lambda m: None,
        Clock(),
        feed,
        idle_seconds=30.0,
        round_gap=0.2,
        deliver_many=deliver_many,
    )
    relay.start()
    try:
        deadline = time.monotonic() + 5
        while outbox.pending() and time.monotonic() < deadline:  # the 5 from the fixture
            time.sleep(0.01)
        calls.clear()
        committed = time.monotonic()
        add(engine, outbox, [100])  # one commit on an idle relay: delivered at once
        feed.changed()
        while not calls and time.monotonic() < deadline:
            time.sleep(0.001)
        assert calls and calls[0][1] == [100]
        assert calls[0][0] - committed < 5  # woken by the commit, not the 30 s idle poll

        calls.clear()
        for n in range(200, 300):  # 100 commits over about 0.2 s, each waking the relay
            add(engine, outbox, [n])
            feed.changed()
            time.sleep(0.002)
        while outbox.pending() and time.monotonic() < deadline + 5:
            time.sleep(0.01)
    finally:
        relay.stop()
    delivered = [n for _, ns in calls for n in ns]
    assert delivered == list(range(200, 300))  # all, in order, once
    # Never a round per commit: rounds start round_gap apart. A call comes some time into
    # its round (after the read, which a loaded machine can slow down), so two calls may
    # come closer than that, but not more of them than the span allows, plus one.
    at = [when for when, _ in calls]
    assert len(calls) <= 2 + (at[-1] - at[0]) / relay.round_gap, at


def test_a_backlog_drains_in_full_rounds_without_waiting_the_gap(
    engine: Engine, outbox: SqlOutbox
) -> None:
    add(engine, outbox, list(range(5, 250)))  # 250 waiting: rounds of 100, 100, 50
    relay, calls = relay_with(
        outbox,
        lambda ms: [None] * len(ms),
        batch=100,
        round_gap=30.0,  # were the gap waited between full rounds, this would take a minute
    )
    relay.start()
    try:
        deadline = time.monotonic() + 10
        while outbox.pending() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        relay.stop()
    rounds = [len(numbers) for numbers in calls]
    assert rounds == [100, 100, 50]


def test_a_batch_call_carries_at_most_batch_bytes_of_payloads(
    engine: Engine, outbox: SqlOutbox
) -> None:
    outbox.delivered_many([m.id for m in outbox.due(Clock().now(), 100)])  # the fixture's
    add(engine, outbox, list(range(10)), tail="x" * 40_000)  # a 40 kB output tail each
    relay, calls = relay_with(outbox, lambda ms: [None] * len(ms), batch_bytes=100_000)
    while relay.run_once():
        pass
    sizes = [len(numbers) for numbers in calls]

    assert sizes == [2, 2, 2, 2, 2]  # 2 x 40 kB fit in 100 kB, a third does not
    assert outbox.pending() == 0


def test_a_key_held_back_for_more_than_a_page_does_not_starve_the_others(
    engine: Engine, outbox: SqlOutbox
) -> None:
    """One job's report waits (its delivery failed); 250 more of that job wait behind it,
    more than two pages of 100. A report of another job, written after them all, still
    goes in the next round: the held rows never fill the page."""
    outbox.delivered_many([m.id for m in outbox.due(Clock().now(), 100)])  # the fixture's
    now = Clock().now() - timedelta(seconds=1)
    with engine.begin() as connection:
        outbox.add_many(
            connection,
            [("status", "stuck", {"n": n}, now) for n in range(1000, 1251)]
            + [("status", "other", {"n": 2000}, now)],
        )
    [head] = outbox.due(Clock().now(), 1)
    outbox.postpone(head.id, Clock().now() + timedelta(hours=1), "the jobs service is slow")
    relay, calls = relay_with(outbox, lambda ms: [None] * len(ms), batch=100)

    relay.run_once()

    assert calls == [[2000]]
    assert left(outbox) == list(range(1000, 1251))  # in order, behind their first


def refusing(numbers: set[int], error: Exception) -> Any:
    """An answer refusing the messages numbered ``numbers`` with ``error``."""
    return lambda ms: [error if m.payload["n"] in numbers else None for m in ms]


def drain(relay: Relay, rounds: int = 40) -> None:
    """Run rounds, letting the backoffs pass between them (no sleeping: the relay's clock
    and the due messages' times are moved back together)."""
    for _ in range(rounds):
        relay.run_once()
        with relay.outbox._engine.begin() as connection:
            table = OutboxRow.__table__
            connection.execute(
                update(table)
                .where(table.c.claimed_by.is_(None))
                .values(next_attempt_at=Clock().now() - timedelta(seconds=1))
            )


def test_a_refused_message_is_parked_and_no_longer_holds_back_its_key(
    engine: Engine, outbox: SqlOutbox
) -> None:
    """The "Seen:" case of issue 14 at the relay: a job's poison report (refused by the
    jobs service, as a NUL in its error or a worker id too long is) parked after three
    tries, kept with its error; the later report of the same job goes through."""
    outbox.delivered_many([m.id for m in outbox.due(Clock().now(), 100)])  # the fixture's
    now = Clock().now() - timedelta(seconds=1)
    with engine.begin() as connection:
        outbox.add_many(
            connection,
            [
                ("status", "job-a", {"n": 10}, now),  # the poison report
                ("status", "job-b", {"n": 11}, now),
                ("status", "job-a", {"n": 12}, now),  # a later generation SUCCEEDED
            ],
        )
    refusal = Refused("INVALID_ARGUMENT: error: NUL byte")
    relay, calls = relay_with(outbox, refusing({10}, refusal), refused_tries=3)

    drain(relay)

    assert [n for call in calls for n in call].count(10) == 3  # tried three times, no more
    assert 12 in calls[-1] and left(outbox) == []  # delivered after 10 parked
    [parked] = outbox.parked(10)
    assert (parked.key, json.loads(parked.payload)["n"], parked.attempts) == ("job-a", 10, 3)
    assert "NUL byte" in parked.last_error
    assert outbox.parked_count() == 1 and outbox.pending() == 0


def test_a_message_failing_for_an_unknown_reason_is_parked_after_max_tries(
    outbox: SqlOutbox,
) -> None:
    relay, calls = relay_with(outbox, refusing({2}, RuntimeError("no idea")), max_tries=5)

    drain(relay)

    assert [n for call in calls for n in call].count(2) == 5
    [parked] = outbox.parked(10)
    assert parked.attempts == 5 and "no idea" in parked.last_error
    assert left(outbox) == []


def test_a_receiver_out_of_reach_never_parks_a_message(outbox: SqlOutbox) -> None:
    relay, _ = relay_with(outbox, refusing({2}, Transient("down")), max_tries=3)

    drain(relay, rounds=10)

    assert outbox.parked(10) == []
    assert [(row["n"], row["attempts"]) for row in rows(outbox)] == [(2, 10), (3, 0), (4, 0)]


def test_a_parked_message_is_redriven_or_deleted_by_an_operator(outbox: SqlOutbox) -> None:
    refuse = {2, 3}
    relay, calls = relay_with(
        outbox, lambda ms: [Refused("no") if m.payload["n"] in refuse else None for m in ms]
    )
    drain(relay)
    first, second = outbox.parked(10)
    assert outbox.parked(10, after=first.id) == [second]

    refuse.clear()  # the receiver was fixed
    redriven = outbox.redrive(first.id, Clock().now())
    assert redriven is not None and redriven.id == first.id
    relay.run_once()
    assert calls[-1] == [2] and outbox.parked(10) == [second]

    assert outbox.drop(second.id) == second
    assert outbox.parked_count() == 0 and rows(outbox) == []
    assert outbox.drop(second.id) is None and outbox.redrive(first.id, Clock().now()) is None


@pytest.mark.parametrize("how", ["raised", "answered for each"])
def test_a_batch_call_that_fails_blames_only_the_message_that_fails_alone(
    outbox: SqlOutbox, how: str
) -> None:
    """The receiver fails the whole call (as PostgreSQL failed a whole batch over one NUL
    byte), the call raising or the sender answering its one error for every message (as
    the jobs relay does for a failed BatchEnqueue): the messages go one per call, the
    innocent ones are delivered, only 3 counts a try and is parked; then batches again."""

    def answer(messages: list[Message]) -> list[Exception | None]:
        if any(m.payload["n"] == 3 for m in messages):
            failure = RuntimeError("INTERNAL")
            if how == "raised":
                raise failure
            return [failure] * len(messages)
        return [None] * len(messages)

    relay, calls = relay_with(outbox, answer, max_tries=2)

    drain(relay)

    assert left(outbox) == [] and [p.key for p in outbox.parked(10)] == ["j-3"]
    assert calls[:5] == [[0, 1, 2, 3, 4], [0], [1], [2], [3]]
    assert [row["attempts"] for row in rows(outbox)] == [2]  # 3's, alone


# ---- two relays on one PostgreSQL database ---------------------------------------------


# Several relays share one database on PostgreSQL only (SQLite: one process per file).
ON_POSTGRESQL = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


@pytest.fixture
def replicas(engine: Engine) -> tuple[SqlOutbox, SqlOutbox]:
    """Two outboxes on one table, as two replicas of a service have (each its engine)."""
    assert engine.dialect.name == "postgresql"
    other = db.make_engine(engine.url.render_as_string(hide_password=False), setting="X")
    return SqlOutbox(engine, OutboxRow), SqlOutbox(other, OutboxRow)


@ON_POSTGRESQL
def test_two_relays_never_deliver_the_same_row(
    engine: Engine, replicas: tuple[SqlOutbox, SqlOutbox]
) -> None:
    """Relay a's call is under way when relay b reads (b runs inside a's call): b gets the
    rows a has not claimed, never a's; every row is delivered once."""
    first, second = replicas
    add(engine, first, list(range(12)))
    delivered: Counter[int] = Counter()
    b_calls: list[list[int]] = []

    def deliver_b(messages: list[Message]) -> list[Exception | None]:
        b_calls.append([m.payload["n"] for m in messages])
        delivered.update(m.id for m in messages)
        return [None] * len(messages)

    b = Relay("b", second, lambda m: None, Clock(), ChangeFeed(), deliver_many=deliver_b)

    def deliver_a(messages: list[Message]) -> list[Exception | None]:
        b.run_once()  # the other replica's round, while a's call is under way
        delivered.update(m.id for m in messages)
        return [None] * len(messages)

    a = Relay("a", first, lambda m: None, Clock(), ChangeFeed(), deliver_many=deliver_a, batch=5)
    while a.run_once() or b.run_once():
        pass

    assert len(delivered) == 12 and set(delivered.values()) == {1}
    assert b_calls[0] == [5, 6, 7, 8, 9, 10, 11]  # the rows after a's page
    assert first.pending() == 0


@ON_POSTGRESQL
def test_a_claimed_message_holds_back_its_key_on_the_other_relay(
    engine: Engine, replicas: tuple[SqlOutbox, SqlOutbox]
) -> None:
    first, second = replicas
    now = Clock().now() - timedelta(seconds=1)
    with engine.begin() as connection:
        first.add_many(
            connection,
            [("status", key, {"n": n}, now) for n, key in enumerate(["x", "y", "x", "z"])],
        )

    claimed = first.due(Clock().now(), 2)  # x's first and y's, under way on relay a

    assert [m.payload["n"] for m in claimed] == [0, 1]
    assert [m.payload["n"] for m in second.due(Clock().now(), 100)] == [3]  # not x's second


@ON_POSTGRESQL
def test_a_claim_under_way_holds_back_its_keys_on_the_other_relay(
    engine: Engine, replicas: tuple[SqlOutbox, SqlOutbox]
) -> None:
    """Relay a's claim of x's first message is not committed yet when relay b claims:
    b must not take x's second (it would reach the receiver first). b waits for a's
    claim to commit, then sees it."""
    first, second = replicas
    now = Clock().now() - timedelta(seconds=1)
    with engine.begin() as connection:
        first.add_many(
            connection,
            [("status", key, {"n": n}, now) for n, key in enumerate(["x", "y", "x", "z"])],
        )
    claimed: list[list[int]] = []
    at = Clock().now()
    with engine.connect() as connection:  # relay a's claim, held open (its statements)
        transaction = connection.begin()
        connection.execute(first._serialise)
        params = {"now": at, "limit": 2, "claimer": first.claimer, "until": at + timedelta(30)}
        assert sorted(r.id for r in connection.execute(first._due, params)) == [1, 2]
        other = threading.Thread(
            target=lambda: claimed.append([m.payload["n"] for m in second.due(at, 100)])
        )
        other.start()
        time.sleep(0.5)  # b's claim runs meanwhile (and waits, or not)
        transaction.commit()
    other.join(timeout=10)

    assert claimed == [[3]]  # z's only: x's second waits behind a's claim


@ON_POSTGRESQL
def test_a_relay_that_claimed_and_died_lets_the_other_deliver_after_the_lease(
    engine: Engine, replicas: tuple[SqlOutbox, SqlOutbox]
) -> None:
    first, second = replicas
    add(engine, first, list(range(5)))
    clock = SteppedClock()
    dead = first.due(clock.now(), 3)  # claimed 0-2, then the process was killed
    delivered: list[int] = []

    def deliver(messages: list[Message]) -> list[Exception | None]:
        delivered.extend(m.payload["n"] for m in messages)
        return [None] * len(messages)

    relay = Relay("b", second, lambda m: None, clock, ChangeFeed(), deliver_many=deliver)
    relay.run_once()
    assert [m.payload["n"] for m in dead] == [0, 1, 2] and delivered == [3, 4]

    clock.advance(first.claim_seconds - 1)
    relay.run_once()
    assert delivered == [3, 4]  # the lease still holds

    clock.advance(2)
    relay.run_once()
    assert delivered == [3, 4, 0, 1, 2] and second.pending() == 0


@ON_POSTGRESQL
def test_two_running_relays_deliver_each_row_once_and_each_key_in_order(
    engine: Engine, replicas: tuple[SqlOutbox, SqlOutbox]
) -> None:
    """Both relays' threads at work on one backlog (3,000 messages over 300 keys, pages of
    100): every message is delivered once, and each key's in the order written, whichever
    relay sent it."""
    first, second = replicas
    now = Clock().now() - timedelta(seconds=1)
    with engine.begin() as connection:
        first.add_many(connection, [("status", f"k-{n % 300}", {"n": n}, now) for n in range(3000)])
    seen: list[tuple[str, int]] = []
    lock = threading.Lock()

    def deliver(messages: list[Message]) -> list[Exception | None]:
        time.sleep(0.005)  # a call takes a while: the other relay reads meanwhile
        with lock:
            seen.extend((m.key, m.payload["n"]) for m in messages)
        return [None] * len(messages)

    relays = [
        Relay(name, box, lambda m: None, Clock(), ChangeFeed(), deliver_many=deliver, batch=100)
        for name, box in (("a", first), ("b", second))
    ]
    for relay in relays:
        relay.start()
    try:
        deadline = time.monotonic() + 60
        while first.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for relay in relays:
            relay.stop()

    assert Counter(Counter(n for _, n in seen).values()) == {1: 3000}
    for key in {k for k, _ in seen}:
        numbers = [n for k, n in seen if k == key]
        assert numbers == sorted(numbers), key


@ON_POSTGRESQL
def test_a_relay_that_stops_releases_its_claims(
    engine: Engine, replicas: tuple[SqlOutbox, SqlOutbox]
) -> None:
    """A replica shut down (a deploy) after claiming a page it did not send: the other
    replica sends it at once, not after the lease."""
    first, second = replicas
    add(engine, first, list(range(3)))
    stopping = Relay("a", first, lambda m: None, Clock(), ChangeFeed())
    assert len(first.due(Clock().now(), 100)) == 3  # claimed, then the process stops

    stopping.stop()

    assert [m.payload["n"] for m in second.due(Clock().now(), 100)] == [0, 1, 2]
