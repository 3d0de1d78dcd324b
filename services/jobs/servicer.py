"""The gRPC edge of the jobs service: check the request's shape, convert, call the manager.
Errors are mapped by the shared interceptor."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from datetime import datetime

import grpc
from blixard.jobs.v1 import jobs_service_pb2 as pb
from blixard.jobs.v1 import jobs_service_pb2_grpc as pb_grpc

from services.common import paging, parked, telemetry
from services.common.auth import Policy, Role
from services.common.errors import BlixardError, InvalidArgument
from services.common.jobspec import (
    check_labels,
    check_spec,
    check_timestamp,
    check_worker_type,
)
from services.common.output import sent_bytes
from services.common.server import MAX_MESSAGE_BYTES, WaitSlots
from services.common.validation import BatchCheck, Problems, check_each, check_item
from services.jobs import convert
from services.jobs.domain import Job, Submission
from services.jobs.manager import JobManager

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JobService"].full_name

_CLIENT = frozenset({Role.CLIENT})
POLICY: Policy = {
    "SubmitJob": _CLIENT,
    "BatchSubmitJobs": _CLIENT,
    "GetJob": _CLIENT,
    "ListJobs": _CLIENT,
    "CancelJob": _CLIENT,
    "RetryJob": _CLIENT,
    "WatchJob": _CLIENT,
    "ListJobEvents": _CLIENT,
    "GetJobOutput": _CLIENT,
    # The worker sends the output of the jobs it runs.
    "AppendJobOutput": frozenset({Role.WORKER}),
    # UpdateJobStatus, BatchUpdateJobStatus: the queue's own calls, with the admin token.
    # ListParkedMessages, RedriveParkedMessage, DeleteParkedMessage: operators (admin).
}

MAX_REQUEST_ID = 256
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
WATCH_POLL_SECONDS = 1.0
STREAMS = "watch and follow streams"  # what holds the waiting slots, in the refusal
MAX_OUTPUT_CHUNK = 64 * 1024
MAX_OUTPUT_OFFSET = 2**62


MAX_STATUS_BATCH = 500
MAX_TAIL_BYTES = 64 * 1024  # the queue keeps no more of an attempt's output
MAX_WORKER_ID = 256  # the width of jobs.worker_id


def _check_update(request: pb.UpdateJobStatusRequest, problems: Problems) -> None:
    _check_job_id(request.job_id, problems)
    problems.check(request.generation >= 1, "generation", "at least 1")
    problems.check(request.sequence >= 1, "sequence", "at least 1")
    problems.check(convert.is_state(request.state), "state", "required: a job state")
    tail = sent_bytes(request.output_tail_bytes, request.output_tail)
    problems.check(
        len(tail) <= MAX_TAIL_BYTES,
        "output_tail_bytes" if request.output_tail_bytes else "output_tail",
        f"at most {MAX_TAIL_BYTES} bytes",
    )
    problems.check(
        len(request.worker_id) <= MAX_WORKER_ID, "worker_id", f"at most {MAX_WORKER_ID} characters"
    )
    if request.HasField("total_output_bytes"):
        problems.check(
            len(tail) <= request.total_output_bytes <= MAX_OUTPUT_OFFSET,
            "total_output_bytes",
            f"at least the tail's length, at most {MAX_OUTPUT_OFFSET}",
        )
    problems.check(len(request.execution_id) <= 64, "execution_id", "at most 64 characters")
    if request.HasField("event_time"):
        check_timestamp(request.event_time, "event_time", problems)


def _batch_result(result: bool | BlixardError) -> pb.BatchUpdateJobStatusResult:
    if isinstance(result, BlixardError):
        return pb.BatchUpdateJobStatusResult(
            error=pb.BatchUpdateJobStatusError(
                code=result.code.value[0], reason=result.reason, message=result.message
            )
        )
    return pb.BatchUpdateJobStatusResult(response=pb.UpdateJobStatusResponse(applied=result))


MAX_SUBMIT_BATCH = 1000


# What the answer to one request of a batch adds to the request's own bytes, at most: its
# job's id, state, times and trace id, its request_id again (or a refused request's error).
ANSWER_BYTES_PER_JOB = 256


def _answer_bytes(request: pb.BatchSubmitJobsRequest) -> int:
    """An upper bound of the size of BatchSubmitJobs's answer (each job echoes its spec)."""
    ids = sum(len(one.request_id) for one in request.requests)
    return request.ByteSize() + ids + ANSWER_BYTES_PER_JOB * len(request.requests)


