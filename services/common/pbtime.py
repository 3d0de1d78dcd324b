"""Timestamps and durations between protobuf and Python, shared by every convert.py."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import duration_pb2, timestamp_pb2

from services.common.clock import to_utc

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    # Exact (no float), and several times faster than Timestamp.FromDatetime.
    delta = to_utc(value) - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1_000
    )


def from_timestamp(message: timestamp_pb2.Timestamp) -> datetime:
    return message.ToDatetime(tzinfo=UTC)


def duration(seconds: float) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromNanoseconds(int(seconds * 1e9))
    return message


def seconds(message: duration_pb2.Duration) -> float:
    return message.ToNanoseconds() / 1e9


_MIN_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z
_MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z
_MAX_DURATION_SECONDS = 315_576_000_000  # 10,000 years


def timestamp_problem(message: timestamp_pb2.Timestamp) -> str | None:
    """Why a Timestamp is not valid (protobuf's rules), or None."""
    if not 0 <= message.nanos <= 999_999_999:
        return "nanos must be between 0 and 999,999,999"
    if not _MIN_SECONDS <= message.seconds <= _MAX_SECONDS:
        return "must be between 0001-01-01 and 9999-12-31"
    return None


def duration_problem(message: duration_pb2.Duration) -> str | None:
    """Why a Duration is not valid (protobuf's rules), or None."""
    if abs(message.seconds) > _MAX_DURATION_SECONDS or abs(message.nanos) > 999_999_999:
        return "out of range"
    if (message.seconds > 0 and message.nanos < 0) or (message.seconds < 0 and message.nanos > 0):
        return "seconds and nanos must have the same sign"
    return None
