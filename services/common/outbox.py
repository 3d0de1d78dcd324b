"""The transactional outbox: a message is written in the same transaction as the change it
reports, and a relay delivers it in order, with retries and backoff, never dropping it.
Receivers are idempotent, so a redelivery after a crash is harmless.

A message that can never apply is parked after a bounded number of tries: it stays in the
table (``parked_at`` set, with its attempts and last error), is no longer delivered and no
longer holds back the later messages of its key, until an operator redrives or deletes it.

Several relays may share one PostgreSQL database (replicas of a service): each claims the
page it reads for a short lease (``claimed_by``, and ``next_attempt_at`` moved to the end of
the lease), so two relays never send the same row while both live, and a relay that dies
lets the others take its rows once the lease ends. SQLite has one process per database:
nothing is claimed there."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    DateTime,
    Engine,
    Index,
    Integer,
    String,
    Table,
    Text,
    bindparam,
    delete,
    func,
    or_,
    select,
    text,
)
from sqlalchemy import update as sql_update
from sqlalchemy.orm import Mapped, Session, declared_attr, mapped_column

from services.common import telemetry
from services.common.backoff import backoff
from services.common.clock import Clock
from services.common.db import BulkWrite, reader, write_lock
from services.common.errors import LoopFailures, NotFound
from services.common.feed import ChangeFeed

log = logging.getLogger(__name__)

CLAIM_SECONDS = 30.0  # a claim outlives any one delivery call (their deadlines are 5 s)
ERROR_CHARS = 2000  # what last_error keeps


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
    # Set when the message was parked: kept for an operator, never delivered again.
    parked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The relay that claimed the row (PostgreSQL only): its claim lasts until
    # next_attempt_at, before which no other relay takes the row.
    claimed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)

    @declared_attr.directive
    def __table_args__(cls) -> tuple[Index]:
        # Only parked rows are in it (none, mostly): an operator's list and the stats'
        # count read the parked rows, not the whole backlog.
        parked = text("parked_at IS NOT NULL")
        return (
            Index(
                f"ix_{cls.__tablename__}_parked",  # type: ignore[attr-defined]
                "id",
                sqlite_where=parked,
                postgresql_where=parked,
            ),
        )


@dataclass(frozen=True)
class Message:
    id: int
    topic: str
    key: str
    payload: dict[str, Any]
    attempts: int
    size: int = 0  # bytes of the stored payload


@dataclass(frozen=True)
class ParkedMessage:
    """A message the relay gave up on, as an operator sees it."""

    id: int
    topic: str
    key: str
    payload: str  # the stored JSON
    attempts: int
    last_error: str
    created_at: datetime
    parked_at: datetime


class Transient(Exception):
    """The receiver could not be reached; the message waits and is tried again, as long as
    it takes: it is never parked for that."""


class Stalled(Transient):
    """The receiver refuses the relay itself, not this message (a refused token, a method it
    lacks): every message waits for an operator to fix that, none is parked. Logged as an
    error."""


class Refused(Exception):
    """The receiver answered that this message cannot apply, and will not while it stays
    as it is (a definite per-message error, e.g. INVALID_ARGUMENT): parked after a few
    tries."""


# The columns add_many writes, in its rows' order.
_COLUMNS = ("topic", "key", "payload", "created_at", "next_attempt_at", "attempts", "last_error")


def _claimer() -> str:
    """Who claims rows: the host and process, readable by an operator, and unique."""
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class SqlOutbox:
    """The relay's reads and writes go through SQLAlchemy Core on the table: no ORM
    session, whose object loading and bulk-delete bookkeeping cost several times the
    statements themselves, once per relay round."""

    def __init__(
        self, engine: Engine, row: type[OutboxMixin], *, claim_seconds: float = CLAIM_SECONDS
    ) -> None:
        self._row: Any = row
        self._engine = engine
        self._reader = reader(engine)
        self._write_lock = write_lock(engine)
        table = row.__table__  # type: ignore[attr-defined]  # a mapped class
        self._table: Table = table
        self.claimer = _claimer()
        self.claim_seconds = claim_seconds
        # SQLite: one process per database, so one relay: nothing to claim.
        self._claims = engine.dialect.name == "postgresql"
        c = table.c
        live = c.parked_at.is_(None)
        now: Any = bindparam("now")
        # A message waits while an earlier live one of its key waits: postponed after a
        # failed delivery, or claimed by another relay (next_attempt_at ahead, both). The
        # first such message of each key is read on the next_attempt_at index (a few rows,
        # unless many deliveries failed), and the page is cut from the due messages NOT
        # behind one of them, before the LIMIT: a key with a long backlog held back never
        # fills the page and starves the others.
        waiting = [live, c.next_attempt_at > now]
        due = [live, c.next_attempt_at <= now]
        if self._claims:
            me: Any = bindparam("claimer")
            # This relay's own claims neither wait nor hold back: it sends them again.
            waiting.append(or_(c.claimed_by.is_(None), c.claimed_by != me))
            due = [live, or_(c.next_attempt_at <= now, c.claimed_by == me)]
        held = (
            select(c.key.label("key"), func.min(c.id).label("first"))
            .where(*waiting)
            .group_by(c.key)
            .subquery("held")
        )
        page = (
            select(c.id, c.topic, c.key, c.payload, c.attempts)
            .select_from(table.outerjoin(held, held.c.key == c.key))
            .where(*due, or_(held.c.first.is_(None), c.id < held.c.first))
            .order_by(c.id)
            .limit(bindparam("limit"))
        )
        self._due: Any = page
        if self._claims:
            # One statement claims the page: its rows are due to nobody else until the
            # lease ends (next_attempt_at), when a relay that died lets the others take
            # them. Rows another relay is claiming at this instant are skipped, not waited
            # for (they are that relay's).
            locked = page.with_only_columns(c.id).with_for_update(skip_locked=True, of=table)
            self._due = (
                sql_update(table)
                .where(c.id.in_(locked.scalar_subquery()))
                .values(claimed_by=me, next_attempt_at=bindparam("until"))
                .returning(c.id, c.topic, c.key, c.payload, c.attempts)
            )
            # Claims of one table are taken one at a time (each a short transaction): the
            # second claimer then sees the first one's claims, so it holds back the later
            # messages of their keys instead of sending them ahead of the claimed ones.
            self._serialise = text("SELECT pg_advisory_xact_lock(:key)").bindparams(
                key=zlib.crc32(f"blixard.outbox.{table.name}".encode())
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
        RUNNING before its SUCCEEDED, which would make RUNNING a late no-op). On
        PostgreSQL the page is claimed by this outbox until ``now`` + claim_seconds."""
        if not self._claims:
            with self._reader.begin() as connection:
                rows = connection.execute(self._due, {"now": now, "limit": limit}).all()
        else:
            until = now + timedelta(seconds=self.claim_seconds)
            with self._engine.begin() as connection:
                connection.execute(self._serialise)
                params = {"now": now, "limit": limit, "claimer": self.claimer, "until": until}
                rows = sorted(connection.execute(self._due, params).all(), key=lambda r: r.id)
        return [
            Message(r.id, r.topic, r.key, json.loads(r.payload), r.attempts, len(r.payload))
            for r in rows
        ]

    def release(self, now: datetime) -> None:
        """Give up this outbox's claims (a relay that stops): any relay may send them now."""
        if self._claims:
            c = self._table.c
            with self._engine.begin() as connection:
                connection.execute(
                    sql_update(self._table)
                    .where(c.claimed_by == self.claimer)
                    .values(claimed_by=None, next_attempt_at=now)
                )

    def delivered(self, message_id: int) -> None:
        self.delivered_many([message_id])

    def delivered_many(self, message_ids: list[int]) -> None:
        if message_ids:
            with self._write_lock, self._engine.begin() as connection:
                connection.execute(self._delete, {"ids": message_ids})

    def postpone(self, message_id: int, until: datetime, error: str) -> None:
        """The message waits until ``until`` (its claim ends: any relay may take it then)."""
        self._update(
            message_id,
            next_attempt_at=until,
            attempts=self._table.c.attempts + 1,
            last_error=error[:ERROR_CHARS],
            claimed_by=None,
        )

    def park(self, message_id: int, now: datetime, error: str) -> None:
        """The message is kept for an operator and no longer delivered."""
        self._update(
            message_id,
            parked_at=now,
            attempts=self._table.c.attempts + 1,
            last_error=error[:ERROR_CHARS],
            claimed_by=None,
        )

    def _update(self, message_id: int, **values: Any) -> None:
        c = self._table.c
        with self._write_lock, self._engine.begin() as connection:
            connection.execute(sql_update(self._table).where(c.id == message_id).values(values))

    def pending(self) -> int:
        """Messages still to deliver (parked ones are not)."""
        with self._reader.begin() as connection:
            query = select(func.count()).select_from(self._table)
            return connection.scalar(query.where(self._table.c.parked_at.is_(None))) or 0

    # ---- parked messages, for an operator -----------------------------------------------

    def parked(self, limit: int, after: int = 0) -> list[ParkedMessage]:
        """Parked messages in id order, from the first after ``after``."""
        c = self._table.c
        query = (
            select(c.id, c.topic, c.key, c.payload, c.attempts, c.last_error)
            .add_columns(c.created_at, c.parked_at)
            .where(c.parked_at.is_not(None), c.id > after)
            .order_by(c.id)
            .limit(limit)
        )
        with self._reader.begin() as connection:
            return [ParkedMessage(*row) for row in connection.execute(query)]

    def parked_count(self) -> int:
        c = self._table.c
        with self._reader.begin() as connection:
            query = select(func.count()).select_from(self._table).where(c.parked_at.is_not(None))
            return connection.scalar(query) or 0

    def redrive(self, message_id: int, now: datetime) -> ParkedMessage | None:
        """A parked message goes out again at once, with its tries counted from zero (it
        parks again after as many); None when no parked message has this id."""
        c = self._table.c
        with self._write_lock, self._engine.begin() as connection:
            found = self._parked_row(connection, message_id)
            if found is not None:
                connection.execute(
                    sql_update(self._table)
                    .where(c.id == message_id)
                    .values(parked_at=None, attempts=0, next_attempt_at=now)
                )
            return found

    def drop(self, message_id: int) -> ParkedMessage | None:
        """Delete a parked message for good; None when no parked message has this id."""
        with self._write_lock, self._engine.begin() as connection:
            found = self._parked_row(connection, message_id)
            if found is not None:
                connection.execute(self._delete, {"ids": [message_id]})
            return found

    def _parked_row(self, connection: Connection, message_id: int) -> ParkedMessage | None:
        c = self._table.c
        query = (
            select(c.id, c.topic, c.key, c.payload, c.attempts, c.last_error)
            .add_columns(c.created_at, c.parked_at)
            .where(c.id == message_id, c.parked_at.is_not(None))
        )
        if self._claims:
            query = query.with_for_update()
        row = connection.execute(query).first()
        return ParkedMessage(*row) if row is not None else None


