"""The outbox relay's batch delivery on real stores: what is delivered is deleted, in
order up to the first failure; that one waits with backoff, the rest are sent again on the
next round (receivers are idempotent, and the jobs service ignores a late update)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from services.common import db, migrations
from services.common.clock import Clock
from services.common.feed import ChangeFeed
from services.common.outbox import Message, Relay, SqlOutbox, Transient
from services.queue.bootstrap import MIGRATIONS
from services.queue.models import OutboxRow


@pytest.fixture
def outbox(database_url: str) -> SqlOutbox:
    engine = db.make_engine(database_url, setting="QUEUE_DATABASE_URL")
    migrations.upgrade(engine, MIGRATIONS, "queue_alembic_version", "QUEUE_DATABASE_URL")
    outbox = SqlOutbox(engine, OutboxRow)
    now = Clock().now() - timedelta(seconds=1)
    with engine.begin() as connection:
        outbox.add_many(connection, [("status", f"j-{n}", {"n": n}, now) for n in range(5)])
    return outbox


def relay_with(outbox: SqlOutbox, answer) -> tuple[Relay, list[list[int]]]:  # type: ignore[no-untyped-def]
    calls: list[list[int]] = []

    def deliver_many(messages: list[Message]) -> list[Exception | None]:
        calls.append([m.payload["n"] for m in messages])
        return answer(messages)  # type: ignore[no-any-return]

    def one(message: Message) -> None:
        raise AssertionError("batch delivery was not used")

    return Relay("test", outbox, one, Clock(), ChangeFeed(), deliver_many=deliver_many), calls


def left(outbox: SqlOutbox) -> list[int]:
    return [m.payload["n"] for m in outbox.due(Clock().now() + timedelta(days=1), 100)]


def test_a_delivered_batch_is_deleted_in_one_call(outbox: SqlOutbox) -> None:
    relay, calls = relay_with(outbox, lambda ms: [None] * len(ms))

    assert relay.run_once() is False  # fewer than a batch: nothing more waits
    assert calls == [[0, 1, 2, 3, 4]] and outbox.pending() == 0


def test_the_first_failure_waits_and_the_rest_go_again(outbox: SqlOutbox) -> None:
    relay, _ = relay_with(outbox, lambda ms: [None, None, Transient("down"), None, None])

    relay.run_once()

    assert left(outbox) == [2, 3, 4]
    assert [m.payload["n"] for m in outbox.due(Clock().now(), 100)] == [3, 4]  # 2 backs off
    [waiting] = [m for m in outbox.due(Clock().now() + timedelta(days=1), 1)]
    assert waiting.attempts == 1


def test_a_failed_call_delivers_nothing(outbox: SqlOutbox) -> None:
    def down(messages: list[Message]) -> list[Exception | None]:
        raise Transient("the jobs service is down")

    relay, _ = relay_with(outbox, down)

    relay.run_once()

    assert left(outbox) == [0, 1, 2, 3, 4]
    assert [m.payload["n"] for m in outbox.due(Clock().now(), 100)] == [1, 2, 3, 4]


def test_an_answer_of_the_wrong_length_delivers_nothing(outbox: SqlOutbox) -> None:
    relay, _ = relay_with(outbox, lambda ms: [None])

    relay.run_once()

    assert left(outbox) == [0, 1, 2, 3, 4]
