"""The jobs service's port to the queue, over gRPC."""

from __future__ import annotations

import grpc
from blixard.queue.v1 import queue_service_pb2 as qpb
from blixard.queue.v1 import queue_service_pb2_grpc as qpb_grpc

from services.common.client import call
from services.jobs import convert
from services.jobs.domain import Job

CALL_TIMEOUT = 5.0


class GrpcQueue:
    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = qpb_grpc.QueueServiceStub(channel)

    def enqueue(self, job: Job) -> None:
        request = qpb.EnqueueRequest(
            job_id=job.job_id,
            generation=job.generation,
            spec=convert.spec_message(job.spec_json),
            trace_context=job.trace_context,
        )
        call(self._stub.Enqueue, request, CALL_TIMEOUT)

    def cancel(self, job_id: str, generation: int) -> None:
        try:
            call(
                self._stub.CancelItem,
                qpb.CancelItemRequest(job_id=job_id, generation=generation),
                CALL_TIMEOUT,
            )
        except grpc.RpcError as exc:
            # Nothing to cancel there (never enqueued, or already ended): done.
            if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                raise
