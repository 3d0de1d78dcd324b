"""An in-memory jobs store with the same contract as ``JobStore``, for unit tests.

Transactions are serialised by one lock and atomic: a use case that raises leaves the
store exactly as it was. tests/storage runs the same contract tests against this, SQLite
and PostgreSQL.
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from services.common.outbox import Message
from services.jobs.domain import (
    Job,
    JobEvent,
    JobFilter,
    OutputChunk,
    OutputHead,
    OutputRead,
    SpecIndex,
)
from services.jobs.store import DuplicateRequest, check_fits


@dataclass
class _State:
    jobs: dict[str, Job] = field(default_factory=dict)
    by_request: dict[str, str] = field(default_factory=dict)
    index: dict[str, SpecIndex] = field(default_factory=dict)
    events: list[JobEvent] = field(default_factory=list)
    outbox: dict[int, tuple[Message, datetime]] = field(default_factory=dict)
    output_heads: dict[tuple[str, int], OutputHead] = field(default_factory=dict)
    output: dict[tuple[str, int], list[OutputChunk]] = field(default_factory=dict)


class FakeOutbox:
    def __init__(self, store: FakeJobStore) -> None:
        self._store = store
        self._ids = itertools.count(1)

    def add(
        self, state: _State, topic: str, key: str, payload: dict[str, Any], now: datetime
    ) -> None:
        message_id = next(self._ids)
        state.outbox[message_id] = (Message(message_id, topic, key, dict(payload), 0), now)

    def due(self, now: datetime, limit: int) -> list[Message]:
        with self._store.lock:
            due = [
                m
                for m, at in sorted(self._store.state.outbox.values(), key=lambda e: e[0].id)
                if at <= now
            ]
            return copy.deepcopy(due[:limit])

    def delivered(self, message_id: int) -> None:
        with self._store.lock:
            self._store.state.outbox.pop(message_id, None)

    def postpone(self, message_id: int, until: datetime, error: str) -> None:
        with self._store.lock:
            entry = self._store.state.outbox.get(message_id)
            if entry is not None:
                message = replace(entry[0], attempts=entry[0].attempts + 1)
                self._store.state.outbox[message_id] = (message, until)

    def pending(self) -> int:
        with self._store.lock:
            return len(self._store.state.outbox)


class FakeTransaction:
    def __init__(self, state: _State, outbox: FakeOutbox) -> None:
        self.state = state
        self._outbox = outbox

    def get(self, job_id: str, *, for_update: bool = False) -> Job | None:
        job = self.state.jobs.get(job_id)
        return copy.deepcopy(job) if job else None

    def lock_many(self, job_ids: list[str]) -> dict[str, Job]:
        return {job_id: job for job_id in sorted(set(job_ids)) if (job := self.get(job_id))}

    def check(
        self, job: Job, event: JobEvent | None = None, index: SpecIndex | None = None
    ) -> None:
        check_fits(job, event, index)

    def savepoint(self) -> AbstractContextManager[Any]:
        return nullcontext()  # a fake write never fails half-way

    def flush(self) -> None:
        pass

    def by_request_id(self, request_id: str) -> Job | None:
        job_id = self.state.by_request.get(request_id)
        return self.get(job_id) if job_id else None

    def by_request_ids(self, request_ids: list[str]) -> dict[str, Job]:
        return {rid: job for rid in request_ids if (job := self.by_request_id(rid)) is not None}

    def add_many(self, new: list[tuple[Job, SpecIndex]], now: datetime) -> set[str]:
        stored = set()
        for job, index in new:
            if job.request_id is not None and job.request_id in self.state.by_request:
                continue
            self.add(job, index)
            self.record(JobEvent(job.job_id, 1, job.state, now, "client", "submitted"))
            self.send("enqueue", job, now)
            stored.add(job.job_id)
        return stored

    def add(self, job: Job, index: SpecIndex) -> None:
        if job.request_id is not None and job.request_id in self.state.by_request:
            raise DuplicateRequest(job.request_id)
        self.state.jobs[job.job_id] = copy.deepcopy(job)
        self.state.index[job.job_id] = index
        if job.request_id is not None:
            self.state.by_request[job.request_id] = job.job_id

    def save(self, job: Job) -> None:
        self.state.jobs[job.job_id] = copy.deepcopy(job)

    def save_many(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.save(job)

    def record(self, event: JobEvent) -> None:
        self.state.events.append(event)

    def record_many(self, events: list[JobEvent]) -> None:
        self.state.events.extend(events)

    def send(self, topic: str, job: Job, now: datetime) -> None:
        self._outbox.add(
            self.state, topic, job.job_id, {"job_id": job.job_id, "generation": job.generation}, now
        )

    def output_head(self, job_id: str, generation: int) -> OutputHead | None:
        return self.state.output_heads.get((job_id, generation))

    def start_output(self, job_id: str, generation: int, head: OutputHead, existed: bool) -> None:
        self.state.output_heads[(job_id, generation)] = head
        self.state.output[(job_id, generation)] = []

    def put_output(
        self, job_id: str, generation: int, head: OutputHead, chunk: OutputChunk
    ) -> None:
        self.state.output_heads[(job_id, generation)] = head
        self.state.output[(job_id, generation)] = [chunk]

    def add_output(
        self, job_id: str, generation: int, chunk: OutputChunk, merge_up_to: int
    ) -> None:
        chunks = self.state.output[(job_id, generation)]
        last = chunks[-1] if chunks else None
        if (
            last is not None
            and last.end == chunk.start
            and last.end - last.start + len(chunk.data) <= merge_up_to
        ):
            chunks[-1] = OutputChunk(last.start, last.data + chunk.data)
        else:
            chunks.append(chunk)
        head = self.state.output_heads[(job_id, generation)]
        self.state.output_heads[(job_id, generation)] = replace(head, next_offset=chunk.end)

    def drop_output_before(self, job_id: str, generation: int, offset: int) -> None:
        chunks = self.state.output[(job_id, generation)]
        kept = [
            c if c.start >= offset else OutputChunk(offset, c.data[offset - c.start :])
            for c in chunks
            if c.end > offset
        ]
        self.state.output[(job_id, generation)] = kept


class FakeJobStore:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.state = _State()
        self.outbox = FakeOutbox(self)

    @contextmanager
    def transaction(self) -> Iterator[FakeTransaction]:
        with self.lock:
            working = copy.deepcopy(self.state)
            yield FakeTransaction(working, self.outbox)
            self.state = working  # only reached when the use case did not raise

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            job = self.state.jobs.get(job_id)
            return copy.deepcopy(job) if job else None

    def get_many(self, job_ids: list[str]) -> dict[str, Job]:
        return {job_id: job for job_id in job_ids if (job := self.get(job_id)) is not None}

    def list_jobs(
        self, *, limit: int, after: tuple[datetime, str] | None, where: JobFilter
    ) -> list[Job]:
        with self.lock:
            jobs = sorted(self.state.jobs.values(), key=lambda j: (j.created_at, j.job_id))
            chosen = [copy.deepcopy(j) for j in jobs if self._matches(j, after, where)]
        return chosen[:limit]

    def _matches(self, job: Job, after: tuple[datetime, str] | None, where: JobFilter) -> bool:
        index = self.state.index[job.job_id]
        return (
            (after is None or (job.created_at, job.job_id) > after)
            and (not where.states or job.state in where.states)
            and (
                not where.worker_type
                or not index.worker_types
                or where.worker_type in index.worker_types
            )
            and (where.created_after is None or job.created_at >= where.created_after)
            and (where.created_before is None or job.created_at < where.created_before)
            and all(index.labels.get(k) == v for k, v in where.labels)
        )

    def read_output(self, job_id: str, generation: int, after: int) -> OutputRead | None:
        with self.lock:
            head = self.state.output_heads.get((job_id, generation))
            if head is None:
                return None
            chunks = self.state.output.get((job_id, generation), [])
            return OutputRead(generation, head.attempt, tuple(c for c in chunks if c.end > after))

    def events(self, job_id: str) -> list[JobEvent]:
        with self.lock:
            return [e for e in self.state.events if e.job_id == job_id]
