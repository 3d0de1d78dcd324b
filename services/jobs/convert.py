"""The only module of the jobs service that knows both protobuf messages and domain types."""

from __future__ import annotations

from blixard.common.v1 import job_spec_pb2
from blixard.jobs.v1 import jobs_service_pb2 as pb
from google.protobuf import json_format

from services.common import pbtime, telemetry
from services.common.errors import InvalidArgument
from services.common.jobspec import worker_types_for
from services.common.output import sent_bytes, text_view
from services.jobs.domain import (
    Job,
    JobEvent,
    JobFilter,
    JobState,
    OutputChunk,
    SpecIndex,
    StatusUpdate,
)

_STATE_TO_PB = {state: pb.JobState.Value(f"JOB_STATE_{state.value}") for state in JobState}
_STATE_FROM_PB = {value: state for state, value in _STATE_TO_PB.items()}


def spec_json(spec: job_spec_pb2.JobSpec) -> str:
    """The canonical form a spec is stored and compared in."""
    return json_format.MessageToJson(
        spec, sort_keys=True, indent=None, preserving_proto_field_name=True
    )


def spec_index(spec: job_spec_pb2.JobSpec) -> SpecIndex:
    return SpecIndex(labels=dict(spec.labels), worker_types=worker_types_for(spec.requirements))


def is_state(value: int) -> bool:
    return value in _STATE_FROM_PB


def job_filter(request: pb.ListJobsRequest) -> JobFilter:
    return JobFilter(
        # Each state once: a filter repeated costs one SQL parameter per repeat.
        states=tuple(
            dict.fromkeys(state_from_pb(v, f"states[{i}]") for i, v in enumerate(request.states))
        ),
        labels=tuple(sorted(request.labels.items())),
        worker_type=request.worker_type,
        created_after=pbtime.from_timestamp(request.created_after)
        if request.HasField("created_after")
        else None,
        created_before=pbtime.from_timestamp(request.created_before)
        if request.HasField("created_before")
        else None,
    )


def spec_message(text: str) -> job_spec_pb2.JobSpec:
    return json_format.Parse(text, job_spec_pb2.JobSpec())


def state_to_pb(state: JobState) -> pb.JobState.ValueType:
    return _STATE_TO_PB[state]


def state_from_pb(value: int, field: str = "state") -> JobState:
    try:
        return _STATE_FROM_PB[value]  # type: ignore[index]
    except KeyError:
        raise InvalidArgument(
            f"{field}: {value} is not a job state",
            violations=[(field, f"{value} is not a job state")],
        ) from None


def job_message(job: Job, spec: job_spec_pb2.JobSpec | None = None) -> pb.Job:
    """``spec``: the job's spec when the caller holds it already (a submit's own, whose
    canonical form is the job's spec_json), saving its parse."""
    message = pb.Job(
        job_id=job.job_id,
        state=state_to_pb(job.state),
        spec=spec if spec is not None else spec_message(job.spec_json),
        request_id=job.request_id or "",
        generation=job.generation,
        attempts=job.attempts,
        output_tail=text_view(job.output_tail),
        output_tail_bytes=job.output_tail,
        error=job.error,
        worker_id=job.worker_id,
        create_time=pbtime.timestamp(job.created_at),
        update_time=pbtime.timestamp(job.updated_at),
        start_time=pbtime.timestamp(job.started_at),
        end_time=pbtime.timestamp(job.ended_at),
        trace_id=telemetry.trace_id_of(job.trace_context),
        output_bytes=job.output_bytes,
    )
    if job.exit_code is not None:
        message.exit_code = job.exit_code
    return message


def output_message(
    generation: int, attempt: int, chunk: OutputChunk, after: int
) -> pb.GetJobOutputResponse:
    """The part of ``chunk`` past offset ``after``."""
    skip = max(0, after - chunk.start)
    return pb.GetJobOutputResponse(
        generation=generation, attempt=attempt, offset=chunk.start + skip, data=chunk.data[skip:]
    )


def event_message(event: JobEvent) -> pb.JobEvent:
    return pb.JobEvent(
        job_id=event.job_id,
        generation=event.generation,
        state=state_to_pb(event.state),
        event_time=pbtime.timestamp(event.at),
        actor=event.actor,
        reason=event.reason,
    )


def status_update(request: pb.UpdateJobStatusRequest, fallback_time: object) -> StatusUpdate:
    at = (
        pbtime.from_timestamp(request.event_time)
        if request.HasField("event_time")
        else fallback_time
    )
    return StatusUpdate(
        job_id=request.job_id,
        generation=request.generation,
        sequence=request.sequence,
        state=state_from_pb(request.state),
        at=at,  # type: ignore[arg-type]
        attempt=request.attempt,
        worker_id=request.worker_id,
        exit_code=request.exit_code if request.HasField("exit_code") else None,
        output_tail=sent_bytes(request.output_tail_bytes, request.output_tail),
        error=request.error,
        reason=request.reason,
        actor=request.actor,
        output_bytes=(
            request.total_output_bytes if request.HasField("total_output_bytes") else None
        ),
        execution_id=request.execution_id,
    )