def _check_submit(request: pb.SubmitJobRequest, prefix: str, problems: Problems) -> None:
    """SubmitJob's checks, for it and for each request of a batch (fields named ``prefix``
    + field, e.g. ``requests[3].spec.command``)."""
    problems.check(
        len(request.request_id) <= MAX_REQUEST_ID,
        f"{prefix}request_id",
        f"at most {MAX_REQUEST_ID} characters",
    )
    if problems.check(request.HasField("spec"), f"{prefix}spec", "required"):
        check_spec(request.spec, f"{prefix}spec", problems)


def _submit_result(
    result: tuple[Job, bool] | BlixardError, request: pb.SubmitJobRequest
) -> pb.BatchSubmitJobsResult:
    if isinstance(result, BlixardError):
        violations = getattr(result, "violations", [])
        return pb.BatchSubmitJobsResult(
            error=pb.BatchSubmitJobsError(
                code=result.code.value[0],
                reason=result.reason,
                message=result.message,
                field_violations=[pb.FieldViolation(field=f, description=d) for f, d in violations],
                metadata=result.metadata,
            )
        )
    # The job's spec is the request's (the same canonical form), not parsed back.
    job = convert.job_message(result[0], request.spec)
    return pb.BatchSubmitJobsResult(response=pb.SubmitJobResponse(job=job))


def _check_job_id(job_id: str, problems: Problems, field: str = "job_id") -> None:
    problems.check(bool(job_id), field, "required")
    problems.check(len(job_id) <= 64, field, "at most 64 characters")


def _page_position(token: str, problems: Problems) -> tuple[datetime, str] | None:
    """The (created_at, job_id) a ListJobs page token stands for; None for the first page,
    or for a token that is not ours, which ``problems`` is told."""
    parts = paging.decode(token, 2, problems)
    if parts is None:
        return None
    created, job_id = parts
    try:
        return datetime.fromisoformat(created), job_id
    except ValueError:
        paging.not_ours(problems)
        return None


def _page_token(position: tuple[datetime, str] | None) -> str:
    if position is None:
        return ""
    created_at, job_id = position
    return paging.encode(created_at.isoformat(), job_id)