class ParkedMessages:
    """An operator's use cases on the parked messages of one outbox (each service with an
    outbox hands them out: ListParkedMessages, RedriveParkedMessage, DeleteParkedMessage)."""

    def __init__(self, outbox: SqlOutbox, clock: Clock, feed: ChangeFeed) -> None:
        self.outbox = outbox
        self.clock = clock
        self.feed = feed  # the relay's: a redriven message goes at once

    def page(self, page_size: int, after: int) -> tuple[list[ParkedMessage], int, int]:
        """Parked messages in id order after ``after``, the id the next page starts after
        (0: no next page), and how many are parked in all."""
        found = self.outbox.parked(page_size + 1, after)
        last = found[page_size - 1].id if len(found) > page_size else 0
        return found[:page_size], last, self.outbox.parked_count()

    def redrive(self, message_id: int) -> ParkedMessage:
        message = self.outbox.redrive(message_id, self.clock.now())
        if message is None:
            raise NotFound("parked message", str(message_id))
        self.feed.changed()
        return message

    def delete(self, message_id: int) -> ParkedMessage:
        message = self.outbox.drop(message_id)
        if message is None:
            raise NotFound("parked message", str(message_id))
        return message


# A receiver that takes several messages in one call answers, for each in order, None
# (delivered) or the exception that kept it from being delivered (Transient: try later;
# Refused: it cannot apply). The same exception object for several messages means the
# call that carried them failed as a whole (none of them is to blame).
DeliverMany = Callable[[list[Message]], list[Exception | None]]


