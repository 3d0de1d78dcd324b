"""Database engines: SQLite (WAL) by default, PostgreSQL by URL. One place for both."""

from __future__ import annotations

import logging
import random
import re
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Connection,
    DateTime,
    Dialect,
    Engine,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Table,
    TypeDecorator,
    create_engine,
    event,
    or_,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DataError, DBAPIError, IntegrityError, SQLAlchemyError

from services.common.errors import (
    CONFLICT_STATES,
    InvalidArgument,
    first_line,
    store_problem,
)
from services.common.startup import StartupError

log = logging.getLogger(__name__)
T = TypeVar("T")


def redact(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def make_engine(url: str, *, setting: str) -> Engine:
    """An engine for ``url``; a URL that cannot be opened is a StartupError naming ``setting``."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StartupError(
            f"{setting}={redact(url)!r} is not a database URL "
            f"(sqlite:///path or postgresql://user:pass@host/db)"
        ) from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite(url, parsed.database, setting)
    if backend == "postgresql":
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        try:
            engine = create_engine(parsed, pool_pre_ping=True, pool_size=10, max_overflow=20)
        except (ArgumentError, ImportError) as exc:
            raise StartupError(f"{setting}={redact(url)!r}: {exc}") from None
        _check(engine, url, setting)
        return engine
    raise StartupError(
        f"{setting}={redact(url)!r}: unsupported database {backend!r} (use sqlite or postgresql)"
    )


def _sqlite(url: str, database: str | None, setting: str) -> Engine:
    if database and database != ":memory:":
        try:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(
                f"{setting}={url!r}: cannot create the directory for the database ({exc.strerror})"
            ) from None
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy drive transactions, and take the write lock at BEGIN so two writers
        # never deadlock upgrading a read lock.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Writers take the write lock at BEGIN; readers (see ``reader``) do not, so WAL
        # lets them read while a writer writes.
        read_only = connection.get_execution_options().get("blixard_read_only", False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    _check(engine, url, setting)
    return engine


_WRITE_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()


def write_lock(engine: Engine) -> AbstractContextManager[Any]:
    """What a write transaction holds while it runs. SQLite has one writer at a time;
    writers of this process queue on this lock instead of SQLite's busy handler, which
    sleeps and polls (long tail latencies). Other databases: no lock."""
    if engine.dialect.name != "sqlite":
        return nullcontext()
    return _WRITE_LOCKS.setdefault(engine.pool, threading.Lock())


def reader(engine: Engine) -> Engine:
    """The same engine (same pool) for read-only transactions: on SQLite they begin
    without taking the write lock. Never write through it."""
    return engine.execution_options(blixard_read_only=True)


def _check(engine: Engine, url: str, setting: str) -> None:
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        cause = (
            str(getattr(exc, "orig", exc)).strip().splitlines()[0]
            if str(getattr(exc, "orig", exc)).strip()
            else type(exc).__name__
        )
        raise StartupError(
            f"{setting}={redact(url)!r}: cannot open the database: {cause}"
        ) from None


def join_tags(tags: tuple[str, ...] | list[str]) -> str:
    """Tags in one column, ",a,b," ("" = none), so ``has_tag`` filters in SQL."""
    return f",{','.join(tags)}," if tags else ""


def split_tags(column: str) -> tuple[str, ...]:
    return tuple(tag for tag in column.split(",") if tag)


def has_tag(column: Any, tag: str) -> Any:
    """A SQL condition: the tag column holds ``tag`` or is empty (any)."""
    return or_(column == "", column.contains(f",{tag},"))


class Utf8Bytes(TypeDecorator[str]):
    """Text kept as its UTF-8 bytes (BLOB on SQLite, bytea on PostgreSQL), for text that
    comes from jobs (an error, a reason quoting it): PostgreSQL's text type refuses NUL,
    this column takes any string and gives it back unchanged. Not for filtering or sorting."""

    impl = LargeBinary
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> bytes | None:
        return None if value is None else value.encode("utf-8")

    def process_result_value(self, value: bytes | None, dialect: Dialect) -> str | None:
        return None if value is None else bytes(value).decode("utf-8")


class BulkWrite:
    """One INSERT, or one UPDATE keyed by some columns, run for many rows at once through
    the driver's executemany (SQLAlchemy's ``exec_driver_sql``). SQLAlchemy's own
    executemany processes every parameter of every row in Python, which was most of the
    queue's hot path; here a row is a tuple in ``columns`` order (then ``keys`` for an
    UPDATE) and only DateTime values (to the form SQLAlchemy itself stores on SQLite) and
    TypeDecorator values (Utf8Bytes) are converted, so either path reads what the other
    wrote."""

    def __init__(
        self,
        engine: Engine,
        table: Table,
        columns: list[str],
        keys: list[str] | None = None,
        *,
        skip_conflicts_on: list[str] | None = None,
    ) -> None:
        """``skip_conflicts_on`` (an INSERT): the columns of a unique index; a row whose
        values there are taken is not inserted (ON CONFLICT … DO NOTHING, SQLite and
        PostgreSQL alike): ``run`` then counts fewer rows than it was given."""
        mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        quote = engine.dialect.identifier_preparer.quote
        if keys is None:
            self.sql = (
                f"INSERT INTO {quote(table.name)} ({', '.join(quote(c) for c in columns)}) "
                f"VALUES ({', '.join(mark for _ in columns)})"
            )
            if skip_conflicts_on:
                unique = ", ".join(quote(c) for c in skip_conflicts_on)
                self.sql += f" ON CONFLICT ({unique}) DO NOTHING"
        else:
            self.sql = (
                f"UPDATE {quote(table.name)} SET "
                + ", ".join(f"{quote(c)} = {mark}" for c in columns)
                + " WHERE "
                + " AND ".join(f"{quote(k)} = {mark}" for k in keys)
            )
        every = columns + (keys or [])
        self._dates = (
            [i for i, name in enumerate(every) if isinstance(table.c[name].type, DateTime)]
            if engine.dialect.name == "sqlite"
            else []
        )
        # Columns of a type that converts in Python (Utf8Bytes): converted as SQLAlchemy would.
        self._converted = [
            (i, processor)
            for i, name in enumerate(every)
            if isinstance(table.c[name].type, TypeDecorator)
            and (processor := table.c[name].type.bind_processor(engine.dialect)) is not None
        ]

    def run(self, connection: Connection, rows: list[list[Any]]) -> int:
        """Write the rows (lists, converted in place); the number of rows changed."""
        if not rows:
            return 0
        if self._dates:
            # The rows of a batch share most of their datetimes (its "now", one lease
            # deadline): each distinct value is converted once.
            converted: dict[datetime, str] = {}
            for row in rows:
                for i in self._dates:
                    value = row[i]
                    if value is not None:
                        text = converted.get(value)
                        if text is None:
                            text = converted[value] = _sqlite_datetime(value)
                        row[i] = text
        if self._converted:
            for row in rows:
                for i, convert in self._converted:
                    row[i] = convert(row[i])
        result = connection.exec_driver_sql(self.sql, [tuple(row) for row in rows])
        return int(result.rowcount)


def _sqlite_datetime(value: datetime) -> str:
    """SQLAlchemy's SQLite DATETIME storage form, UTC (what its bind processor writes)."""
    if value.tzinfo is not UTC and value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.isoformat(" ", "microseconds")[:26]  # without the "+00:00"


