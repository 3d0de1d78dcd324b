"""The jobs use cases, each one unit of work: the change, its history and its outbox
message are written in one transaction."""

from __future__ import annotations

import copy
import hashlib
import logging
from datetime import datetime
from typing import Protocol

from sqlalchemy.exc import DBAPIError

from services.common.clock import Clock
from services.common.db import refused_item, retry_conflicts
from services.common.errors import (
    Aborted,
    AlreadyExists,
    BlixardError,
    FailedPrecondition,
    NotFound,
)
from services.common.feed import ChangeFeed
from services.common.outbox import ParkedMessages
from services.jobs import domain
from services.jobs.domain import (
    OUTPUT_CHUNK_BYTES,
    OUTPUT_KEEP_BYTES,
    Job,
    JobEvent,
    JobFilter,
    JobState,
    OutputChunk,
    OutputHead,
    OutputRead,
    SpecIndex,
    StatusUpdate,
    Submission,
)
from services.jobs.store import DuplicateRequest, JobStore, Transaction

log = logging.getLogger(__name__)


class QueueCancel(Protocol):
    """The queue's cancel, called at once by CancelJob (see JobManager.cancel)."""

    def cancel(self, job_id: str, generation: int, timeout: float = ...) -> None: ...


def spec_hash(spec_json: str) -> str:
    return hashlib.sha256(spec_json.encode()).hexdigest()


def _reused(request_id: str, holder: Job) -> AlreadyExists:
    return AlreadyExists(
        f"request_id {request_id!r} was already used for job {holder.job_id} with a different spec",
        reason="REQUEST_ID_REUSED",
        metadata={"job_id": holder.job_id, "request_id": request_id},
    )


