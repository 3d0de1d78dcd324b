"""The jobs store: one transaction per use case, rows mapped to domain jobs here only."""

from __future__ import annotations

import json
import operator
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Engine, and_, delete, exists, insert, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, sessionmaker

from services.common.clock import to_utc
from services.common.db import BulkWrite, ColumnLimits, has_tag, join_tags, reader, write_lock
from services.common.errors import Aborted
from services.common.outbox import SqlOutbox
from services.jobs.domain import (
    Job,
    JobEvent,
    JobFilter,
    JobState,
    OutputChunk,
    OutputHead,
    OutputRead,
    SpecIndex,
)
from services.jobs.models import (
    JobEventRow,
    JobLabelRow,
    JobOutputChunkRow,
    JobOutputRow,
    JobRow,
    OutboxRow,
)


class DuplicateRequest(Exception):
    """A job with this request_id exists already."""


_JOB_LIMITS = ColumnLimits(JobRow.__table__)  # type: ignore[arg-type]
_EVENT_LIMITS = ColumnLimits(JobEventRow.__table__)  # type: ignore[arg-type]
_LABEL_LIMITS = ColumnLimits(JobLabelRow.__table__)  # type: ignore[arg-type]


def check_fits(job: Job, event: JobEvent | None = None, index: SpecIndex | None = None) -> None:
    """InvalidArgument if the job (and its event, its labels) would not fit their columns."""
    _JOB_LIMITS.check(_values(job), f"job {job.job_id}")
    if event is not None:
        _EVENT_LIMITS.check(_event_values(event), f"an event of job {job.job_id}")
    if index is not None:
        for key, value in index.labels.items():
            _LABEL_LIMITS.check({"key": key, "value": value}, f"a label of job {job.job_id}")


class _Writes:
    """The batch submit's multi-row writes, built once per store (Core, no ORM)."""

    def __init__(self, engine: Engine) -> None:
        # A request_id a concurrent submit committed first is left to it (read back after).
        self.jobs = BulkWrite(
            engine,
            JobRow.__table__,  # type: ignore[arg-type]
            [*_JOB_COLUMNS, "worker_types"],
            skip_conflicts_on=["request_id"],
        )
        self.labels = BulkWrite(engine, JobLabelRow.__table__, ["job_id", "key", "value"])  # type: ignore[arg-type]
        self.events = BulkWrite(engine, JobEventRow.__table__, list(_EVENT_COLUMNS))  # type: ignore[arg-type]
        # A batch of status reports: every column of each job, keyed by its id.
        self.save = BulkWrite(
            engine,
            JobRow.__table__,  # type: ignore[arg-type]
            list(_JOB_COLUMNS[1:]),
            ["job_id"],
        )


