"""The outbox relay's batch delivery on real stores: what is delivered is deleted, in
order up to the first failure; that one waits with backoff, the rest are sent again on the
next round (receivers are idempotent, and the jobs service ignores a late update)."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import Engine

from services.common import db, migrations
from services.common.clock import Clock
from services.common.feed import ChangeFeed
from services.common.outbox import Message, Relay, SqlOutbox, Transient
from services.queue.bootstrap import MIGRATIONS
from services.queue.models import OutboxRow


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


def left(outbox: SqlOutbox) -> list[int]:
    return [m.payload["n"] for m in outbox.due(Clock().now() + timedelta(days=1), 100)]


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
    [waiting] = [m for m in outbox.due(Clock().now() + timedelta(days=1), 1)]
    assert waiting.attempts == 1


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
