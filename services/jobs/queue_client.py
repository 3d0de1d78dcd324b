"""The jobs service's port to the queue, over gRPC."""

from __future__ import annotations

import grpc
from blixard.queue.v1 import queue_service_pb2 as qpb
from blixard.queue.v1 import queue_service_pb2_grpc as qpb_grpc

from services.common.client import call, one_by_one
from services.jobs import convert
from services.jobs.domain import Job

CALL_TIMEOUT = 5.0


class EnqueueRefused(Exception):
    """The queue refused one job of a batch (it stays in the outbox, tried again later)."""


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
        call(self._stub.Enqueue, _enqueue_request(job), CALL_TIMEOUT)

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
                raise
            return one_by_one(jobs, self.enqueue)
        return [
            EnqueueRefused(f"{r.error.reason}: {r.error.message}") if r.HasField("error") else None
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
                raise
