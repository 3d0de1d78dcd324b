"""What a receiver's answer means for an outbox message: wait, park, or wait for an
operator. A per-item error of a batch (a google.rpc code) reads like a call's status."""

from __future__ import annotations

import grpc
import pytest

from services.common.client import delivery_error
from services.common.outbox import Refused, Stalled, Transient


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (grpc.StatusCode.UNAVAILABLE, Transient),
        (grpc.StatusCode.ABORTED, Transient),  # a deadlock, retried
        (grpc.StatusCode.DEADLINE_EXCEEDED, Transient),
        (grpc.StatusCode.UNAUTHENTICATED, Stalled),  # the relay's token, not the message
        (grpc.StatusCode.PERMISSION_DENIED, Stalled),
        (grpc.StatusCode.INVALID_ARGUMENT, Refused),  # parked after a few tries
        (grpc.StatusCode.FAILED_PRECONDITION, Refused),
        (grpc.StatusCode.OUT_OF_RANGE, Refused),
        (grpc.StatusCode.INTERNAL, RuntimeError),  # unknown: parked after more tries
    ],
)
def test_each_code_means_what_the_relay_does_with_the_message(
    code: grpc.StatusCode, kind: type[Exception]
) -> None:
    assert type(delivery_error(code, "x")) is kind
    assert type(delivery_error(code.value[0], "x")) is kind  # as a batch item's code


def test_a_stalled_relay_still_waits_like_an_unreachable_one() -> None:
    assert isinstance(delivery_error(grpc.StatusCode.UNAUTHENTICATED, "x"), Transient)
