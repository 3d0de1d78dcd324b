"""The queue store: the source of truth. Every write of an item is a conditional update on
its version, so two replicas on one database are arbitrated by the database."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Engine,
    Table,
    bindparam,
    delete,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import sessionmaker

from services.common.clock import to_utc
from services.common.db import (
    BulkWrite,
    ColumnLimits,
    has_tag,
    join_tags,
    reader,
    split_tags,
    write_lock,
)
from services.common.errors import Aborted
from services.common.feed import ChangeFeed
from services.common.outbox import SqlOutbox
from services.queue.cache import Entry
from services.queue.domain import (
    Item,
    ItemState,
    NewItem,
    NextGeneration,
    Report,
    Worker,
    WorkerState,
)
from services.queue.models import ItemRow, NextGenerationRow, OutboxRow, WorkerRow

Fault = Callable[[str], None]
ITEMS = cast(Table, ItemRow.__table__)
ITEM_COLUMNS = list(ITEMS.c)
WORKERS = cast(Table, WorkerRow.__table__)
NEXT = cast(Table, NextGenerationRow.__table__)


# What a state transition (lease, heartbeat, complete, fail, release, cancel, expire,
# redrive) may change; the rest of an item is fixed for its generation. A unit test holds
# the queue's domain to this list.
TRANSITION_FIELDS = (
    "state",
    "run_at",
    "attempt",
    "lease_token",
    "lease_deadline",
    "lease_seconds",
    "worker_id",
    "version",
    "cancel_requested",
    "exit_code",
    "output_tail",
    "error",
    "report_seq",
    "updated_at",
)


# The hot path's reads, built once: the IN list expands at execution.
# Every statement that locks several items locks them in job_id order (items before
# workers), so two transactions never hold locks the other waits for.
_GET_MANY = (
    select(*ITEM_COLUMNS)
    .where(ITEMS.c.job_id.in_(bindparam("keys", expanding=True)))
    .order_by(ITEMS.c.job_id)
    .with_for_update()
)
_DRAINED = select(WORKERS.c.worker_id).where(
    WORKERS.c.worker_id.in_(bindparam("keys", expanding=True)), WORKERS.c.drained
)
# The best waiting items for a worker type (a claim with nothing in the index reads it
# to pick up what other replicas enqueued). "any" is "" to include items that accept
# every type, None to leave them out (a NULL comparison matches nothing).
_WAITING = (
    select(*ITEM_COLUMNS)
    .where(
        ITEMS.c.state == ItemState.WAITING.value,
        ITEMS.c.run_at <= bindparam("now"),
        or_(
            ITEMS.c.worker_types == bindparam("any"),
            ITEMS.c.worker_types.contains(bindparam("tag")),
        ),
    )
    .order_by(ITEMS.c.priority.desc(), ITEMS.c.seq, ITEMS.c.job_id)
    .limit(bindparam("limit"))
)
# Of those, the items whose required labels (a JSON object) are all among ``carried``, the
# worker's (a JSON object too): in SQL, so a page of items requiring labels the worker
# lacks cannot hide one it may take.
_WAITING_CARRIED = {
    "postgresql": _WAITING.where(
        text("CAST(items.labels AS jsonb) <@ CAST(:carried AS jsonb)").bindparams(
            bindparam("carried")
        )
    ),
    "sqlite": _WAITING.where(
        text(
            "NOT EXISTS (SELECT 1 FROM json_each(items.labels) AS required WHERE NOT EXISTS "
            "(SELECT 1 FROM json_each(:carried) AS has "
            "WHERE has.key = required.key AND has.value = required.value))"
        ).bindparams(bindparam("carried"))
    ),
}
_BY_TOKENS = (
    select(*ITEM_COLUMNS)
    .where(ITEMS.c.lease_token.in_(bindparam("keys", expanding=True)))
    .order_by(ITEMS.c.job_id)
    .with_for_update()
)
_ITEM_LIMITS = ColumnLimits(ITEMS)
_WORKER_LIMITS = ColumnLimits(WORKERS)


def check_item(item: Item) -> None:
    """InvalidArgument naming each field of the item its column cannot hold."""
    _ITEM_LIMITS.check(_columns(item), f"item {item.job_id}")


def check_transition(item: Item) -> None:
    """As check_item, for the fields a transition writes."""
    _ITEM_LIMITS.check(
        dict(zip(TRANSITION_FIELDS, _transition_values(item), strict=True)),
        f"item {item.job_id}",
    )


@dataclass(frozen=True)
class _Writes:
    """The store's batch writes, built once per engine (conditional on the version)."""

    save: BulkWrite  # the transition fields
    replace: BulkWrite  # every column


