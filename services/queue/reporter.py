"""Delivers the queue's outbox (item transitions) to the jobs service: a batch at a time
with BatchUpdateJobStatus, or one message with UpdateJobStatus."""

from __future__ import annotations

import grpc
from blixard.jobs.v1 import jobs_service_pb2 as jpb
from blixard.jobs.v1 import jobs_service_pb2_grpc as jpb_grpc

from services.common.client import call, delivery_error, one_by_one, rpc_delivery_error
from services.common.outbox import Message
from services.queue import convert

CALL_TIMEOUT = 5.0
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]


class UpdateRefused(Exception):
    """The jobs service refused one update of a batch for a reason of no known kind (kept,
    tried again later, parked after the relay's max_tries)."""


class JobsReporter:
    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = jpb_grpc.JobServiceStub(channel)

    def __call__(self, message: Message) -> None:
        try:
            call(self._stub.UpdateJobStatus, convert.update_request(message.payload), CALL_TIMEOUT)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise rpc_delivery_error(exc) from None
            # The jobs service does not know this job: nothing there to update.

    def many(self, messages: list[Message]) -> list[Exception | None]:
        request = jpb.BatchUpdateJobStatusRequest(
            requests=[convert.update_request(m.payload) for m in messages]
        )
        try:
            response: jpb.BatchUpdateJobStatusResponse = call(  # type: ignore[assignment]
                self._stub.BatchUpdateJobStatus, request, CALL_TIMEOUT
            )
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise rpc_delivery_error(exc) from None
            return one_by_one(messages, self)  # a jobs service from before the batch call
        outcomes: list[Exception | None] = []
        for result in response.results:
            error = result.error if result.HasField("error") else None
            if error is None or error.code == NOT_FOUND:  # an unknown job: nothing to update
                outcomes.append(None)
            else:  # INVALID_ARGUMENT and the like: parked after a few tries
                text = f"{error.reason}: {error.message}"
                outcomes.append(delivery_error(error.code, text, UpdateRefused))
        return outcomes
