"""Channels to the other services: a deadline on every call (callers pass one), retries of
UNAVAILABLE, and of ABORTED for the idempotent calls (service config), tracing, and the
bearer token when one is set."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TypeVar

import grpc

from services.common import telemetry
from services.common.auth import BearerTokenInterceptor
from services.common.errors import describe
from services.common.outbox import Refused, Stalled, Transient
from services.common.server import MAX_MESSAGE_BYTES

T = TypeVar("T")

# The calls that are asked again after ABORTED too (a deadlock or a serialization failure
# undid them, or a concurrent change won: nothing was written). Each is idempotent by its
# contract: a read, a request_id, a (job, generation), a sequence number, an offset, a
# lease renewal. The others (Complete, CancelJob, RetryJob, ...) leave ABORTED to their
# caller, which decides with what it knows.
IDEMPOTENT: dict[str, tuple[str, ...]] = {
    "blixard.jobs.v1.JobService": (
        "SubmitJob",
        "GetJob",
        "ListJobs",
        "ListJobEvents",
        "WatchJob",
        "GetJobOutput",
        "UpdateJobStatus",
        "BatchUpdateJobStatus",
        "AppendJobOutput",
    ),
    "blixard.queue.v1.QueueService": (
        "Enqueue",
        "BatchEnqueue",
        "Heartbeat",
        "RegisterWorker",
        "GetItem",
        "ListItems",
        "GetStats",
        "ListWorkers",
    ),
    "blixard.vms.v1.VmService": ("GetVm", "ListVms", "GetManagerInfo"),
}


def _retry_policy(codes: list[str]) -> dict[str, object]:
    return {
        "maxAttempts": 4,
        "initialBackoff": "0.1s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": codes,
    }


_RETRY_CONFIG = json.dumps(
    {
        "methodConfig": [
            {"name": [{}], "retryPolicy": _retry_policy(["UNAVAILABLE"])},
            {
                "name": [
                    {"service": service, "method": method}
                    for service, methods in IDEMPOTENT.items()
                    for method in methods
                ],
                "retryPolicy": _retry_policy(["UNAVAILABLE", "ABORTED"]),
            },
        ],
    }
)


def open_channel(target: str, token: str | None = None) -> grpc.Channel:
    options = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", _RETRY_CONFIG),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    channel: grpc.Channel = grpc.insecure_channel(target, options=options)
    if token:
        channel = grpc.intercept_channel(channel, BearerTokenInterceptor(token))
    return telemetry.trace_channel(channel)


TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)


# A receiver answering one of these about a message says it can never apply as it is
# (outbox messages so answered are parked after a few tries).
REFUSED_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)
# ... and with one of these it refuses the caller itself (its token, its role, a method it
# lacks): no message is to blame, they all wait for an operator.
STALLED_CODES = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def delivery_error(
    code: grpc.StatusCode | int, text: str, unknown: type[Exception] = RuntimeError
) -> Exception:
    """What a receiver's error (a status, or a google.rpc code of one item of a batch)
    means for an outbox message: Transient (out of reach, try again), Stalled (the relay
    is refused), Refused (this message cannot apply), else ``unknown`` (parked after
    more tries)."""
    if isinstance(code, int):
        code = _BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    if code in TRANSIENT_CODES:
        return Transient(text)
    if code in STALLED_CODES:
        return Stalled(text)
    if code in REFUSED_CODES:
        return Refused(text)
    return unknown(text)


def rpc_delivery_error(exc: grpc.RpcError) -> Exception:
    """``delivery_error`` for a failed call."""
    return delivery_error(exc.code(), str(describe(exc)))


def call(method: grpc.UnaryUnaryMultiCallable, request: object, timeout: float) -> object:
    """One call with a deadline; a failure worth retrying later raises ``Transient``."""
    try:
        return method(request, timeout=timeout)
    except grpc.RpcError as exc:
        if exc.code() in TRANSIENT_CODES:
            raise Transient(str(describe(exc))) from None
        raise


def one_by_one(items: Sequence[T], send: Callable[[T], object]) -> list[Exception | None]:
    """For a peer without a batch call: send each item alone, in order. None for each sent;
    the first failure is that item's answer and every later item's (they were not sent)."""
    answers: list[Exception | None] = []
    for item in items:
        try:
            send(item)
        except Exception as exc:
            return answers + [exc] * (len(items) - len(answers))
        answers.append(None)
    return answers