def no_faults(point: str) -> None:
    """Tests inject store failures at "before_write", "after_write", "commit" (all
    before the database commits) and "after_commit"."""


class Transaction:
    """One store transaction on a SQLAlchemy Core connection (no ORM session: its unit of
    work and identity map cost more per transaction than the queue's whole write)."""

    def __init__(
        self, connection: Connection, outbox: SqlOutbox, fault: Fault, writes: _Writes
    ) -> None:
        self.connection = connection
        self._outbox = outbox
        self._fault = fault
        self._writes = writes
        self.reported = False  # a report was written: the relay has work once this commits
        # The job ids of every item written: if the transaction fails, perhaps after the
        # database committed, the cache reads these back from the store.
        self.written: list[str] = []

    def get_many(self, job_ids: list[str]) -> dict[str, Item]:
        """The items, locked for this transaction, by job id (missing ones absent)."""
        rows = self.connection.execute(_GET_MANY, {"keys": job_ids})
        return {row.job_id: _item(row) for row in rows}

    def drained_workers(self, worker_ids: list[str]) -> set[str]:
        """Which of these workers are drained (may claim nothing)."""
        return set(self.connection.scalars(_DRAINED, {"keys": worker_ids}))

    def by_tokens(self, tokens: list[str]) -> dict[str, Item]:
        rows = self.connection.execute(_BY_TOKENS, {"keys": tokens})
        return {row.lease_token: _item(row) for row in rows}

    def save_many(self, changes: list[tuple[Item, int]]) -> None:
        """Write each (item, version it was read at)'s transition fields if nobody changed
        the item since; one statement for all. A conflict aborts the whole transaction."""
        self._update_many(self._writes.save, changes, _transition_values)

    def replace_many(self, changes: list[tuple[Item, int]]) -> None:
        """As save_many, writing the whole item (a new generation replaces the old)."""
        self._update_many(self._writes.replace, changes, _replace_values)

    def _update_many(
        self,
        statement: BulkWrite,
        changes: list[tuple[Item, int]],
        values_of: Callable[[Item], list[Any]],
    ) -> None:
        if not changes:
            return
        self._fault("before_write")
        self.written.extend(item.job_id for item, _ in changes)
        rows = []
        for item, expected in changes:
            item.version = expected + 1
            row = values_of(item)
            row.append(item.job_id)
            row.append(expected)
            rows.append(row)
        changed = statement.run(self.connection, rows)
        if changed not in (len(rows), -1):
            raise Aborted("items were changed concurrently", reason="CONFLICT")

    def report_many(self, reports: list[Report]) -> None:
        self.reported = self.reported or bool(reports)
        self._outbox.add_many(
            self.connection, [("status", r.job_id, _payload(r), r.at) for r in reports]
        )

    # ---- items ------------------------------------------------------------------------

    def get(self, job_id: str, *, for_update: bool = False) -> Item | None:
        query = select(*ITEM_COLUMNS).where(ITEMS.c.job_id == job_id)
        if for_update:
            query = query.with_for_update()
        row = self.connection.execute(query).first()
        return _item(row) if row else None

    def insert_new(self, items: list[Item]) -> set[str]:
        """Insert the items whose job id is not taken, in job_id order; the job ids
        inserted. An item a concurrent transaction inserted first is left as it is (a
        duplicate enqueue is no error): the caller reads it back."""
        if not items:
            return set()
        self._fault("before_write")
        items = sorted(items, key=lambda item: item.job_id)
        self.written.extend(item.job_id for item in items)
        dialect = postgresql if self.connection.dialect.name == "postgresql" else sqlite
        statement = (
            dialect.insert(ITEMS)
            .on_conflict_do_nothing(index_elements=["job_id"])
            .returning(ITEMS.c.job_id)
        )
        return set(self.connection.scalars(statement, [_columns(item) for item in items]))

    def savepoint(self) -> AbstractContextManager[Any]:
        """A savepoint: what is written inside is undone alone if it raises."""
        return self.connection.begin_nested()

    def save(self, item: Item, expected_version: int) -> None:
        """Write the item if nobody changed it since it was read (version check)."""
        self._fault("before_write")
        self.written.append(item.job_id)
        item.version = expected_version + 1
        result = self.connection.execute(
            update(ITEMS)
            .where(ITEMS.c.job_id == item.job_id, ITEMS.c.version == expected_version)
            .values(**_columns(item))
        )
        if result.rowcount != 1:
            raise Aborted(
                f"item {item.job_id} was changed concurrently",
                reason="CONFLICT",
                metadata={"job_id": item.job_id},
            )

    def overdue(self, now: datetime) -> list[tuple[str, datetime, float]]:
        """(token, deadline, lease length) of every lease past its deadline, earliest
        first; read without locks (the reaper locks those it ends, by token)."""
        c = ITEMS.c
        query = (
            select(c.lease_token, c.lease_deadline, c.lease_seconds)
            .where(c.state == ItemState.LEASED.value, c.lease_deadline < now)
            .order_by(c.lease_deadline)
        )
        return [
            (row.lease_token, to_utc(row.lease_deadline), row.lease_seconds)
            for row in self.connection.execute(query)
        ]

    def lock_leases(self, tokens: list[str], worker_ids: list[str]) -> list[Item]:
        """The leased items holding one of these tokens or leased by one of these workers,
        locked in job_id order (the reaper locks items before workers, as a heartbeat does)."""
        c = ITEMS.c
        held = []
        if tokens:
            held.append(c.lease_token.in_(tokens))
        if worker_ids:
            held.append(c.worker_id.in_(worker_ids))
        if not held:
            return []
        query = (
            select(*ITEM_COLUMNS)
            .where(c.state == ItemState.LEASED.value, or_(*held))
            .order_by(c.job_id)
            .with_for_update()
        )
        return [_item(row) for row in self.connection.execute(query)]

    def report(self, report: Report) -> None:
        self.report_many([report])

    # ---- next generations (held while the current one holds a lease) ------------------

    def next_generation(self, job_id: str) -> NextGeneration | None:
        query = select(NEXT).where(NEXT.c.job_id == job_id).with_for_update()
        row = self.connection.execute(query).first()
        return _next(row) if row else None

    def put_next(self, held: NextGeneration) -> None:
        """Hold ``held`` as its job's next generation (replacing an older one held)."""
        self._fault("before_write")
        new = held.new
        values = dict(
            job_id=new.job_id,
            generation=new.generation,
            cancelled=held.cancelled,
            spec=new.spec,
            priority=new.priority,
            max_attempts=new.max_attempts,
            run_at=new.run_at,
            worker_types=join_tags(new.worker_types),
            labels=json.dumps(new.labels),
            trace_context=json.dumps(new.trace_context),
            created_at=held.created_at,
        )
        dialect = postgresql if self.connection.dialect.name == "postgresql" else sqlite
        statement = dialect.insert(NEXT).values(**values)
        changed = {k: v for k, v in values.items() if k != "job_id"}
        self.connection.execute(
            statement.on_conflict_do_update(index_elements=["job_id"], set_=changed)
        )

    def drop_next(self, job_id: str) -> None:
        self.connection.execute(delete(NEXT).where(NEXT.c.job_id == job_id))

    # ---- workers ----------------------------------------------------------------------

    def worker(self, worker_id: str) -> Worker | None:
        query = select(WORKERS).where(WORKERS.c.worker_id == worker_id).with_for_update()
        row = self.connection.execute(query).first()
        return _worker(row) if row else None

    def put_worker(self, worker: Worker) -> None:
        """Insert or update the worker (one upsert statement on either database)."""
        values = dict(
            worker_id=worker.worker_id,
            worker_type=worker.worker_type,
            labels=json.dumps(worker.labels),
            slots=worker.slots,
            state=worker.state.value,
            last_seen=worker.last_seen,
            drained=worker.drained,
        )
        _WORKER_LIMITS.check(values, f"worker {worker.worker_id[:64]!r}")
        dialect = postgresql if self.connection.dialect.name == "postgresql" else sqlite
        statement = dialect.insert(WORKERS).values(**values)
        changed = {k: v for k, v in values.items() if k != "worker_id"}
        self.connection.execute(
            statement.on_conflict_do_update(index_elements=["worker_id"], set_=changed)
        )

    def purge_workers(self, cutoff: datetime, limit: int) -> int:
        """Delete up to ``limit`` workers offline since before ``cutoff`` that hold no
        lease; how many were deleted. A worker heard from since is ONLINE or DRAINING
        again, and stays."""
        w, i = WORKERS.c, ITEMS.c
        holds = select(i.job_id).where(
            i.worker_id == w.worker_id, i.state == ItemState.LEASED.value
        )
        gone = (
            select(w.worker_id)
            .where(w.state == WorkerState.OFFLINE.value, w.last_seen < cutoff, ~holds.exists())
            .order_by(w.last_seen)
            .limit(limit)
        )
        ids = list(self.connection.scalars(gone))
        if not ids:
            return 0
        result = self.connection.execute(
            delete(WORKERS).where(
                w.worker_id.in_(ids),
                w.state == WorkerState.OFFLINE.value,
                w.last_seen < cutoff,
            )
        )
        return result.rowcount

    def silent_workers(
        self, cutoff: datetime, *, among: list[str] | None = None, lock: bool = True
    ) -> list[Worker]:
        """The workers not offline and not seen since ``cutoff`` (of ``among``, if given),
        in worker_id order. Locked (the default), so a drain, registration or heartbeat
        that another replica commits meanwhile is waited for (and re-checked), not
        overwritten with what was read."""
        if among is not None and not among:
            return []
        query = (
            select(WORKERS)
            .where(WORKERS.c.state != WorkerState.OFFLINE.value, WORKERS.c.last_seen < cutoff)
            .order_by(WORKERS.c.worker_id)
        )
        if among is not None:
            query = query.where(WORKERS.c.worker_id.in_(among))
        if lock:
            query = query.with_for_update()
        return [_worker(row) for row in self.connection.execute(query)]


