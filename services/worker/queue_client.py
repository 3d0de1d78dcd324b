"""The worker's port to the queue: the contract's calls with deadlines, as plain values."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import cast

import grpc
from blixard.common.v1 import job_spec_pb2
from blixard.queue.v1 import queue_service_pb2 as qpb
from blixard.queue.v1 import queue_service_pb2_grpc as qpb_grpc

from services.common import pbtime
from services.common.client import TRANSIENT_CODES, call
from services.common.errors import describe
from services.common.outbox import Transient
from services.common.output import text_view

CALL_TIMEOUT = 10.0

OUTCOMES = {
    "SUCCEEDED": job_spec_pb2.OUTCOME_SUCCEEDED,
    "FAILED": job_spec_pb2.OUTCOME_FAILED,
    "CANCELLED": job_spec_pb2.OUTCOME_CANCELLED,
}


@dataclass(frozen=True)
class ClaimedItem:
    job_id: str
    generation: int
    attempt: int
    token: str
    spec: job_spec_pb2.JobSpec
    trace_context: dict[str, str]


class QueueClient:
    def __init__(self, channel: grpc.Channel, *, named_only: bool = False) -> None:
        """``named_only``: claim only items that name this worker's type (a vm worker
        leaves the jobs that accept any worker to the others)."""
        self._stub = qpb_grpc.QueueServiceStub(channel)
        self._named_only = named_only
        # The claims in flight, so a stop need not wait for a long poll to end. Reentrant:
        # interrupt() runs in a signal handler, maybe while this thread holds the lock.
        self._claims: set[grpc.Future] = set()
        self._claims_lock = threading.RLock()
        self._interrupted = False

    def register(self, worker_id: str, worker_type: str, slots: int) -> float | None:
        """Register; the queue's worker timeout in seconds (None: it did not say)."""
        response = cast(
            qpb.RegisterWorkerResponse,
            call(
                self._stub.RegisterWorker,
                qpb.RegisterWorkerRequest(
                    worker_id=worker_id, worker_type=worker_type, slots=slots
                ),
                CALL_TIMEOUT,
            ),
        )
        if not response.HasField("worker_timeout"):
            return None
        return pbtime.seconds(response.worker_timeout) or None

    def claim(
        self, worker_id: str, worker_type: str, max_items: int, lease_seconds: float, wait: float
    ) -> list[ClaimedItem]:
        request = qpb.ClaimRequest(
            worker_id=worker_id,
            worker_type=worker_type,
            max_items=max_items,
            lease_duration=pbtime.duration(lease_seconds),
            wait=pbtime.duration(wait),
            named_only=self._named_only,
        )
        with self._claims_lock:
            if self._interrupted:
                return []
            future = self._stub.Claim.future(request, timeout=CALL_TIMEOUT + wait)
            self._claims.add(future)
        try:
            response: qpb.ClaimResponse = future.result()
        except grpc.FutureCancelledError:
            return []  # interrupted: the queue hands a claim that went away nothing
        except grpc.RpcError as exc:
            if self._interrupted:
                return []
            if exc.code() in TRANSIENT_CODES:
                raise Transient(str(describe(exc))) from None
            raise
        finally:
            with self._claims_lock:
                self._claims.discard(future)
        return [
            ClaimedItem(
                lease.item.job_id,
                lease.item.generation,
                lease.item.attempt,
                lease.lease_token,
                lease.item.spec,
                dict(lease.item.trace_context),
            )
            for lease in response.leases
        ]

    def interrupt(self) -> None:
        """No more claims: the one waiting in a long poll is cancelled at once (it answers
        no items) and later ones answer none. Heartbeats and reports go on."""
        with self._claims_lock:
            self._interrupted = True
            waiting = list(self._claims)
        for future in waiting:
            future.cancel()

    def heartbeat(self, token: str) -> bool:
        """Extend the lease; True when the job was cancelled."""
        response: qpb.HeartbeatResponse = call(  # type: ignore[assignment]
            self._stub.Heartbeat, qpb.HeartbeatRequest(lease_token=token), CALL_TIMEOUT
        )
        return response.cancel_requested

    def complete(
        self,
        token: str,
        outcome: str,
        exit_code: int | None,
        output_tail: bytes,
        error: str,
        total_output_bytes: int | None = None,
        execution_id: str = "",
    ) -> None:
        """``total_output_bytes``: every byte the execution wrote; with it, the jobs service
        stores the tail as the execution's output (``execution_id``: its output calls' id)."""
        request = qpb.CompleteRequest(
            lease_token=token,
            outcome=OUTCOMES[outcome],
            output_tail_bytes=output_tail,
            output_tail=text_view(output_tail),  # for a queue that predates the bytes
            error=error,
            execution_id=execution_id,
        )
        if exit_code is not None:
            request.exit_code = exit_code
        if total_output_bytes is not None:
            request.total_output_bytes = total_output_bytes
        call(self._stub.Complete, request, CALL_TIMEOUT)

    def release(self, token: str, reason: str) -> None:
        call(self._stub.Release, qpb.ReleaseRequest(lease_token=token, reason=reason), CALL_TIMEOUT)