class JobManager:
    def __init__(
        self,
        store: JobStore,
        clock: Clock,
        feed: ChangeFeed | None = None,
        *,
        queue: QueueCancel | None = None,
        cancel_timeout: float = 1.0,
    ) -> None:
        self.store = store
        self.clock = clock
        self.feed = feed or ChangeFeed()
        # CancelJob tells the queue itself, waiting at most cancel_timeout for it.
        self.queue = queue
        self.cancel_timeout = cancel_timeout
        # Wakes output followers: new output, and any job change (a job that ends ends them).
        self.output_feed = ChangeFeed()
        # The outbox messages to the queue the relay gave up on (the relay waits on feed).
        self.parked = ParkedMessages(store.outbox, clock, self.feed)

    def _changed(self) -> None:
        self.feed.changed()
        self.output_feed.changed()

    def submit(
        self,
        request_id: str | None,
        spec_json: str,
        trace_context: dict[str, str],
        index: SpecIndex | None = None,
    ) -> tuple[Job, bool]:
        """Store a new job and its outbox message; the same request_id gives the first job."""
        digest = spec_hash(spec_json)
        if request_id:
            existing = self._same_request(request_id, digest)
            if existing is not None:
                return existing, False
        now = self.clock.now()
        job = Job(
            job_id=domain.new_job_id(),
            request_id=request_id or None,
            spec_json=spec_json,
            spec_hash=digest,
            state=JobState.PENDING,
            created_at=now,
            updated_at=now,
            trace_context=trace_context,
        )
        try:
            with self.store.transaction() as tx:
                tx.add(job, index or SpecIndex())
                tx.record(JobEvent(job.job_id, 1, JobState.PENDING, now, "client", "submitted"))
                tx.send("enqueue", job, now)
        except DuplicateRequest:
            # A concurrent submit with the same request_id won the race.
            existing = self._same_request(request_id or "", digest)
            if existing is None:
                raise
            return existing, False
        self._changed()
        return job, True

    def submit_many(
        self, submissions: list[Submission], trace_context: dict[str, str]
    ) -> list[tuple[Job, bool] | BlixardError]:
        """Store new jobs (as ``submit`` does each) in one transaction: per submission, the
        job and whether it was created, or why it was refused, in order. Idempotent by
        request_id as ``submit``: one already used with the same spec gives its job
        (created False), with another spec ALREADY_EXISTS; the same holds between the
        submissions of one batch (the first one stands). Each fails alone: one whose
        values its columns cannot hold gets its own INVALID_ARGUMENT (if the database
        refuses a write the checks did not foresee, the batch runs again with a savepoint
        per job, so that one fails alone); the rest commit. The relay is woken once."""
        if not submissions:
            return []
        now = self.clock.now()
        jobs = [
            Job(
                job_id=domain.new_job_id(),
                request_id=one.request_id or None,
                spec_json=one.spec_json,
                spec_hash=spec_hash(one.spec_json),
                state=JobState.PENDING,
                created_at=now,
                updated_at=now,
                trace_context=trace_context,
            )
            for one in submissions
        ]
        try:
            results = retry_conflicts(
                lambda: self._submit_many(submissions, jobs, now, isolate=False)
            )
        except DBAPIError as exc:
            if refused_item(exc) is None:
                raise
            results = retry_conflicts(
                lambda: self._submit_many(submissions, jobs, now, isolate=True)
            )
        if any(not isinstance(r, BlixardError) and r[1] for r in results):
            self._changed()
        return results

    def _submit_many(
        self, submissions: list[Submission], jobs: list[Job], now: datetime, *, isolate: bool
    ) -> list[tuple[Job, bool] | BlixardError]:
        results: list[tuple[Job, bool] | BlixardError] = []
        first: dict[int, int] = {}  # a later submission of a request_id -> the first one's
        with self.store.transaction() as tx:
            holders = tx.by_request_ids(sorted({j.request_id for j in jobs if j.request_id}))
            chosen: dict[str, int] = {}  # request_id -> the submission that creates its job
            planned: list[int] = []
            for i, job in enumerate(jobs):
                rid = job.request_id
                holder = holders.get(rid) if rid else None
                if rid and holder is not None:
                    results.append(self._reuse(rid, holder, job.spec_hash))
                    if rid in chosen and not isinstance(results[-1], BlixardError):
                        first[i] = chosen[rid]
                    continue
                event = JobEvent(job.job_id, 1, JobState.PENDING, now, "client", "submitted")
                try:
                    tx.check(job, event, submissions[i].index)
                except BlixardError as exc:
                    results.append(exc)
                    continue
                if rid:
                    holders[rid], chosen[rid] = job, i
                planned.append(i)
                results.append((job, True))
            if not isolate:
                stored = tx.add_many([(jobs[i], submissions[i].index) for i in planned], now)
            else:
                stored = set()
                for i in planned:
                    try:
                        with tx.savepoint():
                            stored |= tx.add_many([(jobs[i], submissions[i].index)], now)
                    except DBAPIError as exc:
                        refused = refused_item(exc)
                        if refused is None:
                            raise
                        results[i] = refused
            raced = [i for i in planned if jobs[i].job_id not in stored]
            raced = [i for i in raced if not isinstance(results[i], BlixardError)]
            # request_ids a concurrent submit committed first: theirs, as if found before.
            winners = tx.by_request_ids([jobs[i].request_id or "" for i in raced])
            for i in raced:
                rid = jobs[i].request_id or ""
                winner = winners.get(rid)
                results[i] = (
                    self._reuse(rid, winner, jobs[i].spec_hash)
                    if winner is not None
                    else Aborted(f"request_id {rid!r} is being submitted concurrently; try again")
                )
        for i, j in first.items():  # the same job as the first submission of its request_id
            result = results[j]
            results[i] = result if isinstance(result, BlixardError) else (result[0], False)
        return results

    def _reuse(self, request_id: str, holder: Job, digest: str) -> tuple[Job, bool] | BlixardError:
        if holder.spec_hash == digest:
            return holder, False
        return _reused(request_id, holder)

    def _same_request(self, request_id: str, digest: str) -> Job | None:
        with self.store.transaction() as tx:
            existing = tx.by_request_id(request_id)
        if existing is not None and existing.spec_hash != digest:
            raise _reused(request_id, existing)
        return existing

    def get(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise NotFound("job", job_id)
        return job

    def list_jobs(
        self,
        page_size: int,
        after: tuple[datetime, str] | None = None,
        where: JobFilter | None = None,
    ) -> tuple[list[Job], tuple[datetime, str] | None]:
        """A page of jobs in creation order from just past ``after`` (created_at, job_id),
        and the position the next page starts after (None: there is no next page)."""
        jobs = self.store.list_jobs(limit=page_size + 1, after=after, where=where or JobFilter())
        if len(jobs) <= page_size:
            return jobs, None
        jobs = jobs[:page_size]
        last = jobs[-1]
        return jobs, (last.created_at, last.job_id)

    def cancel(self, job_id: str, reason: str, actor: str = "client") -> tuple[Job, bool]:
        """Cancel the job, then tell the queue at once. Returns the job and whether the
        queue confirmed: from then on no worker is handed the job (one that already
        holds it is told to stop). When the queue cannot be reached in time, the outbox
        message written with the cancel delivers it later (and when the queue did
        confirm, that later delivery is a harmless repeat)."""
        with self.store.transaction() as tx:
            job = tx.get(job_id, for_update=True)
            if job is None:
                raise NotFound("job", job_id)
            event = domain.cancel(job, self.clock.now(), reason, actor)
            tx.save(job)
            tx.record(event)
            tx.send("cancel", job, event.at)
        self._changed()
        return job, self._tell_queue(job)

    def _tell_queue(self, job: Job) -> bool:
        if self.queue is None:
            return False
        try:
            self.queue.cancel(job.job_id, job.generation, timeout=self.cancel_timeout)
        except Exception as exc:  # unreachable or slow: the outbox delivers it
            log.info(
                "cancel of %s not confirmed by the queue (the outbox sends it): %s", job.job_id, exc
            )
            return False
        return True

    def retry(self, job_id: str, actor: str = "client") -> Job:
        with self.store.transaction() as tx:
            job = tx.get(job_id, for_update=True)
            if job is None:
                raise NotFound("job", job_id)
            event = domain.retry(job, self.clock.now(), actor)
            tx.save(job)
            tx.record(event)
            tx.send("enqueue", job, event.at)
        self._changed()
        return job

    def update_status(self, update: StatusUpdate) -> bool:
        result = self.update_status_many([update])[0]
        if isinstance(result, BlixardError):
            raise result
        return result

    def update_status_many(self, updates: list[StatusUpdate]) -> list[bool | BlixardError]:
        """Apply the queue's updates in one transaction: each is applied (True), a
        duplicate or late one ignored (False), or refused on its own (an unknown job:
        NOT_FOUND; a value its column cannot hold: INVALID_ARGUMENT) while the rest commit.

        The batch locks its jobs at once, in job_id order, so overlapping batches never
        deadlock; the reports of one job apply in sequence order to its one locked row. A
        deadlock or serialization failure all the same is run again (a lost race, not an
        outage). If the database refuses a write that the checks did not foresee, the
        batch is run again with a savepoint per update, so that one fails alone."""
        try:
            results, wrote = retry_conflicts(lambda: self._update_status(updates, isolate=False))
        except DBAPIError as exc:
            if refused_item(exc) is None:
                raise
            results, wrote = retry_conflicts(lambda: self._update_status(updates, isolate=True))
        if any(result is True for result in results):
            self._changed()
        elif wrote:
            self.output_feed.changed()
        return results

    def _update_status(
        self, updates: list[StatusUpdate], *, isolate: bool
    ) -> tuple[list[bool | BlixardError], bool]:
        """The results, and whether output that came with a completion was stored."""
        results: list[bool | BlixardError] = [False] * len(updates)
        wrote = False
        order = sorted(range(len(updates)), key=lambda i: (updates[i].job_id, updates[i].sequence))
        with self.store.transaction() as tx:
            jobs = tx.lock_many([update.job_id for update in updates])
            changed: set[str] = set()
            events: list[JobEvent] = []
            for i in order:
                update = updates[i]
                job = jobs.get(update.job_id)
                if job is None:
                    results[i] = NotFound("job", update.job_id)
                    continue
                before = copy.copy(job)
                event = domain.apply_update(job, update)
                try:
                    tx.check(job, event)
                    if isolate:
                        with tx.savepoint():
                            wrote |= self._inline_output(tx, job, before, update)
                            if job != before:
                                tx.save(job)
                            if event is not None:
                                tx.record(event)
                            tx.flush()
                except (BlixardError, DBAPIError) as exc:
                    refused = exc if isinstance(exc, BlixardError) else refused_item(exc)
                    if refused is None:
                        raise
                    jobs[update.job_id] = before  # as if this update never came
                    results[i] = refused
                    continue
                if not isolate:
                    wrote |= self._inline_output(tx, job, before, update)
                if job != before:
                    changed.add(job.job_id)
                if event is not None:
                    events.append(event)
                results[i] = event is not None
            if not isolate:
                tx.save_many([jobs[job_id] for job_id in sorted(changed)])
                tx.record_many(events)
        return results, wrote

    def events(self, job_id: str) -> list[JobEvent]:
        self.get(job_id)
        return self.store.events(job_id)

    # ---- output of running jobs ---------------------------------------------------------

    def append_output(
        self,
        job_id: str,
        generation: int,
        attempt: int,
        offset: int,
        data: bytes,
        total_bytes: int | None = None,
        execution_id: str = "",
    ) -> int:
        """Store a chunk of an attempt's output; the offset after the last byte stored.

        Idempotent by offset: bytes already stored are skipped, so a retried call does not
        duplicate them; a gap before ``offset`` stays a gap (bytes the worker dropped). A
        later attempt's output (or a new execution of the same attempt) replaces an earlier
        one's. Only the last OUTPUT_KEEP_BYTES are kept. ``total_bytes`` (the execution's
        last call) becomes the job's output_bytes.
        """
        with self.store.transaction() as tx:
            job = tx.get(job_id, for_update=total_bytes is not None)
            if job is None:
                raise NotFound("job", job_id)
            if generation > job.generation:
                raise FailedPrecondition(
                    f"job {job_id} has no generation {generation} (it is at {job.generation})",
                    subject=f"jobs/{job_id}",
                    reason="UNKNOWN_GENERATION",
                    metadata={"generation": str(job.generation)},
                )
            next_offset = _store_output(
                tx, job, generation, attempt, offset, data, total_bytes, execution_id
            )
            if total_bytes is not None and generation == job.generation:
                tx.save(job)
        self.output_feed.changed()
        return next_offset

    def _inline_output(self, tx: Transaction, job: Job, before: Job, update: StatusUpdate) -> bool:
        """Store the output a completion carried (its tail, and the total the attempt
        wrote) as the execution's last output call would have; whether it was taken. Only
        from a report new to this generation; an attempt whose output was replaced by a
        later one's stores nothing (as its late AppendJobOutput would be refused)."""
        if (
            update.output_bytes is None
            or update.attempt < 1
            or update.generation != before.generation
            or update.sequence <= before.last_sequence
        ):
            return False
        tail = update.output_tail
        try:
            _store_output(
                tx,
                job,
                update.generation,
                update.attempt,
                update.output_bytes - len(tail),
                tail,
                update.output_bytes,
                update.execution_id,
                start_empty=False,  # a job that wrote nothing costs no output rows
            )
        except FailedPrecondition:
            return False
        return True

    def read_output(self, job_id: str, generation: int, attempt: int, after: int) -> OutputRead:
        """The stored output past offset ``after`` of ``attempt``; when a later attempt has
        replaced it, that attempt's output from its start."""
        read = self.store.read_output(job_id, generation, after)
        if read is not None and read.attempt != attempt and after > 0:
            read = self.store.read_output(job_id, generation, 0)
        return read or OutputRead(generation, attempt)


def _store_output(
    tx: Transaction,
    job: Job,
    generation: int,
    attempt: int,
    offset: int,
    data: bytes,
    total_bytes: int | None,
    execution_id: str,
    *,
    start_empty: bool = True,
) -> int:
    """Store a chunk of an attempt's output in ``tx`` (see JobManager.append_output); the
    offset after the last byte stored. ``total_bytes`` becomes the locked ``job``'s
    output_bytes when the chunk is of its generation (the caller saves the job).
    ``start_empty=False``: an empty chunk with nothing stored yet stores nothing (a
    reader sees no output either way)."""
    head = tx.output_head(job.job_id, generation)
    if head is None and (data or not start_empty) and len(data) <= OUTPUT_CHUNK_BYTES:
        # The first output of the generation (most jobs have no other): in one go, or
        # nothing at all for an empty chunk that need not start an output.
        end = offset + len(data)
        if data:
            head = OutputHead(attempt, execution_id, end)
            tx.put_output(job.job_id, generation, head, OutputChunk(offset, data))
        if total_bytes is not None and generation == job.generation:
            job.output_bytes = total_bytes
        return end
    if domain.starts_new_output(job.job_id, head, attempt, execution_id):
        fresh = OutputHead(attempt, execution_id, 0)
        tx.start_output(job.job_id, generation, fresh, existed=head is not None)
        head = fresh
    assert head is not None
    end = offset + len(data)
    if end > head.next_offset:
        start = max(offset, head.next_offset)
        chunk = OutputChunk(start, data[start - offset :])
        tx.add_output(job.job_id, generation, chunk, OUTPUT_CHUNK_BYTES)
        tx.drop_output_before(job.job_id, generation, end - OUTPUT_KEEP_BYTES)
        head = OutputHead(attempt, execution_id, end)
    if total_bytes is not None and generation == job.generation:
        job.output_bytes = total_bytes
    return head.next_offset
