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
from services.common.errors import BlixardError
from services.common.jobspec import (
    check_labels,
    check_spec,
    check_timestamp,
    check_worker_type,
)
from services.common.output import sent_bytes
from services.common.server import WaitSlots
from services.common.validation import Problems, check_each
from services.jobs import convert
from services.jobs.manager import JobManager

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JobService"].full_name

_CLIENT = frozenset({Role.CLIENT})
POLICY: Policy = {
    "SubmitJob": _CLIENT,
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


class JobServicer(pb_grpc.JobServiceServicer):
    def __init__(self, manager: JobManager, waits: WaitSlots) -> None:
        self.manager = manager
        # Each open watch or follow stream holds a server thread: they may hold only so
        # many, so submits, status reports and output appends always find one.
        self._waits = waits

    def SubmitJob(
        self, request: pb.SubmitJobRequest, context: grpc.ServicerContext
    ) -> pb.SubmitJobResponse:
        problems = Problems()
        problems.check(
            len(request.request_id) <= MAX_REQUEST_ID,
            "request_id",
            f"at most {MAX_REQUEST_ID} characters",
        )
        if problems.check(request.HasField("spec"), "spec", "required"):
            check_spec(request.spec, "spec", problems)
        problems.raise_if_any()
        job, _created = self.manager.submit(
            request.request_id,
            convert.spec_json(request.spec),
            telemetry.current_context_carrier(),
            convert.spec_index(request.spec),
        )
        return pb.SubmitJobResponse(job=convert.job_message(job))

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
        return pb.ListJobsResponse(
            jobs=[convert.job_message(j) for j in jobs], next_page_token=_page_token(last)
        )

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

    # ---- the outbox's parked messages (admin) ------------------------------------------

    def ListParkedMessages(
        self, request: pb.ListParkedMessagesRequest, context: grpc.ServicerContext
    ) -> pb.ListParkedMessagesResponse:
        problems = Problems()
        page_size, after = parked.check_page(request, problems)
        problems.raise_if_any()
        found, last, total = self.manager.parked.page(page_size, after)
        return pb.ListParkedMessagesResponse(
            messages=[parked.message(p) for p in found],
            next_page_token=parked.page_token(last),
            total_parked=total,
        )

    def RedriveParkedMessage(
        self, request: pb.RedriveParkedMessageRequest, context: grpc.ServicerContext
    ) -> pb.RedriveParkedMessageResponse:
        problems = Problems()
        parked.check_id(request.id, problems)
        problems.raise_if_any()
        message = self.manager.parked.redrive(request.id)
        return pb.RedriveParkedMessageResponse(message=parked.message(message))

    def DeleteParkedMessage(
        self, request: pb.DeleteParkedMessageRequest, context: grpc.ServicerContext
    ) -> pb.DeleteParkedMessageResponse:
        problems = Problems()
        parked.check_id(request.id, problems)
        problems.raise_if_any()
        message = self.manager.parked.delete(request.id)
        return pb.DeleteParkedMessageResponse(message=parked.message(message))
