"""The jobs service's tables (SQLAlchemy 2.x)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.common.db import Utf8Bytes
from services.common.outbox import OutboxMixin


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"

    job_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    request_id: Mapped[str | None] = mapped_column(String(256), unique=True)
    spec_json: Mapped[str] = mapped_column(Text)
    spec_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    generation: Mapped[int] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer)
    attempts_base: Mapped[int] = mapped_column(Integer)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    # The job's own bytes and any text: PostgreSQL's text would refuse a NUL in them.
    output_tail: Mapped[bytes] = mapped_column(LargeBinary)
    error: Mapped[str] = mapped_column(Utf8Bytes)
    worker_id: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_sequence: Mapped[int] = mapped_column(BigInteger)
    trace_context: Mapped[str] = mapped_column(Text)
    # ",process,vm," from spec.requirements.worker_types ("" = any), for ListJobs filters.
    worker_types: Mapped[str] = mapped_column(String(600))
    # Bytes of output the latest finished attempt wrote (reported by its worker).
    output_bytes: Mapped[int] = mapped_column(BigInteger, server_default="0")

    __table_args__ = (
        Index("ix_jobs_created", "created_at", "job_id"),
        Index("ix_jobs_state_created", "state", "created_at", "job_id"),
    )


class JobEventRow(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(String(36), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(String(300))
    reason: Mapped[str] = mapped_column(Utf8Bytes)  # may quote a job's error


class JobLabelRow(Base):
    """A job's labels, one row each, so ListJobs filters by label with an index."""

    __tablename__ = "job_labels"

    job_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    key: Mapped[str] = mapped_column(String(63), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))

    __table_args__ = (Index("ix_job_labels_key_value", "key", "value", "job_id"),)


class JobOutputRow(Base):
    """Where the stored output of one job generation stands: the execution it comes from
    (its latest attempt) and the offset after the last byte received."""

    __tablename__ = "job_outputs"

    job_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    generation: Mapped[int] = mapped_column(Integer, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)
    execution_id: Mapped[str] = mapped_column(String(64))
    next_offset: Mapped[int] = mapped_column(BigInteger)


class JobOutputChunkRow(Base):
    """Output bytes [start_offset, end_offset) of a generation's latest attempt. Small chunks
    are merged into the last row, so a generation has a handful of rows."""

    __tablename__ = "job_output_chunks"

    job_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    generation: Mapped[int] = mapped_column(Integer, primary_key=True)
    start_offset: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    end_offset: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class OutboxRow(OutboxMixin, Base):
    """Messages to the queue, written in the same transaction as the change they report."""

    __tablename__ = "outbox"
