"""Database engines: SQLite (WAL) by default, PostgreSQL by URL. One place for both."""

from __future__ import annotations

import re
import threading
import weakref
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, or_, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from services.common.startup import StartupError


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
