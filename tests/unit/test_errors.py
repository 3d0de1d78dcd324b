"""services.common.errors: each domain error becomes the right status with google.rpc details."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

from services.common.errors import (
    DOMAIN,
    INTERNAL_STATUS,
    STORE_FULL,
    STORE_UNAVAILABLE,
    Aborted,
    AlreadyExists,
    BlixardError,
    ErrorInterceptor,
    FailedPrecondition,
    InvalidArgument,
    LoopFailures,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    abort,
    describe,
    store_problem,
    to_status,
)

DETAIL_TYPES: list[type[Message]] = [
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.ResourceInfo,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.RetryInfo,
]


def decode(status: grpc.Status) -> tuple[status_pb2.Status, dict[str, Message]]:
    """The rich status from the trailing metadata, and its details by type name."""
    [blob] = [v for k, v in status.trailing_metadata if k == "grpc-status-details-bin"]
    rich = status_pb2.Status.FromString(blob)
    details: dict[str, Message] = {}
    for packed in rich.details:
        for kind in DETAIL_TYPES:
            if packed.Is(kind.DESCRIPTOR):
                message = kind()
                packed.Unpack(message)
                assert kind.__name__ not in details, f"two {kind.__name__} details"
                details[kind.__name__] = message
                break
        else:
            pytest.fail(f"unexpected detail {packed.type_url}")
    assert rich.code == status.code.value[0]
    assert rich.message == status.details
    return rich, details


def info_of(details: dict[str, Message]) -> error_details_pb2.ErrorInfo:
    info = details["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.domain == DOMAIN
    return info


def test_base_error_is_internal() -> None:
    status = to_status(BlixardError())
    assert status.code is grpc.StatusCode.INTERNAL
    assert status.details == "internal error"
    _, details = decode(status)
    assert set(details) == {"ErrorInfo"}
    assert info_of(details).reason == "INTERNAL"


def test_invalid_argument_lists_every_field_violation() -> None:
    error = InvalidArgument(
        "the request has 2 problems", violations=[("spec.command", "required"), ("page_size", "x")]
    )
    status = to_status(error)
    assert status.code is grpc.StatusCode.INVALID_ARGUMENT
    assert status.details == "the request has 2 problems"
    _, details = decode(status)
    assert set(details) == {"ErrorInfo", "BadRequest"}
    assert info_of(details).reason == "INVALID_ARGUMENT"
    bad = details["BadRequest"]
    assert [(v.field, v.description) for v in bad.field_violations] == [  # type: ignore[attr-defined]
        ("spec.command", "required"),
        ("page_size", "x"),
    ]


def test_not_found_carries_the_resource() -> None:
    status = to_status(NotFound("job", "j-1"))
    assert status.code is grpc.StatusCode.NOT_FOUND
    assert status.details == "job 'j-1' not found"
    _, details = decode(status)
    assert set(details) == {"ErrorInfo", "ResourceInfo"}
    assert info_of(details).reason == "NOT_FOUND"
    resource = details["ResourceInfo"]
    assert (resource.resource_type, resource.resource_name) == ("job", "j-1")  # type: ignore[attr-defined]


def test_already_exists() -> None:
    status = to_status(AlreadyExists("request_id r-1 was used with another spec"))
    assert status.code is grpc.StatusCode.ALREADY_EXISTS
    assert status.details == "request_id r-1 was used with another spec"
    _, details = decode(status)
    assert set(details) == {"ErrorInfo"}
    assert info_of(details).reason == "ALREADY_EXISTS"


def test_failed_precondition_carries_the_violation_and_metadata() -> None:
    error = FailedPrecondition(
        "job j-1 is SUCCEEDED",
        subject="jobs/j-1",
        reason="ILLEGAL_TRANSITION",
        metadata={"current_state": "SUCCEEDED"},
    )
    status = to_status(error)
    assert status.code is grpc.StatusCode.FAILED_PRECONDITION
    assert status.details == "job j-1 is SUCCEEDED"
    _, details = decode(status)
    assert set(details) == {"ErrorInfo", "PreconditionFailure"}
    info = info_of(details)
    assert info.reason == "ILLEGAL_TRANSITION"
    assert dict(info.metadata) == {"current_state": "SUCCEEDED"}
    [violation] = details["PreconditionFailure"].violations  # type: ignore[attr-defined]
    assert (violation.type, violation.subject, violation.description) == (
        "STATE",
        "jobs/j-1",
        "job j-1 is SUCCEEDED",
    )


def test_aborted_is_a_conflict() -> None:
    status = to_status(Aborted())
    assert status.code is grpc.StatusCode.ABORTED
    assert status.details == "a concurrent change won; try again"
    _, details = decode(status)
    assert set(details) == {"ErrorInfo"}
    assert info_of(details).reason == "CONFLICT"


@pytest.mark.parametrize(
    ("error", "code", "reason", "seconds"),
    [
        (
            ResourceExhausted("queue full", retry_after=2.5, reason="QUEUE_FULL"),
            "RESOURCE_EXHAUSTED",
            "QUEUE_FULL",
            2.5,
        ),
        (Unavailable(), "UNAVAILABLE", "UNAVAILABLE", 1.0),
        (Unavailable("store down", retry_after=0.25), "UNAVAILABLE", "UNAVAILABLE", 0.25),
    ],
)
def test_retryable_errors_carry_retry_info(
    error: BlixardError, code: str, reason: str, seconds: float
) -> None:
    status = to_status(error)
    assert status.code is grpc.StatusCode[code]
    assert status.details == error.message
    _, details = decode(status)
    assert set(details) == {"ErrorInfo", "RetryInfo"}
    assert info_of(details).reason == reason
    delay = details["RetryInfo"].retry_delay  # type: ignore[attr-defined]
    assert delay.ToNanoseconds() == int(seconds * 1e9)


@pytest.mark.parametrize(
    ("error", "code", "reason"),
    [
        (Unauthenticated(), grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
        (PermissionDenied(), grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
    ],
)
def test_auth_errors(error: BlixardError, code: grpc.StatusCode, reason: str) -> None:
    status = to_status(error)
    assert status.code is code
    assert status.details == error.default_message
    _, details = decode(status)
    assert info_of(details).reason == reason


def test_custom_reason_and_metadata_travel() -> None:
    status = to_status(Unavailable(reason="VM_MANAGER_UNAVAILABLE", metadata={"why": "skip"}))
    info = info_of(decode(status)[1])
    assert info.reason == "VM_MANAGER_UNAVAILABLE"
    assert dict(info.metadata) == {"why": "skip"}


# ---- the edge: abort and the interceptor ------------------------------------------------


class Stop(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.statuses: list[grpc.Status] = []

    def abort_with_status(self, status: grpc.Status) -> None:
        self.statuses.append(status)
        raise Stop

    def code(self) -> grpc.StatusCode | None:
        return None


def test_abort_with_a_domain_error() -> None:
    context = FakeContext()
    with pytest.raises(Stop):
        abort(context, NotFound("job", "j-9"))  # type: ignore[arg-type]
    [status] = context.statuses
    assert status.code is grpc.StatusCode.NOT_FOUND
    assert status.details == "job 'j-9' not found"


def test_abort_with_an_unexpected_error_hides_it() -> None:
    context = FakeContext()
    with pytest.raises(Stop):
        abort(context, KeyError("secret table name"))  # type: ignore[arg-type]
    [status] = context.statuses
    assert status is INTERNAL_STATUS
    assert status.code is grpc.StatusCode.INTERNAL
    assert status.details == "internal error"
    assert b"secret" not in dict(status.trailing_metadata)["grpc-status-details-bin"]


def test_a_database_that_is_down_is_unavailable_not_internal() -> None:
    context = FakeContext()
    down = OperationalError("SELECT 1", {}, Exception("connection refused"))
    with pytest.raises(Stop):
        abort(context, down)  # type: ignore[arg-type]
    [status] = context.statuses
    assert status.code is grpc.StatusCode.UNAVAILABLE
    assert status.details == "the database is unavailable; try again"
    details = status_pb2.Status.FromString(
        dict(status.trailing_metadata)["grpc-status-details-bin"]
    )
    info = error_details_pb2.ErrorInfo()
    details.details[0].Unpack(info)
    assert info.reason == "STORE_UNAVAILABLE"
    assert b"connection refused" not in dict(status.trailing_metadata)["grpc-status-details-bin"]


def full_database_error() -> Exception:
    """What SQLite raises when it cannot grow the database (SQLITE_FULL), for real: a
    database capped at a few pages, written past the cap."""
    engine = create_engine("sqlite://")
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("PRAGMA max_page_count = 3")
            connection.exec_driver_sql("CREATE TABLE t (data BLOB)")
            connection.exec_driver_sql("INSERT INTO t VALUES (zeroblob(100000))")
    except OperationalError as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError("SQLite took a row larger than its cap")


def test_a_full_database_says_so_and_asks_to_retry() -> None:
    context = FakeContext()
    full = full_database_error()
    with pytest.raises(Stop):
        abort(context, full)  # type: ignore[arg-type]
    [status] = context.statuses
    assert status.code is grpc.StatusCode.UNAVAILABLE  # the clients' retry code
    assert "disk is full" in status.details and "free space" in status.details
    info, retry = describe_details(status)
    assert info.reason == "STORE_FULL" and retry.retry_delay.seconds == 5


def test_postgresqls_disk_full_is_a_full_store_too() -> None:
    full = OperationalError("INSERT", {}, psycopg.errors.DiskFull("could not extend file"))
    assert store_problem(full) is STORE_FULL
    other = OperationalError("INSERT", {}, psycopg.errors.OutOfMemory("out of memory"))
    assert store_problem(other) is STORE_UNAVAILABLE


def describe_details(status: grpc.Status) -> tuple[Any, Any]:
    details = status_pb2.Status.FromString(
        dict(status.trailing_metadata)["grpc-status-details-bin"]
    )
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    details.details[0].Unpack(info)
    details.details[1].Unpack(retry)
    return info, retry


def test_a_loop_says_an_outage_once_and_when_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    failures = LoopFailures("the relay")
    down = OperationalError("SELECT 1", {}, Exception("connection refused"))
    with caplog.at_level(logging.INFO, logger="services.common.errors"):
        for _ in range(3):
            failures.failed(down)
        failures.failed(full_database_error())  # another outage: said too
        failures.failed(full_database_error())
        failures.succeeded()
        failures.succeeded()
        failures.failed(ValueError("a bug"))
        failures.failed(ValueError("a bug"))

    said = [(r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert said == [
        (
            "WARNING",
            "the relay: the database is unavailable: (builtins.Exception) connection "
            "refused; retrying until it is back",
            False,
        ),
        (
            "WARNING",
            "the relay: the database has no space left (its disk is full): "
            "(sqlite3.OperationalError) database or disk is full; retrying until it is back",
            False,
        ),
        ("INFO", "the relay: the database is back; going on", False),
        ("ERROR", "the relay failed; retrying", True),
        ("ERROR", "the relay failed; retrying", True),
    ]
    assert store_problem(ValueError("a bug")) is None


def test_interceptor_maps_unary_and_stream_errors() -> None:
    def unary(request: Any, context: Any) -> Any:
        raise FailedPrecondition("no", reason="LEASE_NOT_HELD")

    def stream(request: Any, context: Any) -> Any:
        yield 1
        raise ValueError("boom")

    interceptor = ErrorInterceptor()
    u = interceptor.intercept_service(
        lambda _: grpc.unary_unary_rpc_method_handler(unary),
        None,  # type: ignore[arg-type]
    )
    context = FakeContext()
    with pytest.raises(Stop):
        u.unary_unary(None, context)
    assert context.statuses[0].code is grpc.StatusCode.FAILED_PRECONDITION
    assert info_of(decode(context.statuses[0])[1]).reason == "LEASE_NOT_HELD"

    s = interceptor.intercept_service(
        lambda _: grpc.unary_stream_rpc_method_handler(stream),
        None,  # type: ignore[arg-type]
    )
    context = FakeContext()
    results = []
    with pytest.raises(Stop):
        for item in s.unary_stream(None, context):
            results.append(item)
    assert results == [1]
    assert context.statuses == [INTERNAL_STATUS]

    assert interceptor.intercept_service(lambda _: None, None) is None  # type: ignore[arg-type]


# ---- the client side: describe ------------------------------------------------------------


class FakeRpcError(grpc.RpcError):
    def __init__(self, status: grpc.Status) -> None:
        self._status = status

    def code(self) -> grpc.StatusCode:
        return self._status.code

    def details(self) -> str:
        return self._status.details

    def trailing_metadata(self) -> Any:
        return self._status.trailing_metadata


def test_describe_decodes_what_to_status_encodes() -> None:
    error = InvalidArgument(
        "bad", violations=[("a", "x"), ("b", "y")], metadata={"k": "v"}, reason="BAD_SPEC"
    )
    failure = describe(FakeRpcError(to_status(error)))
    assert failure.code is grpc.StatusCode.INVALID_ARGUMENT
    assert failure.message == "bad"
    assert failure.reason == "BAD_SPEC"
    assert failure.metadata == {"k": "v"}
    assert failure.field_violations == [("a", "x"), ("b", "y")]
    assert failure.retry_after is None
    assert str(failure) == "INVALID_ARGUMENT: bad"

    failure = describe(FakeRpcError(to_status(Unavailable(retry_after=3.0))))
    assert failure.retry_after == 3.0
    assert failure.reason == "UNAVAILABLE"


def test_describe_of_a_plain_status() -> None:
    class Plain(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.DEADLINE_EXCEEDED

        def details(self) -> str:
            return "Deadline Exceeded"

        def trailing_metadata(self) -> Any:
            return ()

    failure = describe(Plain())
    assert failure.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert failure.message == "Deadline Exceeded"
    assert failure.reason == ""


# ---- every status fits in a client's header limit ---------------------------------------


def _trailer_bytes(status: grpc.Status) -> int:
    return len(status.details.encode()) * 3 + sum(
        len(v) * 4 // 3 for _k, v in status.trailing_metadata
    )


def test_a_status_echoing_huge_values_stays_small_and_keeps_its_problems() -> None:
    huge = "\u00e9" * 65_000  # two bytes each; worse still once percent-encoded
    errors: list[BlixardError] = [
        NotFound("job", huge),
        InvalidArgument(huge, violations=[(huge, huge)] * 1_000),
        FailedPrecondition(huge, subject=huge, metadata={huge: huge}),
        Unavailable(huge, metadata={f"k{i}": huge for i in range(1_000)}),
    ]
    for error in errors:
        status = to_status(error)
        assert _trailer_bytes(status) < 6 * 1024, type(error).__name__
        rich, details = decode(status)
        assert info_of(details).reason == error.reason
        assert rich.message == status.details and len(rich.message.encode()) <= 512
    _, details = decode(to_status(errors[1]))
    violations = details["BadRequest"].field_violations  # type: ignore[attr-defined]
    # 20 listed when they are short (tests/grpc); these are so long that 5 fit.
    assert len(violations) == 5 and all(len(v.field.encode()) <= 200 for v in violations)