class Transaction:
    """What one use case may do inside one database transaction."""

    def __init__(self, session: Session, outbox: SqlOutbox, writes: _Writes) -> None:
        self.session = session
        self._outbox = outbox
        self._writes = writes

    def get(self, job_id: str, *, for_update: bool = False) -> Job | None:
        query = select(JobRow).where(JobRow.job_id == job_id)
        if for_update:
            query = query.with_for_update()
        row = self.session.scalars(query).first()
        return _job(row) if row else None

    def lock_many(self, job_ids: list[str]) -> dict[str, Job]:
        """The jobs, locked for this transaction in job_id order (one order for every
        batch, so two overlapping batches never deadlock), by job id (missing ones absent)."""
        query = (
            select(JobRow)
            .where(JobRow.job_id.in_(sorted(set(job_ids))))
            .order_by(JobRow.job_id)
            .with_for_update()
        )
        return {row.job_id: _job(row) for row in self.session.scalars(query)}

    def check(
        self, job: Job, event: JobEvent | None = None, index: SpecIndex | None = None
    ) -> None:
        check_fits(job, event, index)

    def savepoint(self) -> AbstractContextManager[Any]:
        """A savepoint: what is written inside is undone alone if it raises."""
        return self.session.begin_nested()

    def flush(self) -> None:
        self.session.flush()

    def by_request_id(self, request_id: str) -> Job | None:
        row = self.session.scalars(select(JobRow).where(JobRow.request_id == request_id)).first()
        return _job(row) if row else None

    def by_request_ids(self, request_ids: list[str]) -> dict[str, Job]:
        """The jobs holding these request_ids, by request_id (unknown ones absent)."""
        if not request_ids:
            return {}
        rows = self.session.scalars(select(JobRow).where(JobRow.request_id.in_(request_ids)))
        return {row.request_id: _job(row) for row in rows if row.request_id is not None}

    def add_many(self, new: list[tuple[Job, SpecIndex]], now: datetime) -> set[str]:
        """Store new PENDING jobs with their labels, their first event ("submitted") and
        their "enqueue" message, in a few multi-row statements; the ids of the jobs stored.
        A job whose request_id another transaction took first is not stored (nor its rows)."""
        if not new:
            return set()
        connection = self.session.connection()
        # In request_id order: two batches taking the same request_ids wait for each other
        # in one order, never in a deadlock.
        ordered = sorted(new, key=lambda entry: entry[0].request_id or "")
        rows = [
            [*_job_columns(_values(job)), join_tags(index.worker_types)] for job, index in ordered
        ]
        ids = [job.job_id for job, _ in new]
        stored = set(ids)
        if self._writes.jobs.run(connection, rows) != len(rows):
            # Some request_ids were taken meanwhile: which of these jobs are there?
            stored = set(self.session.scalars(select(JobRow.job_id).where(JobRow.job_id.in_(ids))))
        kept = [(job, index) for job, index in new if job.job_id in stored]
        self._writes.labels.run(
            connection,
            [[job.job_id, k, v] for job, index in kept for k, v in index.labels.items()],
        )
        pending = JobState.PENDING.value
        self._writes.events.run(
            connection, [[job.job_id, 1, pending, now, "client", "submitted"] for job, _ in kept]
        )
        self._outbox.add_many(
            connection,
            [
                ("enqueue", job.job_id, {"job_id": job.job_id, "generation": job.generation}, now)
                for job, _ in kept
            ],
        )
        return stored

    def add(self, job: Job, index: SpecIndex) -> None:
        self.session.add(JobRow(**_values(job), worker_types=join_tags(index.worker_types)))
        try:
            self.session.flush()
        except IntegrityError:
            raise DuplicateRequest(job.request_id) from None
        self.session.add_all(
            JobLabelRow(job_id=job.job_id, key=k, value=v) for k, v in index.labels.items()
        )

    def save(self, job: Job) -> None:
        self.session.execute(
            update(JobRow).where(JobRow.job_id == job.job_id).values(**_values(job))
        )

    def save_many(self, jobs: list[Job]) -> None:
        """As ``save`` for each, in one statement."""
        rows = [[*_job_columns(_values(job))[1:], job.job_id] for job in jobs]
        self._writes.save.run(self.session.connection(), rows)

    def record(self, event: JobEvent) -> None:
        self.session.add(JobEventRow(**_event_values(event)))

    def record_many(self, events: list[JobEvent]) -> None:
        """As ``record`` for each, in one statement."""
        rows = [[e.job_id, e.generation, e.state.value, e.at, e.actor, e.reason] for e in events]
        self._writes.events.run(self.session.connection(), rows)

    def send(self, topic: str, job: Job, now: datetime) -> None:
        """Tell the queue, once this transaction commits: "enqueue" or "cancel"."""
        self._outbox.add(
            self.session,
            topic,
            job.job_id,
            {"job_id": job.job_id, "generation": job.generation},
            now,
        )

    # ---- output (one generation's latest attempt, bounded) --------------------------------

    def output_head(self, job_id: str, generation: int) -> OutputHead | None:
        """Locked for the rest of the transaction (one appender at a time)."""
        row = self.session.scalars(
            select(JobOutputRow)
            .where(JobOutputRow.job_id == job_id, JobOutputRow.generation == generation)
            .with_for_update()
        ).first()
        return OutputHead(row.attempt, row.execution_id, row.next_offset) if row else None

    def start_output(self, job_id: str, generation: int, head: OutputHead, existed: bool) -> None:
        """Forget what an earlier attempt wrote; the new attempt starts at offset 0."""
        self.session.execute(delete(JobOutputChunkRow).where(_chunks_of(job_id, generation)))
        if existed:
            self.session.execute(
                update(JobOutputRow)
                .where(JobOutputRow.job_id == job_id, JobOutputRow.generation == generation)
                .values(attempt=head.attempt, execution_id=head.execution_id, next_offset=0)
            )
            return
        self.session.add(
            JobOutputRow(
                job_id=job_id,
                generation=generation,
                attempt=head.attempt,
                execution_id=head.execution_id,
                next_offset=0,
            )
        )
        try:
            self.session.flush()
        except IntegrityError:
            raise Aborted("another call started this output at the same time") from None

    def put_output(
        self, job_id: str, generation: int, head: OutputHead, chunk: OutputChunk
    ) -> None:
        """A generation's first output in one go: its head (past ``chunk``) and its one
        chunk (two INSERTs where start_output and add_output take six statements)."""
        try:
            self.session.execute(
                insert(JobOutputRow).values(
                    job_id=job_id,
                    generation=generation,
                    attempt=head.attempt,
                    execution_id=head.execution_id,
                    next_offset=head.next_offset,
                )
            )
        except IntegrityError:
            raise Aborted("another call started this output at the same time") from None
        self._insert_chunk(job_id, generation, chunk)

    def _insert_chunk(self, job_id: str, generation: int, chunk: OutputChunk) -> None:
        self.session.execute(
            insert(JobOutputChunkRow).values(
                job_id=job_id,
                generation=generation,
                start_offset=chunk.start,
                end_offset=chunk.end,
                data=chunk.data,
            )
        )

    def add_output(
        self, job_id: str, generation: int, chunk: OutputChunk, merge_up_to: int
    ) -> None:
        """Store ``chunk``, merged into the last stored chunk when it follows it directly
        and both fit in ``merge_up_to`` bytes; then move the head past it."""
        last = self.session.scalars(
            select(JobOutputChunkRow)
            .where(_chunks_of(job_id, generation))
            .order_by(JobOutputChunkRow.start_offset.desc())
            .limit(1)
        ).first()
        if (
            last is not None
            and last.end_offset == chunk.start
            and last.end_offset - last.start_offset + len(chunk.data) <= merge_up_to
        ):
            self.session.execute(
                update(JobOutputChunkRow)
                .where(_chunks_of(job_id, generation))
                .where(JobOutputChunkRow.start_offset == last.start_offset)
                .values(data=last.data + chunk.data, end_offset=chunk.end)
            )
        else:
            self._insert_chunk(job_id, generation, chunk)
        self.session.execute(
            update(JobOutputRow)
            .where(JobOutputRow.job_id == job_id, JobOutputRow.generation == generation)
            .values(next_offset=chunk.end)
        )

    def drop_output_before(self, job_id: str, generation: int, offset: int) -> None:
        """Keep only the bytes at ``offset`` and after."""
        if offset <= 0:
            return
        self.session.execute(
            delete(JobOutputChunkRow)
            .where(_chunks_of(job_id, generation))
            .where(JobOutputChunkRow.end_offset <= offset)
        )
        straddling = self.session.scalars(
            select(JobOutputChunkRow)
            .where(_chunks_of(job_id, generation))
            .where(JobOutputChunkRow.start_offset < offset)
        ).first()
        if straddling is not None:
            kept = straddling.data[offset - straddling.start_offset :]
            start = straddling.start_offset
            self.session.execute(
                delete(JobOutputChunkRow)
                .where(_chunks_of(job_id, generation))
                .where(JobOutputChunkRow.start_offset == start)
            )
            self.session.execute(
                insert(JobOutputChunkRow).values(
                    job_id=job_id,
                    generation=generation,
                    start_offset=offset,
                    end_offset=offset + len(kept),
                    data=kept,
                )
            )


class JobStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        # Reads begin without SQLite's write lock (WAL lets them read beside a writer);
        # writers of this process queue on one lock instead of SQLite's busy handler.
        self._reads = sessionmaker(reader(engine), expire_on_commit=False)
        self._write_lock = write_lock(engine)
        self.outbox = SqlOutbox(engine, OutboxRow)
        self._writes = _Writes(engine)

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        with self._write_lock, self._sessions.begin() as session:
            yield Transaction(session, self.outbox, self._writes)

    def get(self, job_id: str) -> Job | None:
        with self._reads() as session:
            row = session.get(JobRow, job_id)
            return _job(row) if row else None

    def get_many(self, job_ids: list[str]) -> dict[str, Job]:
        """The jobs, by job id (unknown ones absent), in one read."""
        if not job_ids:
            return {}
        query = select(JobRow).where(JobRow.job_id.in_(sorted(set(job_ids))))
        with self._reads() as session:
            return {row.job_id: _job(row) for row in session.scalars(query)}

    def list_jobs(
        self, *, limit: int, after: tuple[datetime, str] | None, where: JobFilter
    ) -> list[Job]:
        """Jobs in creation order (keyset pagination: stable while jobs are added)."""
        query = select(JobRow).order_by(JobRow.created_at, JobRow.job_id).limit(limit)
        if where.states:
            query = query.where(JobRow.state.in_([s.value for s in where.states]))
        if where.worker_type:
            query = query.where(has_tag(JobRow.worker_types, where.worker_type))
        if where.created_after is not None:
            query = query.where(JobRow.created_at >= where.created_after)
        if where.created_before is not None:
            query = query.where(JobRow.created_at < where.created_before)
        for key, value in where.labels:
            label = aliased(JobLabelRow)
            query = query.where(
                exists().where(
                    label.job_id == JobRow.job_id, label.key == key, label.value == value
                )
            )
        if after is not None:
            query = query.where(tuple_(JobRow.created_at, JobRow.job_id) > after)
        with self._reads() as session:
            return [_job(row) for row in session.scalars(query)]

    def read_output(self, job_id: str, generation: int, after: int) -> OutputRead | None:
        """The stored output of the generation's latest attempt that ends past ``after``,
        or None when nothing was ever stored for it."""
        with self._reads() as session:
            head = session.get(JobOutputRow, (job_id, generation))
            if head is None:
                return None
            rows = session.scalars(
                select(JobOutputChunkRow)
                .where(_chunks_of(job_id, generation))
                .where(JobOutputChunkRow.end_offset > after)
                .order_by(JobOutputChunkRow.start_offset)
            )
            chunks = tuple(OutputChunk(r.start_offset, r.data) for r in rows)
            return OutputRead(generation, head.attempt, chunks)

    def events(self, job_id: str) -> list[JobEvent]:
        query = select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(JobEventRow.id)
        with self._reads() as session:
            return [
                JobEvent(r.job_id, r.generation, JobState(r.state), to_utc(r.at), r.actor, r.reason)
                for r in session.scalars(query)
            ]