class JobServicer(parked.ParkedRpcs, pb_grpc.JobServiceServicer):
    """ListParkedMessages, RedriveParkedMessage and DeleteParkedMessage: parked.ParkedRpcs."""

    parked_contract = pb

    def __init__(self, manager: JobManager, waits: WaitSlots) -> None:
        self.manager = manager
        self.parked_messages = manager.parked
        # Each open watch or follow stream holds a server thread: they may hold only so
        # many, so submits, status reports and output appends always find one.
        self._waits = waits

    def SubmitJob(
        self, request: pb.SubmitJobRequest, context: grpc.ServicerContext
    ) -> pb.SubmitJobResponse:
        problems = Problems()
        _check_submit(request, "", problems)
        problems.raise_if_any()
        job, _created = self.manager.submit(
            request.request_id,
            convert.spec_json(request.spec),
            telemetry.current_context_carrier(),
            convert.spec_index(request.spec),
        )
        return pb.SubmitJobResponse(job=convert.job_message(job))

    def BatchSubmitJobs(
        self, request: pb.BatchSubmitJobsRequest, context: grpc.ServicerContext
    ) -> pb.BatchSubmitJobsResponse:
        size = Problems()
        if size.check(
            len(request.requests) <= MAX_SUBMIT_BATCH, "requests", f"at most {MAX_SUBMIT_BATCH}"
        ):
            # Refused before anything is stored: an answer too big to send would leave the
            # client not knowing its jobs.
            size.check(
                _answer_bytes(request) <= MAX_MESSAGE_BYTES,
                "requests",
                f"the answer (each job with its spec) would pass the "
                f"{MAX_MESSAGE_BYTES // 2**20} MiB a message may carry: send fewer per call",
            )
        size.raise_if_any()
        valid: list[Submission] = []
        refused: dict[int, InvalidArgument] = {}
        for i, one in enumerate(request.requests):
            problems = Problems()
            check_item(one, problems, f"requests[{i}].")  # the edge rule, item by item
            _check_submit(one, f"requests[{i}].", problems)
            error = problems.error()
            if error is not None:
                refused[i] = error
                continue
            valid.append(
                Submission(
                    one.request_id or None,
                    convert.spec_json(one.spec),
                    convert.spec_index(one.spec),
                )
            )
        batch = BatchCheck(valid, refused, len(request.requests))
        results = batch.merge(
            self.manager.submit_many(batch.valid, telemetry.current_context_carrier())
        )
        return pb.BatchSubmitJobsResponse(
            results=[
                _submit_result(r, one) for r, one in zip(results, request.requests, strict=True)
            ]
        )

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.GetJobResponse:
        problems = Problems()
        _check_job_id(request.job_id, problems)
        problems.raise_if_any()
        return pb.GetJobResponse(job=convert.job_message(self.manager.get(request.job_id)))

    def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.ServicerContext
    ) -> pb.ListJobsResponse:
        problems = Problems()
        problems.check(
            0 <= request.page_size <= MAX_PAGE_SIZE,
            "page_size",
            f"between 0 and {MAX_PAGE_SIZE} (0 = {DEFAULT_PAGE_SIZE})",
        )
        after = _page_position(request.page_token, problems)
        for i, value in enumerate(request.states):
            problems.check(convert.is_state(value), f"states[{i}]", f"{value} is not a job state")
        check_labels(request.labels, "labels", problems)
        if request.worker_type:
            check_worker_type(request.worker_type, "worker_type", problems)
        valid_bounds = all(
            [  # a list, not a generator: every bad bound is reported
                check_timestamp(getattr(request, name), name, problems)
                for name in ("created_after", "created_before")
                if request.HasField(name)
            ]
        )
        if (
            valid_bounds
            and request.HasField("created_after")
            and request.HasField("created_before")
        ):
            problems.check(
                request.created_after.ToNanoseconds() < request.created_before.ToNanoseconds(),
                "created_before",
                "must be later than created_after",
            )
        problems.raise_if_any()
        jobs, last = self.manager.list_jobs(
            request.page_size or DEFAULT_PAGE_SIZE, after, convert.job_filter(request)
        )
        messages = [convert.job_message(j) for j in jobs]
        fit = paging.fitting(messages)
        if fit < len(messages):  # large jobs: the page ends early, the next starts there
            last = (jobs[fit - 1].created_at, jobs[fit - 1].job_id)
        return pb.ListJobsResponse(jobs=messages[:fit], next_page_token=_page_token(last))

    def CancelJob(
        self, request: pb.CancelJobRequest, context: grpc.ServicerContext
    ) -> pb.CancelJobResponse:
        problems = Problems()
        _check_job_id(request.job_id, problems)
        problems.check(len(request.reason) <= 1024, "reason", "at most 1024 characters")
        problems.raise_if_any()
        job, confirmed = self.manager.cancel(
            request.job_id, request.reason or "cancelled by the client"
        )
        return pb.CancelJobResponse(job=convert.job_message(job), queue_confirmed=confirmed)

    def RetryJob(
        self, request: pb.RetryJobRequest, context: grpc.ServicerContext
    ) -> pb.RetryJobResponse:
        problems = Problems()
        _check_job_id(request.job_id, problems)
        problems.raise_if_any()
        return pb.RetryJobResponse(job=convert.job_message(self.manager.retry(request.job_id)))

    def UpdateJobStatus(
        self, request: pb.UpdateJobStatusRequest, context: grpc.ServicerContext
    ) -> pb.UpdateJobStatusResponse:
        problems = Problems()
        _check_update(request, problems)
        problems.raise_if_any()
        update = convert.status_update(request, self.manager.clock.now())
        return pb.UpdateJobStatusResponse(applied=self.manager.update_status(update))

    def BatchUpdateJobStatus(
        self, request: pb.BatchUpdateJobStatusRequest, context: grpc.ServicerContext
    ) -> pb.BatchUpdateJobStatusResponse:
        now = self.manager.clock.now()
        batch = check_each(request.requests, _check_update, at_most=MAX_STATUS_BATCH)
        applied = self.manager.update_status_many(
            [convert.status_update(one, now) for one in batch.valid]
        )
        results = batch.merge(applied)
        return pb.BatchUpdateJobStatusResponse(results=[_batch_result(r) for r in results])

    def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchJobResponse]:
        problems = Problems()
        _check_job_id(request.job_id, problems)
        problems.raise_if_any()
        with self._waits.held_or_refused(STREAMS):
            yield from self._watch(request, context)

    def _watch(
        self, request: pb.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchJobResponse]:
        feed = self.manager.feed
        seen = feed.version
        job = self.manager.get(request.job_id)
        yield pb.WatchJobResponse(job=convert.job_message(job))
        while not job.state.terminal and context.is_active():
            seen = feed.wait(seen, WATCH_POLL_SECONDS)
            latest = self.manager.get(request.job_id)
            if (latest.state, latest.generation, latest.updated_at) != (
                job.state,
                job.generation,
                job.updated_at,
            ):
                job = latest
                yield pb.WatchJobResponse(job=convert.job_message(job))

    def ListJobEvents(
        self, request: pb.ListJobEventsRequest, context: grpc.ServicerContext
    ) -> pb.ListJobEventsResponse:
        problems = Problems()
        _check_job_id(request.job_id, problems)
        problems.raise_if_any()
        return pb.ListJobEventsResponse(
            events=[convert.event_message(e) for e in self.manager.events(request.job_id)]
        )

    def AppendJobOutput(
        self, request: pb.AppendJobOutputRequest, context: grpc.ServicerContext
    ) -> pb.AppendJobOutputResponse:
        problems = Problems()
        _check_job_id(request.job_id, problems)
        problems.check(request.generation >= 1, "generation", "at least 1")
        problems.check(request.attempt >= 1, "attempt", "at least 1")
        problems.check(
            len(request.data) <= MAX_OUTPUT_CHUNK, "data", f"at most {MAX_OUTPUT_CHUNK} bytes"
        )
        problems.check(
            request.offset + len(request.data) <= MAX_OUTPUT_OFFSET,
            "offset",
            f"offset + data must stay below {MAX_OUTPUT_OFFSET}",
        )
        problems.check(len(request.execution_id) <= 64, "execution_id", "at most 64 characters")
        if request.HasField("total_bytes"):
            problems.check(
                request.total_bytes >= request.offset + len(request.data),
                "total_bytes",
                "at least offset + the length of data",
            )
        problems.raise_if_any()
        next_offset = self.manager.append_output(
            request.job_id,
            request.generation,
            request.attempt,
            request.offset,
            request.data,
            request.total_bytes if request.HasField("total_bytes") else None,
            request.execution_id,
        )
        return pb.AppendJobOutputResponse(next_offset=next_offset)

    def GetJobOutput(
        self, request: pb.GetJobOutputRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GetJobOutputResponse]:
        problems = Problems()
        _check_job_id(request.job_id, problems)
        problems.raise_if_any()
        with self._waits.held_or_refused(STREAMS) if request.follow else nullcontext():
            yield from self._output(request, context)

    def _output(
        self, request: pb.GetJobOutputRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GetJobOutputResponse]:
        feed = self.manager.output_feed
        job = self.manager.get(request.job_id)
        generation, attempt, cursor = job.generation, 0, 0
        while True:
            seen = feed.version
            # Decided before the read, so the last read sees all a finished job wrote.
            ended = job.state.terminal or job.generation != generation
            read = self.manager.read_output(request.job_id, generation, attempt, cursor)
            if read.attempt != attempt:
                attempt, cursor = read.attempt, 0
            for chunk in read.chunks:
                yield convert.output_message(generation, attempt, chunk, cursor)
                cursor = chunk.end
            if not request.follow or ended or not context.is_active():
                return
            feed.wait(seen, WATCH_POLL_SECONDS)
            job = self.manager.get(request.job_id)
