"""The transactional outbox: a message is written in the same transaction as the change it
reports, and a relay delivers it in order, with retries and backoff, never dropping it.
Receivers are idempotent, so a redelivery after a crash is harmless."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    DateTime,
    Engine,
    Integer,
    String,
    Table,
    Text,
    bindparam,
    delete,
    func,
    select,
)
from sqlalchemy import update as sql_update
from sqlalchemy.orm import Mapped, Session, mapped_column

from services.common import telemetry
from services.common.backoff import backoff
from services.common.clock import Clock
from services.common.db import BulkWrite, reader, write_lock
from services.common.errors import LoopFailures
from services.common.feed import ChangeFeed

log = logging.getLogger(__name__)


class OutboxMixin:
    """Columns of an outbox table; each service declares its own table with it."""

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    topic: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    attempts: Mapped[int] = mapped_column(Integer)
    last_error: Mapped[str] = mapped_column(Text)


@dataclass(frozen=True)
class Message:
    id: int
    topic: str
    key: str
    payload: dict[str, Any]
    attempts: int
    size: int = 0  # bytes of the stored payload


class Transient(Exception):
    """The receiver could not be reached; the message waits and is tried again."""


# The columns add_many writes, in its rows' order.
_COLUMNS = ("topic", "key", "payload", "created_at", "next_attempt_at", "attempts", "last_error")


class SqlOutbox:
    """The relay's reads and writes go through SQLAlchemy Core on the table: no ORM
    session, whose object loading and bulk-delete bookkeeping cost several times the
    statements themselves, once per relay round."""

    def __init__(self, engine: Engine, row: type[OutboxMixin]) -> None:
        self._row: Any = row
        self._engine = engine
        self._reader = reader(engine)
        self._write_lock = write_lock(engine)
        table = row.__table__  # type: ignore[attr-defined]  # a mapped class
        self._table: Table = table
        c = table.c
        self._due = (
            select(c.id, c.topic, c.key, c.payload, c.attempts)
            .where(c.next_attempt_at <= bindparam("now"))
            .order_by(c.id)
            .limit(bindparam("limit"))
        )
        # The first message of each key that waits (postponed after a failed delivery),
        # on the next_attempt_at index: nothing, unless a delivery failed.
        self._held = (
            select(c.key, func.min(c.id))
            .where(c.next_attempt_at > bindparam("now"))
            .group_by(c.key)
        )
        self._delete = delete(table).where(c.id.in_(bindparam("ids", expanding=True)))
        self._insert = BulkWrite(engine, table, list(_COLUMNS))

    def add_many(
        self, connection: Connection, messages: list[tuple[str, str, dict[str, Any], datetime]]
    ) -> None:
        """Several messages in one statement, on the writer's connection: (topic, key,
        payload, now) each."""
        rows = [[t, k, json.dumps(p), now, now, 0, ""] for t, k, p, now in messages]
        self._insert.run(connection, rows)

    def add(
        self, session: Session, topic: str, key: str, payload: dict[str, Any], now: datetime
    ) -> None:
        session.add(
            self._row(
                topic=topic,
                key=key,
                payload=json.dumps(payload),
                created_at=now,
                next_attempt_at=now,
                attempts=0,
                last_error="",
            )
        )

    def due(self, now: datetime, limit: int) -> list[Message]:
        """Due messages in id order, but for those behind a waiting message of their key:
        a receiver sees each key's messages in the order they were written (a job's
        RUNNING before its SUCCEEDED, which would make RUNNING a late no-op)."""
        with self._reader.begin() as connection:
            held: dict[str, int] = dict(connection.execute(self._held, {"now": now}).all())
            rows = connection.execute(self._due, {"now": now, "limit": limit}).all()
        return [
            Message(r.id, r.topic, r.key, json.loads(r.payload), r.attempts, len(r.payload))
            for r in rows
            if r.id <= held.get(r.key, r.id)
        ]

    def delivered(self, message_id: int) -> None:
        self.delivered_many([message_id])

    def delivered_many(self, message_ids: list[int]) -> None:
        if message_ids:
            with self._write_lock, self._engine.begin() as connection:
                connection.execute(self._delete, {"ids": message_ids})

    def postpone(self, message_id: int, until: datetime, error: str) -> None:
        c = self._table.c
        with self._write_lock, self._engine.begin() as connection:
            connection.execute(
                sql_update(self._table)
                .where(c.id == message_id)
                .values(next_attempt_at=until, attempts=c.attempts + 1, last_error=error[:2000])
            )

    def pending(self) -> int:
        with self._reader.begin() as connection:
            return connection.scalar(select(func.count()).select_from(self._table)) or 0


# A receiver that takes several messages in one call answers, for each in order, None
# (delivered) or the exception that kept it from being delivered (Transient: try later).
DeliverMany = Callable[[list[Message]], list[Exception | None]]


class Relay:
    """Delivers due messages in id order. A message that fails ends the round and waits
    with exponential backoff (the messages after it go in the next round, but for those
    of its key, which wait for it); nothing is dropped. With ``deliver_many`` a batch
    goes in one call; the messages before the first that failed count as delivered, the
    rest are sent again (receivers are idempotent)."""

    def __init__(
        self,
        name: str,
        outbox: SqlOutbox,
        deliver: Callable[[Message], None],
        clock: Clock,
        feed: ChangeFeed,
        *,
        batch: int = 500,  # what the batch RPCs of both receivers take at most
        batch_bytes: int = 2 * 1024 * 1024,  # well under gRPC's 4 MiB message limit
        idle_seconds: float = 1.0,
        round_gap: float = 0.02,
        deliver_many: DeliverMany | None = None,
    ) -> None:
        """``round_gap``: rounds start at least this far apart. An idle relay woken by a
        commit delivers at once; a busy one gathers what commits in the gap into one
        round (one read, one call, one delete) instead of a round per commit."""
        self.name = name
        self.outbox = outbox
        self.deliver = deliver
        self.deliver_many = deliver_many
        self.clock = clock
        self.feed = feed
        self.batch = batch
        self.batch_bytes = batch_bytes
        self.idle_seconds = idle_seconds
        self.round_gap = round_gap
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._tracer = telemetry.tracer(__name__)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self.feed.changed()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        seen = self.feed.version
        failures = LoopFailures(self.name)
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                more = self.run_once()
                failures.succeeded()
            except Exception as exc:
                failures.failed(exc)
                more = False
            if more:
                continue  # a backlog: the next full round at once
            if not self._stopping.is_set():
                seen = self.feed.wait(seen, self.idle_seconds)
            # Commits that come while this one is being delivered wait for the next round.
            self._stopping.wait(self.round_gap - (time.monotonic() - started))

    def run_once(self) -> bool:
        """Deliver what is due; True when more may be waiting."""
        messages = self.outbox.due(self.clock.now(), self.batch)
        if self.deliver_many is not None and messages:
            # A batch call carries up to batch_bytes of payloads (at least one message):
            # a backlog of large output tails must not make one call too big to send.
            size, count = 0, 0
            for message in messages:
                size += message.size
                if count and size > self.batch_bytes:
                    break
                count += 1
            more = count < len(messages) or len(messages) == self.batch
            return self._send_many(messages[:count]) and more
        for message in messages:
            if self._stopping.is_set() or not self._send(message):
                return False
        return len(messages) == self.batch

    def _send(self, message: Message) -> bool:
        try:
            self.deliver(message)
        except Exception as exc:
            self._failed(message, exc)
            return False
        self.outbox.delivered(message.id)
        return True

    def _send_many(self, messages: list[Message]) -> bool:
        """One call for the batch; True when every message was delivered."""
        assert self.deliver_many is not None
        try:
            outcomes = self.deliver_many(messages)
            if len(outcomes) != len(messages):
                raise RuntimeError(f"{len(outcomes)} answers for {len(messages)} messages")
        except Exception as exc:  # the call itself failed: the head waits, the rest with it
            outcomes = [exc]
        delivered: list[int] = []
        for message, outcome in zip(messages, outcomes, strict=False):
            if outcome is not None:
                self.outbox.delivered_many(delivered)
                self._failed(message, outcome)
                return False
            delivered.append(message.id)
        self.outbox.delivered_many(delivered)
        return True

    def _failed(self, message: Message, error: Exception) -> None:
        """The message waits: a receiver out of reach (Transient) is routine, any other
        failure is logged as an error."""
        if isinstance(error, Transient):
            self._postpone(message, str(error), logging.INFO)
        else:
            self._postpone(message, repr(error), logging.ERROR)

    def _postpone(self, message: Message, error: str, level: int) -> None:
        delay = backoff(message.attempts)
        log.log(
            level,
            "%s: message %d (%s %s) not delivered, retry in %.1fs: %s",
            self.name,
            message.id,
            message.topic,
            message.key,
            delay,
            error,
        )
        self.outbox.postpone(message.id, self.clock.now() + timedelta(seconds=delay), error)
