"""The VM service's tables (SQLAlchemy 2.x): the VM registry and its events."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, DateTime, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class VmRow(Base):
    __tablename__ = "vms"

    vm_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # The state as JSON ({"state": "busy", "job_id": ..}); rows of the old system hold the
    # legacy text form until recovery rewrites them.
    state: Mapped[str] = mapped_column(Text)
    # The state's bare kind ("busy"), for filters and counts; never the serialised form.
    kind: Mapped[str] = mapped_column(String(16))
    vcpus: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(Integer)
    backend: Mapped[str] = mapped_column(String(16))
    pid: Mapped[int] = mapped_column(Integer)
    directory: Mapped[str] = mapped_column(Text)
    accelerator: Mapped[str] = mapped_column(String(16))
    pooled: Mapped[bool] = mapped_column(Boolean)
    jobs_run: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_vms_kind", "kind", "created_at"),)


class VmEventRow(Base):
    """Every transition of every VM, with why."""

    __tablename__ = "vm_events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    vm_id: Mapped[str] = mapped_column(String(64), index=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(Text)
    detail: Mapped[str] = mapped_column(Text)