class Relay:
    """Delivers due messages in id order. A message that fails ends the round and waits
    with exponential backoff (the messages after it go in the next round, but for those
    of its key, which wait for it); nothing is dropped. With ``deliver_many`` a batch
    goes in one call; the messages before the first that failed count as delivered, the
    rest are sent again (receivers are idempotent).

    A message the receiver refuses (``Refused``) is parked after ``refused_tries`` tries,
    one that fails for another reason (an unexpected answer, a bug) after ``max_tries``;
    one that fails because the receiver is out of reach (``Transient``) is never parked.
    A batch call that fails as a whole, for a reason other than an unreachable receiver,
    blames none of its messages: they go one per call until the one that fails alone is
    found (it alone counts a try), then in batches again."""

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
        refused_tries: int = 3,
        max_tries: int = 10,
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
        self.refused_tries = refused_tries
        self.max_tries = max_tries
        # After a batch call failed as a whole: messages up to this id go one per call.
        self._one_by_one_until = 0
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
            if self._thread.is_alive():
                return  # still sending: its claims end with their lease
        try:  # another replica sends at once what this one claimed and did not send
            self.outbox.release(self.clock.now())
        except Exception as exc:  # the database is gone: the claims end with their lease
            log.warning("%s: claims not released: %s", self.name, exc)

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
            count = 1 if messages[0].id <= self._one_by_one_until else self._fits(messages)
            more = count < len(messages) or len(messages) == self.batch
            return self._send_many(messages[:count]) and more
        for message in messages:
            if self._stopping.is_set() or not self._send(message):
                return False
        return len(messages) == self.batch

    def _fits(self, messages: list[Message]) -> int:
        """How many of the first messages fit in batch_bytes (at least one)."""
        size, count = 0, 0
        for message in messages:
            size += message.size
            if count and size > self.batch_bytes:
                break
            count += 1
        return count

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
        except Exception as exc:  # the call itself failed: its answer for each message
            outcomes = [exc] * len(messages)
        delivered: list[int] = []
        for index, (message, outcome) in enumerate(zip(messages, outcomes, strict=True)):
            if outcome is None:
                delivered.append(message.id)
                continue
            self.outbox.delivered_many(delivered)
            rest = messages[index:]
            # One exception answered for several messages is the failure of the call that
            # carried them (a receiver's batch call, or the whole call): which message made
            # it fail is not known. Unless the receiver is merely out of reach, none is
            # blamed: they go one per call until the one that fails alone is found.
            if (
                len(rest) > 1
                and outcomes[index + 1] is outcome
                and not isinstance(outcome, Transient)
            ):
                self._one_by_one_until = rest[-1].id
                log.warning(
                    "%s: a call of %d messages failed, sending them one by one: %r",
                    self.name,
                    len(rest),
                    outcome,
                )
            else:
                self._failed(message, outcome)  # the head waits, the rest with it
            return False
        self.outbox.delivered_many(delivered)
        return True

    def _failed(self, message: Message, error: Exception) -> None:
        """The message waits, or is parked once it had its tries: a receiver out of reach
        (Transient) is routine and never parks a message, any other failure is logged as
        an error."""
        if not isinstance(error, Transient):
            self._one_by_one_until = 0  # found: the rest go in batches again
        tries = message.attempts + 1
        if isinstance(error, Refused) and tries >= self.refused_tries:
            self._park(message, str(error))
        elif not isinstance(error, Transient | Refused) and tries >= self.max_tries:
            self._park(message, repr(error))
        elif isinstance(error, Transient):
            level = logging.ERROR if isinstance(error, Stalled) else logging.INFO
            self._postpone(message, str(error), level)
        else:
            self._postpone(message, str(error) if isinstance(error, Refused) else repr(error))

    def _park(self, message: Message, error: str) -> None:
        log.error(
            "%s: message %d (%s %s) parked after %d tries, no longer delivered; the later "
            "messages of %s go on without it: %s",
            self.name,
            message.id,
            message.topic,
            message.key,
            message.attempts + 1,
            message.key,
            error,
        )
        self.outbox.park(message.id, self.clock.now(), error)

    def _postpone(self, message: Message, error: str, level: int = logging.ERROR) -> None:
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
