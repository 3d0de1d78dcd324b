"""The gRPC edge of the queue service: check the request's shape, convert, call the manager."""

from __future__ import annotations

from contextlib import nullcontext

import grpc
from blixard.queue.v1 import queue_service_pb2 as pb
from blixard.queue.v1 import queue_service_pb2_grpc as pb_grpc

from services.common import paging, parked, pbtime, telemetry
from services.common.auth import Policy, Role
from services.common.errors import BlixardError
from services.common.jobspec import check_duration, check_labels, check_spec, check_worker_type
from services.common.jobspec import check_id as _check_id
from services.common.output import sent_bytes
from services.common.server import WaitSlots
from services.common.validation import Problems, check_each
from services.queue import convert
from services.queue.manager import Completion, QueueManager

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["QueueService"].full_name

_WORKER = frozenset({Role.WORKER})
_READ = frozenset({Role.CLIENT, Role.WORKER})
POLICY: Policy = {
    "Claim": _WORKER,
    "Heartbeat": _WORKER,
    "Complete": _WORKER,
    "BatchComplete": _WORKER,
    "Release": _WORKER,
    "RegisterWorker": _WORKER,
    "GetItem": _READ,
    "GetStats": _READ,
    "ListItems": _READ,
    "ListWorkers": _READ,
    # Enqueue, CancelItem, Redrive, DrainWorker, ListParkedMessages, RedriveParkedMessage,
    # DeleteParkedMessage: the jobs service and operators (admin).
}

MAX_ITEMS = 256
DEFAULT_LEASE_SECONDS = 30.0
MIN_LEASE_SECONDS = 1.0
MAX_LEASE_SECONDS = 3600.0
MAX_WAIT_SECONDS = 60.0
MAX_TAIL_BYTES = 64 * 1024
MAX_OUTPUT_BYTES = 2**62  # the jobs service keeps output offsets below this
MAX_BATCH = 256
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


MAX_ENQUEUE_BATCH = 500


# The jobs service takes status reports for job ids of at most 64 characters, and
# items.job_id is 64 wide: a longer item could never report its state.
MAX_JOB_ID = 64


def _check_job_id(value: str, problems: Problems) -> None:
    _check_id(value, "job_id", problems, at_most=MAX_JOB_ID)


def _check_enqueue(request: pb.EnqueueRequest, problems: Problems) -> None:
    _check_job_id(request.job_id, problems)
    problems.check(request.generation >= 1, "generation", "at least 1")
    if problems.check(request.HasField("spec"), "spec", "required"):
        check_spec(request.spec, "spec", problems)


def _check_worker(worker_id: str, worker_type: str, problems: Problems) -> None:
    _check_id(worker_id, "worker_id", problems)
    check_worker_type(worker_type, "worker_type", problems)


def _lease_seconds(
    request: pb.ClaimRequest | pb.HeartbeatRequest, problems: Problems
) -> float | None:
    if not request.HasField("lease_duration"):
        return None
    seconds = pbtime.seconds(request.lease_duration)
    problems.check(
        MIN_LEASE_SECONDS <= seconds <= MAX_LEASE_SECONDS,
        "lease_duration",
        f"between {MIN_LEASE_SECONDS:g}s and {MAX_LEASE_SECONDS:g}s",
    )
    return seconds


def _completion(request: pb.CompleteRequest, prefix: str, problems: Problems) -> Completion | None:
    """Check one Complete; the problems are named with ``prefix`` (inside a batch)."""
    ok = problems.check(bool(request.lease_token), f"{prefix}lease_token", "required")
    outcome = convert.outcome(request.outcome)
    ok &= problems.check(
        outcome is not None,
        f"{prefix}outcome",
        "required: OUTCOME_SUCCEEDED, OUTCOME_FAILED or OUTCOME_CANCELLED",
    )
    tail = sent_bytes(request.output_tail_bytes, request.output_tail)
    ok &= problems.check(
        len(tail) <= MAX_TAIL_BYTES,
        f"{prefix}output_tail_bytes" if request.output_tail_bytes else f"{prefix}output_tail",
        f"at most {MAX_TAIL_BYTES} bytes",
    )
    ok &= problems.check(len(request.error) <= 4096, f"{prefix}error", "at most 4096 characters")
    total = request.total_output_bytes if request.HasField("total_output_bytes") else None
    if total is not None:
        ok &= problems.check(
            len(tail) <= total <= MAX_OUTPUT_BYTES,
            f"{prefix}total_output_bytes",
            f"at least the tail's length, below {MAX_OUTPUT_BYTES}",
        )
    ok &= problems.check(
        len(request.execution_id) <= 64, f"{prefix}execution_id", "at most 64 characters"
    )
    if not ok or outcome is None:
        return None
    return Completion(
        request.lease_token,
        outcome,
        request.exit_code if request.HasField("exit_code") else None,
        tail,
        request.error,
        total,
        request.execution_id,
    )


