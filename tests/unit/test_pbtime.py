"""services.common.pbtime: datetimes to protobuf Timestamps and back, exactly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from google.protobuf import timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st

from services.common import pbtime

ZONES = st.sampled_from(
    [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
)


@given(st.datetimes(timezones=ZONES))
def test_a_timestamp_is_protobufs_own_conversion_and_converts_back(value: datetime) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(value)

    got = pbtime.timestamp(value)

    assert got == expected
    assert pbtime.from_timestamp(got) == value


def test_a_naive_datetime_is_taken_as_utc_and_none_is_none() -> None:
    assert pbtime.timestamp(datetime(1969, 12, 31, 23, 59, 59, 500_000)) == (
        timestamp_pb2.Timestamp(seconds=-1, nanos=500_000_000)
    )
    assert pbtime.timestamp(None) is None
