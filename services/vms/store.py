"""The VM registry: one row per VM (state as JSON, its kind beside it), and its events."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session

from services.common.clock import to_utc
from services.common.db import reader
from services.vms import domain
from services.vms.domain import Kind, Vm
from services.vms.models import VmEventRow, VmRow

log = logging.getLogger(__name__)


def _to_vm(row: VmRow) -> Vm:
    try:
        state, legacy = domain.parse_stored(row.state)
    except domain.StateFormatError as exc:
        # A row nobody can read is kept and shown as failed, never dropped or emptied.
        state, legacy = domain.Failed(f"unreadable stored state: {exc}"), True
    return Vm(
        vm_id=row.vm_id,
        state=state,
        vcpus=row.vcpus,
        memory_mb=row.memory_mb,
        backend=row.backend,
        created_at=to_utc(row.created_at),
        updated_at=to_utc(row.updated_at),
        pid=row.pid,
        directory=row.directory,
        accelerator=row.accelerator,
        pooled=row.pooled,
        jobs_run=row.jobs_run,
        needs_migration=legacy,
    )


def _fill(row: VmRow, vm: Vm) -> None:
    row.state = domain.to_json(vm.state)
    row.kind = vm.state.kind.value
    row.vcpus = vm.vcpus
    row.memory_mb = vm.memory_mb
    row.backend = vm.backend
    row.pid = vm.pid
    row.directory = vm.directory
    row.accelerator = vm.accelerator
    row.pooled = vm.pooled
    row.jobs_run = vm.jobs_run
    row.created_at = vm.created_at
    row.updated_at = vm.updated_at


class VmStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._reader = reader(engine)

    def save(self, vm: Vm, detail: str = "", *, event: bool = True) -> None:
        """Insert or update the VM, and record the transition, in one transaction."""
        with Session(self.engine) as session, session.begin():
            row = session.get(VmRow, vm.vm_id)
            if row is None:
                row = VmRow(vm_id=vm.vm_id)
                session.add(row)
            _fill(row, vm)
            if event:
                session.add(
                    VmEventRow(
                        vm_id=vm.vm_id,
                        at=vm.updated_at,
                        kind=vm.state.kind.value,
                        state=domain.to_json(vm.state),
                        detail=detail,
                    )
                )

    def get(self, vm_id: str) -> Vm | None:
        with Session(self._reader) as session, session.begin():
            row = session.get(VmRow, vm_id)
            return _to_vm(row) if row is not None else None

    def select(self, kinds: Iterable[Kind] = ()) -> list[Vm]:
        wanted = [kind.value for kind in kinds]
        query = select(VmRow).order_by(VmRow.created_at, VmRow.vm_id)
        if wanted:
            query = query.where(VmRow.kind.in_(wanted))
        with Session(self._reader) as session, session.begin():
            return [_to_vm(row) for row in session.scalars(query)]

    def live(self) -> list[Vm]:
        return [vm for vm in self.select() if vm.state.kind in domain.LIVE]

    def events(self, vm_id: str) -> list[tuple[datetime, str, str, str]]:
        query = select(VmEventRow).where(VmEventRow.vm_id == vm_id).order_by(VmEventRow.id)
        with Session(self._reader) as session, session.begin():
            return [
                (to_utc(row.at), row.kind, row.state, row.detail) for row in session.scalars(query)
            ]

    def migrate_legacy(self, now: datetime) -> list[Vm]:
        """Rewrite every row stored in the legacy text form as JSON, keeping every field;
        the VMs rewritten (as they now read)."""
        rewritten = []
        with Session(self.engine) as session, session.begin():
            for row in session.scalars(select(VmRow)):
                vm = _to_vm(row)
                if not vm.needs_migration:
                    continue
                legacy_text = row.state
                _fill(row, vm)
                session.add(
                    VmEventRow(
                        vm_id=vm.vm_id,
                        at=now,
                        kind=vm.state.kind.value,
                        state=row.state,
                        detail=f"migrated from the legacy form {legacy_text!r}",
                    )
                )
                log.info("VM %s: legacy state %r rewritten as JSON", vm.vm_id, legacy_text)
                rewritten.append(vm)
        return rewritten

    def prune(self, before: datetime) -> int:
        """Forget VMs that ended before ``before`` (and their events)."""
        ended = [kind.value for kind in domain.ENDED]
        with Session(self.engine) as session, session.begin():
            ids = list(
                session.scalars(
                    select(VmRow.vm_id).where(VmRow.kind.in_(ended), VmRow.updated_at < before)
                )
            )
            if ids:
                session.execute(delete(VmEventRow).where(VmEventRow.vm_id.in_(ids)))
                session.execute(delete(VmRow).where(VmRow.vm_id.in_(ids)))
            return len(ids)