# ---- one bad item fails alone; a lost race is retried ------------------------------------

# PostgreSQL's deadlock_detected and serialization_failure: the transaction lost a race
# and was rolled back whole; run again, it succeeds.


def is_conflict(exc: BaseException) -> bool:
    """A deadlock or serialization failure: a lost race, not an outage."""
    return isinstance(exc, DBAPIError) and getattr(exc.orig, "sqlstate", None) in CONFLICT_STATES


def conflict_pause(attempt: int) -> None:
    """A short random pause before running again a transaction that lost a race (its
    ``attempt``-th loss), so the transactions it collided with do not collide again."""
    time.sleep(random.uniform(0.0, 0.005 * 2**attempt))


def retry_conflicts(work: Callable[[], T], attempts: int = 5) -> T:
    """Run ``work`` (one whole transaction), again after a short random pause when the
    database rolled it back for a deadlock or a serialization failure; after ``attempts``
    such losses the last error, which the edge answers ABORTED / STORE_CONFLICT (try
    again), never "the database is unavailable"."""
    for attempt in range(attempts):
        try:
            return work()
        except DBAPIError as exc:
            if not is_conflict(exc):
                raise
            if attempt == attempts - 1:
                raise  # the edge answers it ABORTED / STORE_CONFLICT (errors.store_problem)
            log.info("a transaction lost a race (%s); retrying", first_line(exc))
            conflict_pause(attempt)
    raise AssertionError("unreachable")


def refused_item(exc: BaseException) -> InvalidArgument | None:
    """When the database refused a statement for the data it carried (a value out of a
    column's range, a byte it cannot store, a constraint: DataError, IntegrityError), the
    error for the one item that carried it; None for an outage, a lost race, a bug in a
    statement or anything else that is not the data's."""
    if not isinstance(exc, (DataError, IntegrityError)) or store_problem(exc) is not None:
        return None
    cause = first_line(exc.orig if exc.orig is not None else exc)
    return InvalidArgument(f"the database refused this item: {cause[:200]}", reason="VALUE_REFUSED")


_INT_RANGES: dict[type, int] = {SmallInteger: 2**15, Integer: 2**31, BigInteger: 2**63}


class ColumnLimits:
    """What a table's columns would refuse, checked in Python before a write, so one bad
    item of a batch gets its own INVALID_ARGUMENT instead of failing the statement of all:
    text longer than its column or holding NUL (PostgreSQL stores no NUL in text), an
    integer out of its column's range. The same on SQLite, which would store them."""

    def __init__(self, table: Table) -> None:
        self._text: dict[str, int | None] = {}
        self._ints: dict[str, int] = {}
        for column in table.c:
            kind = column.type
            if isinstance(kind, String):
                self._text[column.name] = kind.length
            elif type(kind) in _INT_RANGES:
                self._ints[column.name] = _INT_RANGES[type(kind)]

    def problems(self, values: Mapping[str, object]) -> list[tuple[str, str]]:
        found = []
        for name, value in values.items():
            if isinstance(value, str):
                if name not in self._text:
                    continue
                length = self._text[name]
                if length is not None and len(value) > length:
                    found.append((name, f"at most {length} characters"))
                if "\x00" in value:
                    found.append((name, "must not contain NUL (\\x00)"))
            elif isinstance(value, int) and not isinstance(value, bool):
                bound = self._ints.get(name)
                if bound is not None and not -bound <= value < bound:
                    found.append((name, f"out of range (a {bound.bit_length()}-bit integer)"))
        return found

    def check(self, values: Mapping[str, object], what: str) -> None:
        """Raise InvalidArgument naming every column ``values`` would not fit."""
        found = self.problems(values)
        if found:
            summary = "; ".join(f"{name}: {why}" for name, why in found)
            raise InvalidArgument(
                f"{what} cannot be stored: {summary}", reason="VALUE_REFUSED", violations=found
            )
