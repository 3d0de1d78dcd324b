"""The jobs service's port to the queue, over gRPC."""

from __future__ import annotations

import grpc
from blixard.queue.v1 import queue_service_pb2 as qpb
from blixard.queue.v1 import queue_service_pb2_grpc as qpb_grpc

from services.common.client import call, delivery_error, one_by_one, rpc_delivery_error
from services.jobs import convert
from services.jobs.domain import Job

CALL_TIMEOUT = 5.0


class EnqueueRefused(Exception):
    """The queue refused one job of a batch for a reason of no known kind (it stays in the
    outbox, tried again later, parked after the relay's max_tries)."""


def _enqueue_request(job: Job) -> qpb.EnqueueRequest:
    return qpb.EnqueueRequest(
        job_id=job.job_id,
        generation=job.generation,
        spec=convert.spec_message(job.spec_json),
        trace_context=job.trace_context,
    )


class GrpcQueue:
    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = qpb_grpc.QueueServiceStub(channel)

    def enqueue(self, job: Job) -> None:
        try:
            call(self._stub.Enqueue, _enqueue_request(job), CALL_TIMEOUT)
        except grpc.RpcError as exc:
            raise rpc_delivery_error(exc) from None

    def enqueue_many(self, jobs: list[Job]) -> list[Exception | None]:
        """One BatchEnqueue: for each job, None (enqueued, or already there) or why the
        queue refused it. A queue without the batch call gets them one by one."""
        request = qpb.BatchEnqueueRequest(requests=[_enqueue_request(job) for job in jobs])
        try:
            response: qpb.BatchEnqueueResponse = call(  # type: ignore[assignment]
                self._stub.BatchEnqueue, request, CALL_TIMEOUT
            )
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise rpc_delivery_error(exc) from None
            return one_by_one(jobs, self.enqueue)
        return [
            delivery_error(r.error.code, f"{r.error.reason}: {r.error.message}", EnqueueRefused)
            if r.HasField("error")
            else None
            for r in response.results
        ]

    def cancel(self, job_id: str, generation: int, timeout: float = CALL_TIMEOUT) -> None:
        try:
            call(
                self._stub.CancelItem,
                qpb.CancelItemRequest(job_id=job_id, generation=generation),
                timeout,
            )
        except grpc.RpcError as exc:
            # Nothing to cancel there (already ended; an older queue without cancels
            # ahead of their enqueue also says NOT_FOUND): done.
            if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                raise rpc_delivery_error(exc) from None