class QueueStore:
    def __init__(self, engine: Engine, fault: Fault = no_faults) -> None:
        self.engine = engine
        self._reader = reader(engine)
        self._reads = sessionmaker(self._reader, expire_on_commit=False)
        self.outbox = SqlOutbox(engine, OutboxRow)
        self.fault = fault
        self._write_lock = write_lock(engine)
        # Changes once a transaction that wrote reports commits: the outbox relay waits
        # on it (a claim wakes it too, though it wakes no long poll).
        self.reports = ChangeFeed()
        keys = ["job_id", "version"]
        self._writes = _Writes(
            save=BulkWrite(engine, ITEMS, list(TRANSITION_FIELDS), keys),
            replace=BulkWrite(engine, ITEMS, [c.name for c in ITEM_COLUMNS], keys),
        )

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        with self._write_lock, self.engine.begin() as connection:
            tx = Transaction(connection, self.outbox, self.fault, self._writes)
            yield tx
            self.fault("after_write")
            self.fault("commit")
        if tx.reported:
            self.reports.changed()
        # Committed, yet the caller may still see an error (a connection lost as the
        # database answered the COMMIT): tests fail here too.
        self.fault("after_commit")

    def live_items(self, batch: int = 10_000) -> Iterator[Item]:
        """Every waiting or leased item, in pages (to fill the cache at start-up)."""
        after = ""
        while True:
            query = (
                select(*ITEM_COLUMNS)
                .where(
                    ITEMS.c.state.in_([ItemState.WAITING.value, ItemState.LEASED.value]),
                    ITEMS.c.job_id > after,
                )
                .order_by(ITEMS.c.job_id)
                .limit(batch)
            )
            with self._reads() as session:
                page = [_item(row) for row in session.execute(query)]
            yield from page
            if len(page) < batch:
                return
            after = page[-1].job_id

    def live_entries(self, batch: int = 50_000) -> Iterator[Entry]:
        """Cache entries of every live item, reading only the columns they need (the
        start-up load of a large queue)."""
        c = ITEMS.c
        after = ""
        while True:
            query = (
                select(
                    c.job_id,
                    c.version,
                    c.state,
                    c.priority,
                    c.seq,
                    c.run_at,
                    c.worker_types,
                    c.labels,
                )
                .where(
                    c.state.in_([ItemState.WAITING.value, ItemState.LEASED.value]), c.job_id > after
                )
                .order_by(c.job_id)
                .limit(batch)
            )
            with self._reads() as session:
                rows = session.execute(query).all()
            for row in rows:
                labels = json.loads(row.labels) if row.labels != "{}" else {}
                yield Entry(
                    row.job_id,
                    row.version,
                    ItemState(row.state),
                    row.priority,
                    row.seq,
                    to_utc(row.run_at).timestamp(),
                    split_tags(row.worker_types),
                    tuple(sorted(labels.items())),
                )
            if len(rows) < batch:
                return
            after = rows[-1].job_id

    def waiting(
        self,
        worker_type: str,
        now: datetime,
        limit: int,
        named_only: bool = False,
        *,
        carried: dict[str, str] | None = None,
    ) -> list[Item]:
        """The best waiting items for a worker type (``carried``: of those whose required
        labels are all among these), read without locks (to pick up what another replica
        enqueued)."""
        params: dict[str, Any] = {
            "now": now,
            "any": None if named_only else "",
            "tag": f",{worker_type},",
            "limit": limit,
        }
        query = _WAITING
        if carried is not None:
            query = _WAITING_CARRIED[self.engine.dialect.name]
            params["carried"] = json.dumps(carried)
        with self._reader.connect() as connection:
            return [_item(row) for row in connection.execute(query, params)]

    def get(self, job_id: str) -> Item | None:
        with self._reads() as session:
            row = session.get(ItemRow, job_id)
            return _item(row) if row else None

    def counts(self) -> dict[str, int]:
        query = select(ItemRow.state, func.count()).group_by(ItemRow.state)
        with self._reads() as session:
            return {state: count for state, count in session.execute(query).all()}

    def waiting_by_worker_types(self) -> dict[str, int]:
        query = (
            select(ItemRow.worker_types, func.count())
            .where(ItemRow.state == ItemState.WAITING.value)
            .group_by(ItemRow.worker_types)
        )
        with self._reads() as session:
            return {",".join(split_tags(t)) or "any": n for t, n in session.execute(query).all()}

    def leases_expiring(self, before: datetime) -> int:
        query = (
            select(func.count())
            .select_from(ItemRow)
            .where(ItemRow.state == ItemState.LEASED.value, ItemRow.lease_deadline < before)
        )
        with self._reads() as session:
            return session.scalar(query) or 0

    def list_items(
        self, *, limit: int, after: str, states: list[ItemState], worker_type: str
    ) -> list[Item]:
        query = select(*ITEM_COLUMNS).where(ITEMS.c.job_id > after).order_by(ITEMS.c.job_id)
        if states:
            query = query.where(ITEMS.c.state.in_([s.value for s in states]))
        if worker_type:
            query = query.where(has_tag(ITEMS.c.worker_types, worker_type))
        with self._reads() as session:
            return [_item(row) for row in session.execute(query.limit(limit))]

    def oldest_due(self, now: datetime) -> datetime | None:
        """Since when the longest-waiting claimable item has been claimable: the earliest
        run_at of the waiting items due by ``now`` (a delayed or backing-off item is not
        waiting for a worker yet)."""
        query = select(func.min(ItemRow.run_at)).where(
            ItemRow.state == ItemState.WAITING.value, ItemRow.run_at <= now
        )
        with self._reads() as session:
            value = session.scalar(query)
            return to_utc(value) if value else None

    def workers(self) -> list[Worker]:
        with self._reads() as session:
            return [
                _worker(r) for r in session.scalars(select(WorkerRow).order_by(WorkerRow.worker_id))
            ]


