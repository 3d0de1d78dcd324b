"""Delivers the queue's outbox (item transitions) to JobService.UpdateJobStatus."""

from __future__ import annotations

import grpc
from blixard.jobs.v1 import jobs_service_pb2_grpc as jpb_grpc

from services.common.client import call
from services.common.outbox import Message
from services.queue import convert

CALL_TIMEOUT = 5.0


class JobsReporter:
    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = jpb_grpc.JobServiceStub(channel)

    def __call__(self, message: Message) -> None:
        try:
            call(self._stub.UpdateJobStatus, convert.update_request(message.payload), CALL_TIMEOUT)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            # The jobs service does not know this job: nothing there to update.
