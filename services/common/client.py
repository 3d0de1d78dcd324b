"""Channels to the other services: a deadline on every call (callers pass one), retries of
UNAVAILABLE only (service config), tracing, and the bearer token when one is set."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TypeVar

import grpc

from services.common import telemetry
from services.common.auth import BearerTokenInterceptor
from services.common.errors import describe
from services.common.outbox import Transient
from services.common.server import MAX_MESSAGE_BYTES

T = TypeVar("T")

_RETRY_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
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