_REPORT_FIELDS = tuple(f.name for f in fields(Report))


def _payload(report: Report) -> dict[str, object]:
    """The report as JSON: ``at`` in ISO form, the output tail's bytes in base64 under
    ``output_tail_base64`` (rows written before it carry ``output_tail`` as text)."""
    payload = {name: getattr(report, name) for name in _REPORT_FIELDS}  # flat: no deep copy
    payload["at"] = report.at.isoformat()
    del payload["output_tail"]
    if report.output_bytes is None:  # absent, as in reports written before it
        del payload["output_bytes"], payload["execution_id"]
    if report.output_tail:
        payload["output_tail_base64"] = base64.b64encode(report.output_tail).decode("ascii")
    return payload


def _columns(item: Item) -> dict[str, object]:
    return dict(
        job_id=item.job_id,
        generation=item.generation,
        spec=item.spec,
        state=item.state.value,
        priority=item.priority,
        run_at=item.run_at,
        seq=item.seq,
        max_attempts=item.max_attempts,
        attempt=item.attempt,
        worker_types=join_tags(item.worker_types),
        labels=json.dumps(item.labels),
        lease_token=item.lease_token,
        lease_deadline=item.lease_deadline,
        lease_seconds=item.lease_seconds,
        worker_id=item.worker_id,
        version=item.version,
        cancel_requested=item.cancel_requested,
        exit_code=item.exit_code,
        output_tail=item.output_tail,
        error=item.error,
        report_seq=item.report_seq,
        trace_context=json.dumps(item.trace_context),
        created_at=item.created_at,
        updated_at=item.updated_at,
    )


