"""The queue service's tables (SQLAlchemy 2.x)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.expression import false

from services.common.db import Utf8Bytes
from services.common.outbox import OutboxMixin


class Base(DeclarativeBase):
    pass


class ItemRow(Base):
    __tablename__ = "items"

    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    generation: Mapped[int] = mapped_column(Integer)
    spec: Mapped[bytes] = mapped_column(LargeBinary)  # a serialized JobSpec
    state: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer)
    run_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    seq: Mapped[int] = mapped_column(BigInteger)
    max_attempts: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    # ",process,vm," (empty = any worker type), so a claim filters in SQL.
    worker_types: Mapped[str] = mapped_column(String(600))
    labels: Mapped[str] = mapped_column(Text)
    lease_token: Mapped[str | None] = mapped_column(String(64), unique=True)
    lease_deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_seconds: Mapped[float] = mapped_column(Float)
    worker_id: Mapped[str] = mapped_column(String(256))
    version: Mapped[int] = mapped_column(BigInteger)
    cancel_requested: Mapped[bool] = mapped_column(Boolean)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    # The job's own bytes and any text: PostgreSQL's text would refuse a NUL in them.
    output_tail: Mapped[bytes] = mapped_column(LargeBinary)
    error: Mapped[str] = mapped_column(Utf8Bytes)
    report_seq: Mapped[int] = mapped_column(BigInteger)
    trace_context: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_items_available", "state", "priority", "seq"),
        Index("ix_items_deadline", "state", "lease_deadline"),
        Index("ix_items_worker", "worker_id", "state"),
    )


class WorkerRow(Base):
    __tablename__ = "workers"

    worker_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    worker_type: Mapped[str] = mapped_column(String(64))
    labels: Mapped[str] = mapped_column(Text)
    slots: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    drained: Mapped[bool] = mapped_column(Boolean, server_default=false())


class NextGenerationRow(Base):
    """A job's next generation, held while its current one still holds a lease (it
    replaces the item once that lease ends), or a cancel that came before its enqueue."""

    __tablename__ = "next_generations"

    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    generation: Mapped[int] = mapped_column(Integer)
    cancelled: Mapped[bool] = mapped_column(Boolean)
    spec: Mapped[bytes] = mapped_column(LargeBinary)
    priority: Mapped[int] = mapped_column(Integer)
    max_attempts: Mapped[int] = mapped_column(Integer)
    run_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    worker_types: Mapped[str] = mapped_column(String(600))
    labels: Mapped[str] = mapped_column(Text)
    trace_context: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class OutboxRow(OutboxMixin, Base):
    """Reports to the jobs service, written in the same transaction as the transition."""

    __tablename__ = "outbox"