_JOB_COLUMNS = (
    "job_id",
    "request_id",
    "spec_json",
    "spec_hash",
    "state",
    "generation",
    "attempts",
    "attempts_base",
    "exit_code",
    "output_tail",
    "error",
    "worker_id",
    "created_at",
    "updated_at",
    "started_at",
    "ended_at",
    "last_sequence",
    "trace_context",
    "output_bytes",
)


_job_columns = operator.itemgetter(*_JOB_COLUMNS)


def _values(job: Job) -> dict[str, object]:
    return dict(
        job_id=job.job_id,
        request_id=job.request_id,
        spec_json=job.spec_json,
        spec_hash=job.spec_hash,
        state=job.state.value,
        generation=job.generation,
        attempts=job.attempts,
        attempts_base=job.attempts_base,
        exit_code=job.exit_code,
        output_tail=job.output_tail,
        error=job.error,
        worker_id=job.worker_id,
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        ended_at=job.ended_at,
        last_sequence=job.last_sequence,
        trace_context=json.dumps(job.trace_context),
        output_bytes=job.output_bytes,
    )


_EVENT_COLUMNS = ("job_id", "generation", "state", "at", "actor", "reason")


def _event_values(event: JobEvent) -> dict[str, object]:
    return dict(
        job_id=event.job_id,
        generation=event.generation,
        state=event.state.value,
        at=event.at,
        actor=event.actor,
        reason=event.reason,
    )


def _chunks_of(job_id: str, generation: int) -> ColumnElement[bool]:
    return and_(JobOutputChunkRow.job_id == job_id, JobOutputChunkRow.generation == generation)


def _job(row: JobRow) -> Job:
    return Job(
        job_id=row.job_id,
        request_id=row.request_id,
        spec_json=row.spec_json,
        spec_hash=row.spec_hash,
        state=JobState(row.state),
        generation=row.generation,
        attempts=row.attempts,
        attempts_base=row.attempts_base,
        exit_code=row.exit_code,
        output_tail=row.output_tail,
        error=row.error,
        worker_id=row.worker_id,
        created_at=to_utc(row.created_at),
        updated_at=to_utc(row.updated_at),
        started_at=to_utc(row.started_at) if row.started_at else None,
        ended_at=to_utc(row.ended_at) if row.ended_at else None,
        last_sequence=row.last_sequence,
        trace_context=json.loads(row.trace_context or "{}"),
        output_bytes=row.output_bytes or 0,
    )