def _transition_values(item: Item) -> list[Any]:
    """The item's TRANSITION_FIELDS, in that order, as stored."""
    return [
        item.state.value if name == "state" else getattr(item, name) for name in TRANSITION_FIELDS
    ]


def _replace_values(item: Item) -> list[Any]:
    columns = _columns(item)
    return [columns[c.name] for c in ITEM_COLUMNS]


_STATES = {state.value: state for state in ItemState}


def _json_dict(text: str) -> dict[str, str]:
    return {} if text == "{}" else json.loads(text)  # type: ignore[no-any-return]


def _item(row: Any) -> Item:
    return Item(
        job_id=row.job_id,
        generation=row.generation,
        spec=row.spec,
        state=_STATES[row.state],
        priority=row.priority,
        run_at=to_utc(row.run_at),
        seq=row.seq,
        max_attempts=row.max_attempts,
        attempt=row.attempt,
        worker_types=split_tags(row.worker_types),
        labels=_json_dict(row.labels),
        lease_token=row.lease_token,
        lease_deadline=to_utc(row.lease_deadline) if row.lease_deadline else None,
        lease_seconds=row.lease_seconds,
        worker_id=row.worker_id,
        version=row.version,
        cancel_requested=row.cancel_requested,
        exit_code=row.exit_code,
        output_tail=row.output_tail,
        error=row.error,
        report_seq=row.report_seq,
        trace_context=_json_dict(row.trace_context),
        created_at=to_utc(row.created_at),
        updated_at=to_utc(row.updated_at),
    )


def _next(row: Any) -> NextGeneration:
    new = NewItem(
        job_id=row.job_id,
        generation=row.generation,
        spec=row.spec,
        priority=row.priority,
        max_attempts=row.max_attempts,
        run_at=to_utc(row.run_at) if row.run_at else None,
        worker_types=split_tags(row.worker_types),
        labels=_json_dict(row.labels),
        trace_context=_json_dict(row.trace_context),
    )
    return NextGeneration(new, row.cancelled, to_utc(row.created_at))


def _worker(row: Any) -> Worker:
    return Worker(
        row.worker_id,
        row.worker_type,
        json.loads(row.labels),
        row.slots,
        WorkerState(row.state),
        to_utc(row.last_seen),
        row.drained,
    )
