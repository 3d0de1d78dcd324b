"""The worker's port to the jobs service: sending the output of the jobs it runs.

Output is best effort: while the jobs service is unreachable, calls fail at once (without
a network round trip) until a backoff has passed, so a worker whose jobs service is down
does not delay the completion of every job by a failing call.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

import grpc
from blixard.jobs.v1 import jobs_service_pb2 as jpb
from blixard.jobs.v1 import jobs_service_pb2_grpc as jpb_grpc

from services.common.backoff import backoff
from services.common.client import call
from services.common.outbox import Transient

CALL_TIMEOUT = 5.0


class OutputPort(Protocol):
    def append_output(
        self,
        job_id: str,
        generation: int,
        attempt: int,
        offset: int,
        data: bytes,
        total_bytes: int | None = None,
        execution_id: str = "",
    ) -> int:
        """Store a chunk; the offset after the last byte stored. Raises ``Transient`` when
        worth trying again later, ``grpc.RpcError`` when refused."""
        ...


class JobsClient:
    def __init__(self, channel: grpc.Channel, timeout: float = CALL_TIMEOUT) -> None:
        self._stub = jpb_grpc.JobServiceStub(channel)
        self._timeout = timeout
        self._lock = threading.Lock()
        self._failures = 0
        self._down_until = 0.0

    def append_output(
        self,
        job_id: str,
        generation: int,
        attempt: int,
        offset: int,
        data: bytes,
        total_bytes: int | None = None,
        execution_id: str = "",
    ) -> int:
        with self._lock:
            wait = self._down_until - time.monotonic()
        if wait > 0:
            raise Transient(f"the jobs service was unreachable; next try in {wait:.1f}s")
        request = jpb.AppendJobOutputRequest(
            job_id=job_id,
            generation=generation,
            attempt=attempt,
            offset=offset,
            data=data,
            execution_id=execution_id,
        )
        if total_bytes is not None:
            request.total_bytes = total_bytes
        try:
            response: jpb.AppendJobOutputResponse = call(  # type: ignore[assignment]
                self._stub.AppendJobOutput, request, self._timeout
            )
        except Transient:
            with self._lock:
                self._failures += 1
                self._down_until = time.monotonic() + backoff(self._failures, base=0.5, cap=10.0)
            raise
        with self._lock:
            self._failures = 0
        return response.next_offset