class QueueServicer(parked.ParkedRpcs, pb_grpc.QueueServiceServicer):
    """ListParkedMessages, RedriveParkedMessage and DeleteParkedMessage: parked.ParkedRpcs."""

    parked_contract = pb

    def __init__(self, manager: QueueManager, waits: WaitSlots) -> None:
        self.manager = manager
        self.parked_messages = manager.parked
        self._waits = waits
        self._tracer = telemetry.tracer(__name__)

    def Enqueue(
        self, request: pb.EnqueueRequest, context: grpc.ServicerContext
    ) -> pb.EnqueueResponse:
        problems = Problems()
        _check_enqueue(request, problems)
        problems.raise_if_any()
        item, created = self.manager.enqueue(convert.new_item(request))
        return pb.EnqueueResponse(item=convert.item_message(item), created=created)

    def BatchEnqueue(
        self, request: pb.BatchEnqueueRequest, context: grpc.ServicerContext
    ) -> pb.BatchEnqueueResponse:
        batch = check_each(request.requests, _check_enqueue, at_most=MAX_ENQUEUE_BATCH)
        news = [convert.new_item(one) for one in batch.valid]
        # Each job's own trace shows its enqueue: one span per item, under the trace
        # context it carries, for the transaction that enqueued them all.
        with telemetry.span_per_item(
            self._tracer,
            "queue.enqueue",
            (
                (
                    new.trace_context,
                    {"blixard.job_id": new.job_id, "blixard.generation": new.generation},
                )
                for new in news
            ),
        ):
            done = self.manager.enqueue_many(news) if news else []
        results = []
        for answer in batch.merge(done):
            if isinstance(answer, BlixardError):
                results.append(pb.BatchEnqueueResult(error=convert.batch_error(answer)))
            else:
                item, created = answer
                response = pb.EnqueueResponse(item=convert.item_message(item), created=created)
                results.append(pb.BatchEnqueueResult(response=response))
        return pb.BatchEnqueueResponse(results=results)

    def Claim(self, request: pb.ClaimRequest, context: grpc.ServicerContext) -> pb.ClaimResponse:
        problems = Problems()
        _check_worker(request.worker_id, request.worker_type, problems)
        check_labels(request.labels, "labels", problems)
        problems.check(request.max_items <= MAX_ITEMS, "max_items", f"at most {MAX_ITEMS} (0 = 1)")
        lease = _lease_seconds(request, problems) or DEFAULT_LEASE_SECONDS
        wait = pbtime.seconds(request.wait) if request.HasField("wait") else 0.0
        problems.check(
            0 <= wait <= MAX_WAIT_SECONDS, "wait", f"between 0 and {MAX_WAIT_SECONDS:g}s"
        )
        problems.raise_if_any()
        # Never hold a long poll past the client's own deadline.
        remaining = context.time_remaining()
        if remaining is not None:
            wait = max(0.0, min(wait, remaining - 1.0))
        # With every waiting slot taken, the claim answers at once with what there is (the
        # worker asks again shortly), so idle workers never hold the threads other calls need.
        with self._waits.hold() if wait > 0 else nullcontext(False) as may_wait:
            leases = self.manager.claim(
                request.worker_id,
                request.worker_type,
                dict(request.labels),
                request.max_items or 1,
                lease,
                wait if may_wait else 0.0,
                named_only=request.named_only,
                caller_waiting=context.is_active,
            )
        return pb.ClaimResponse(leases=[convert.lease_message(lease) for lease in leases])

    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatResponse:
        problems = Problems()
        problems.check(bool(request.lease_token), "lease_token", "required")
        lease = _lease_seconds(request, problems)
        problems.raise_if_any()
        item = self.manager.heartbeat(request.lease_token, lease)
        return pb.HeartbeatResponse(
            deadline=pbtime.timestamp(item.lease_deadline), cancel_requested=item.cancel_requested
        )

    def Complete(
        self, request: pb.CompleteRequest, context: grpc.ServicerContext
    ) -> pb.CompleteResponse:
        problems = Problems()
        completion = _completion(request, "", problems)
        problems.raise_if_any()
        assert completion is not None
        item = self.manager.complete(
            completion.token,
            completion.outcome,
            completion.exit_code,
            completion.output_tail,
            completion.error,
            output_bytes=completion.output_bytes,
            execution_id=completion.execution_id,
        )
        return pb.CompleteResponse(item=convert.item_message(item))

    def BatchComplete(
        self, request: pb.BatchCompleteRequest, context: grpc.ServicerContext
    ) -> pb.BatchCompleteResponse:
        # Each completion is checked on its own (the edge rule, then its shape): a bad one
        # gets its own INVALID_ARGUMENT result and the others are applied.
        def check(one: pb.CompleteRequest, problems: Problems) -> None:
            _completion(one, "", problems)

        batch = check_each(request.requests, check, at_most=MAX_BATCH)
        completions = [c for c in (_completion(one, "", Problems()) for one in batch.valid) if c]
        done = self.manager.complete_many(completions) if completions else []
        return pb.BatchCompleteResponse(
            results=[convert.batch_result(r) for r in batch.merge(done)]
        )

    def Release(
        self, request: pb.ReleaseRequest, context: grpc.ServicerContext
    ) -> pb.ReleaseResponse:
        problems = Problems()
        problems.check(bool(request.lease_token), "lease_token", "required")
        problems.check(len(request.reason) <= 1024, "reason", "at most 1024 characters")
        problems.raise_if_any()
        item = self.manager.release(request.lease_token, request.reason)
        return pb.ReleaseResponse(item=convert.item_message(item))

    def CancelItem(
        self, request: pb.CancelItemRequest, context: grpc.ServicerContext
    ) -> pb.CancelItemResponse:
        problems = Problems()
        _check_job_id(request.job_id, problems)
        problems.raise_if_any()
        item = self.manager.cancel(request.job_id, request.generation)
        return pb.CancelItemResponse(item=convert.item_message(item))

    def Redrive(
        self, request: pb.RedriveRequest, context: grpc.ServicerContext
    ) -> pb.RedriveResponse:
        problems = Problems()
        _check_job_id(request.job_id, problems)
        problems.raise_if_any()
        return pb.RedriveResponse(item=convert.item_message(self.manager.redrive(request.job_id)))

    def GetItem(
        self, request: pb.GetItemRequest, context: grpc.ServicerContext
    ) -> pb.GetItemResponse:
        problems = Problems()
        _check_job_id(request.job_id, problems)
        problems.raise_if_any()
        return pb.GetItemResponse(item=convert.item_message(self.manager.get(request.job_id)))

    def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.ServicerContext
    ) -> pb.GetStatsResponse:
        problems = Problems()
        within = 30.0
        if request.HasField("expiring_within") and check_duration(
            request.expiring_within, "expiring_within", problems
        ):
            within = pbtime.seconds(request.expiring_within)
            problems.check(0 <= within <= 86400, "expiring_within", "between 0 and 1 day")
        problems.raise_if_any()
        stats = self.manager.stats(within)
        return pb.GetStatsResponse(
            items_by_state={f"ITEM_STATE_{state}": n for state, n in stats.by_state.items()},
            oldest_waiting_age=pbtime.duration(stats.oldest_waiting_age),
            waiting_by_worker_types=stats.waiting_by_worker_types,
            leases_expiring=stats.leases_expiring,
            parked_messages=stats.parked_messages,
            outbox_pending=stats.outbox_pending,
        )

    def ListItems(
        self, request: pb.ListItemsRequest, context: grpc.ServicerContext
    ) -> pb.ListItemsResponse:
        problems = Problems()
        problems.check(
            0 <= request.page_size <= MAX_PAGE_SIZE, "page_size", f"between 0 and {MAX_PAGE_SIZE}"
        )
        position = paging.decode(request.page_token, 1, problems)
        after = position[0] if position else ""
        states = []
        for i, value in enumerate(request.states):
            state = convert.item_state(value)
            if problems.check(state is not None, f"states[{i}]", f"{value} is not an item state"):
                assert state is not None
                if state not in states:  # each once: one SQL parameter per state
                    states.append(state)
        if request.worker_type:
            check_worker_type(request.worker_type, "worker_type", problems)
        problems.raise_if_any()
        items, last = self.manager.list_items(
            request.page_size or DEFAULT_PAGE_SIZE, after, states, request.worker_type
        )
        messages = [convert.item_message(item) for item in items]
        fit = paging.fitting(messages)
        if fit < len(messages):  # large items: the page ends early, the next starts there
            last = items[fit - 1].job_id
        return pb.ListItemsResponse(
            items=messages[:fit], next_page_token=paging.encode(last) if last else ""
        )

    def RegisterWorker(
        self, request: pb.RegisterWorkerRequest, context: grpc.ServicerContext
    ) -> pb.RegisterWorkerResponse:
        problems = Problems()
        _check_worker(request.worker_id, request.worker_type, problems)
        check_labels(request.labels, "labels", problems)
        problems.check(request.slots <= 1024, "slots", "at most 1024")
        problems.raise_if_any()
        worker = self.manager.register_worker(
            request.worker_id, request.worker_type, dict(request.labels), request.slots or 1
        )
        return pb.RegisterWorkerResponse(
            worker=convert.worker_message(worker),
            worker_timeout=pbtime.duration(self.manager.worker_timeout),
        )

    def ListWorkers(
        self, request: pb.ListWorkersRequest, context: grpc.ServicerContext
    ) -> pb.ListWorkersResponse:
        return pb.ListWorkersResponse(
            workers=[convert.worker_message(w) for w in self.manager.workers()]
        )

    def DrainWorker(
        self, request: pb.DrainWorkerRequest, context: grpc.ServicerContext
    ) -> pb.DrainWorkerResponse:
        problems = Problems()
        _check_id(request.worker_id, "worker_id", problems)
        problems.raise_if_any()
        worker = self.manager.drain_worker(request.worker_id)
        return pb.DrainWorkerResponse(worker=convert.worker_message(worker))
