"""The only module of the queue service that knows both protobuf messages and domain types."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

from blixard.common.v1 import job_spec_pb2
from blixard.jobs.v1 import jobs_service_pb2 as jpb
from blixard.queue.v1 import queue_service_pb2 as pb

from services.common import pbtime
from services.common.errors import BlixardError
from services.common.jobspec import worker_types_for
from services.common.output import text_view
from services.queue.domain import Item, ItemState, NewItem, Outcome, Worker, WorkerState
from services.queue.manager import Lease

_OUTCOMES = {
    job_spec_pb2.OUTCOME_SUCCEEDED: Outcome.SUCCEEDED,
    job_spec_pb2.OUTCOME_FAILED: Outcome.FAILED,
    job_spec_pb2.OUTCOME_CANCELLED: Outcome.CANCELLED,
}


def new_item(request: pb.EnqueueRequest) -> NewItem:
    spec = request.spec
    return NewItem(
        job_id=request.job_id,
        generation=request.generation,
        spec=spec.SerializeToString(deterministic=True),
        priority=spec.priority,
        max_attempts=spec.max_attempts,
        run_at=pbtime.from_timestamp(spec.run_at) if spec.HasField("run_at") else None,
        worker_types=worker_types_for(spec.requirements),
        labels=dict(spec.requirements.labels),
        trace_context=dict(request.trace_context),
    )


_ITEM_STATES = {pb.ItemState.Value(f"ITEM_STATE_{s.value}"): s for s in ItemState}


def item_state(value: int) -> ItemState | None:
    return _ITEM_STATES.get(value)  # type: ignore[call-overload, no-any-return]


def outcome(value: int) -> Outcome | None:
    return _OUTCOMES.get(value)  # type: ignore[call-overload, no-any-return]


_ITEM_STATE_VALUES = {state: value for value, state in _ITEM_STATES.items()}


def item_message(item: Item) -> pb.WorkItem:
    message = pb.WorkItem(
        job_id=item.job_id,
        generation=item.generation,
        state=_ITEM_STATE_VALUES[item.state],
        attempt=item.attempt,
        max_attempts=item.max_attempts,
        run_at=pbtime.timestamp(item.run_at),
        worker_id=item.worker_id,
        lease_deadline=pbtime.timestamp(item.lease_deadline),
        cancel_requested=item.cancel_requested,
        output_tail=text_view(item.output_tail),
        output_tail_bytes=item.output_tail,
        error=item.error,
        trace_context=item.trace_context,
    )
    message.spec.MergeFromString(item.spec)  # parsed in place: no copy of a parsed spec
    if item.exit_code is not None:
        message.exit_code = item.exit_code
    return message


def batch_error(error: BlixardError) -> pb.BatchCompleteError:
    return pb.BatchCompleteError(
        code=error.code.value[0], reason=error.reason, message=error.message
    )


def batch_result(result: Item | BlixardError) -> pb.BatchCompleteResult:
    if isinstance(result, BlixardError):
        return pb.BatchCompleteResult(error=batch_error(result))
    return pb.BatchCompleteResult(item=item_message(result))


def lease_message(lease: Lease) -> pb.Lease:
    return pb.Lease(
        item=item_message(lease.item),
        lease_token=lease.token,
        deadline=pbtime.timestamp(lease.deadline),
    )


def worker_message(worker: Worker) -> pb.Worker:
    return pb.Worker(
        worker_id=worker.worker_id,
        worker_type=worker.worker_type,
        labels=worker.labels,
        slots=worker.slots,
        state=pb.WorkerState.Value(f"WORKER_STATE_{worker.state.value}"),
        last_seen_time=pbtime.timestamp(worker.last_seen),
        drained=worker.drained,
    )


def state_name(state: ItemState) -> str:
    return f"ITEM_STATE_{state.value}"


_JOB_STATES = {name.removeprefix("JOB_STATE_"): value for name, value in jpb.JobState.items()}


def update_request(payload: dict[str, Any]) -> jpb.UpdateJobStatusRequest:
    """A report from the outbox (a Report's fields, ``at`` in ISO form), as the jobs
    contract's UpdateJobStatus. Read straight from the payload: the relay converts every
    report it sends."""
    if "output_tail_base64" in payload:
        tail = base64.b64decode(payload["output_tail_base64"])
    else:  # written before the output tail was kept as bytes
        tail = payload.get("output_tail", "").encode()
    request = jpb.UpdateJobStatusRequest(
        job_id=payload["job_id"],
        generation=payload["generation"],
        sequence=payload["sequence"],
        state=_JOB_STATES[payload["job_state"]],
        attempt=payload["attempt"],
        worker_id=payload.get("worker_id", ""),
        output_tail=text_view(tail),
        output_tail_bytes=tail,
        error=payload.get("error", ""),
        event_time=pbtime.timestamp(datetime.fromisoformat(payload["at"])),
        reason=payload.get("reason", ""),
        actor=payload.get("actor", ""),  # absent in reports written before it
    )
    if payload.get("exit_code") is not None:
        request.exit_code = payload["exit_code"]
    if payload.get("output_bytes") is not None:
        request.total_output_bytes = payload["output_bytes"]
        request.execution_id = payload.get("execution_id", "")
    return request


__all__ = ["WorkerState", "state_name"]
