"""Domain errors, and their one mapping to gRPC status codes with google.rpc details.

Every service raises these; the interceptor turns them into a ``google.rpc.Status`` with
one ``ErrorInfo`` (UPPER_SNAKE reason) and the detail the table in HOUSE_STYLE.md names.
An unexpected exception becomes INTERNAL with a generic message: the traceback goes to the
log and the span, never to the client. ``describe`` decodes all of it on the client side.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry import trace
from sqlalchemy import exc as sa_exc

log = logging.getLogger(__name__)

DOMAIN = "blixard.dev"

# What an error may carry back. A status travels in the response's trailers, and a client
# refuses trailers past its header limit (8 KiB by default): the caller would then read
# RESOURCE_EXHAUSTED "Stream removed" and none of the problems. So every text is cut short
# (an id echoed back may be 65 k characters), lists are cut to their first entries, and
# ``to_status`` keeps the whole status within a budget well below the limit.
MAX_MESSAGE_BYTES = 512
MAX_DETAIL_TEXT_BYTES = 200
MAX_LISTED = 20
MAX_STATUS_BYTES = 3072


class BlixardError(Exception):
    """The root of every domain error. Subclasses give the code and a default message."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    default_reason: ClassVar[str] = "INTERNAL"
    default_message: ClassVar[str] = "internal error"

    def __init__(
        self,
        message: str | None = None,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.message = brief(message or self.default_message, MAX_MESSAGE_BYTES)
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        super().__init__(self.message)

    def details(self) -> list[Message]:
        return [
            error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata)
        ]


class InvalidArgument(BlixardError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"
    default_message = "the request is not valid"

    def __init__(
        self, message: str | None = None, *, violations: Sequence[tuple[str, str]] = (), **kw: Any
    ) -> None:
        super().__init__(message, **kw)
        self.violations = list(violations)

    def details(self) -> list[Message]:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                for f, d in self.violations
            ]
        )
        return [*super().details(), bad]


class NotFound(BlixardError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"
    default_message = "not found"

    def __init__(
        self, resource_type: str, resource_name: str, message: str | None = None, **kw: Any
    ) -> None:
        super().__init__(message or f"{resource_type} {resource_name!r} not found", **kw)
        self.resource_type = resource_type
        self.resource_name = resource_name

    def details(self) -> list[Message]:
        info = error_details_pb2.ResourceInfo(
            resource_type=self.resource_type, resource_name=self.resource_name
        )
        return [*super().details(), info]


class AlreadyExists(BlixardError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"
    default_message = "already exists"


class FailedPrecondition(BlixardError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"
    default_message = "the operation is not allowed in the current state"

    def __init__(
        self,
        message: str | None = None,
        *,
        subject: str = "",
        violation_type: str = "STATE",
        **kw: Any,
    ) -> None:
        super().__init__(message, **kw)
        self.subject = subject
        self.violation_type = violation_type

    def details(self) -> list[Message]:
        failure = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type=self.violation_type, subject=self.subject, description=self.message
                )
            ]
        )
        return [*super().details(), failure]


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(seconds * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


class Aborted(BlixardError):
    """A concurrent change won, and nothing of this call was written: asking again is safe.
    With ``retry_after``, the status says when (RetryInfo)."""

    code = grpc.StatusCode.ABORTED
    default_reason = "CONFLICT"
    default_message = "a concurrent change won; try again"

    def __init__(
        self, message: str | None = None, *, retry_after: float | None = None, **kw: Any
    ) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after

    def details(self) -> list[Message]:
        if self.retry_after is None:
            return super().details()
        return [*super().details(), _retry_info(self.retry_after)]


class _Retryable(BlixardError):
    def __init__(self, message: str | None = None, *, retry_after: float = 1.0, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after

    def details(self) -> list[Message]:
        return [*super().details(), _retry_info(self.retry_after)]


class ResourceExhausted(_Retryable):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"
    default_message = "a limit was reached"


class Unavailable(_Retryable):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"
    default_message = "unavailable; try again later"


class Unauthenticated(BlixardError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"
    default_message = "a valid bearer token is required (authorization: Bearer <token>)"


class PermissionDenied(BlixardError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"
    default_message = "this token's role may not call this method"


def brief(text: str, limit: int = MAX_DETAIL_TEXT_BYTES) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8 (never inside a character), with
    "…" where it was cut."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode(errors="ignore") + "…"


def _shrink(message: Message, listed: int = MAX_LISTED) -> None:
    """Every text of a detail message cut short, every list and map cut to its first
    ``listed`` entries (in place)."""
    for fd, value in message.ListFields():
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            entries = sorted(value.items())[:listed]
            value.clear()
            for key, item in entries:
                value[brief(key)] = brief(item) if isinstance(item, str) else item
        elif fd.is_repeated:
            del value[listed:]
            for i, item in enumerate(value):
                if isinstance(item, Message):
                    _shrink(item, listed)
                elif isinstance(item, str):
                    value[i] = brief(item)
        elif isinstance(value, Message):
            _shrink(value, listed)
        elif isinstance(value, str):
            setattr(message, fd.name, brief(value))


def to_status(error: BlixardError) -> grpc.Status:
    """The status for ``error``, small enough to reach any client (see MAX_STATUS_BYTES):
    the message and every text of the details cut short, lists cut to their first
    entries (to fewer if that is still too large; at worst only the reason is left)."""
    message = brief(error.message, MAX_MESSAGE_BYTES)
    for listed in (MAX_LISTED, 5, 1):
        details = error.details()
        for detail in details:
            _shrink(detail, listed)
        status = _status(error.code, message, details)
        if status.ByteSize() <= MAX_STATUS_BYTES:
            return rpc_status.to_status(status)
    bare = error_details_pb2.ErrorInfo(reason=brief(error.reason), domain=DOMAIN)
    return rpc_status.to_status(_status(error.code, message, [bare]))


def _status(code: grpc.StatusCode, message: str, details: Sequence[Message]) -> status_pb2.Status:
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    return status_pb2.Status(code=code.value[0], message=message, details=packed)


INTERNAL_STATUS = to_status(BlixardError())


def abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    """Abort the call with the status for ``exc`` (never returns)."""
    if isinstance(exc, BlixardError):
        context.abort_with_status(to_status(exc))
    problem = store_problem(exc)
    if problem is not None:
        log.warning("%s: %s", problem.message, first_line(exc))
        context.abort_with_status(to_status(problem))
    log.error("unexpected error in a handler", exc_info=exc)
    span = trace.get_current_span()
    span.record_exception(exc)
    span.set_status(trace.Status(trace.StatusCode.ERROR, "internal error"))
    context.abort_with_status(INTERNAL_STATUS)


STORE_UNAVAILABLE = Unavailable(
    "the database is unavailable; try again", reason="STORE_UNAVAILABLE", retry_after=1.0
)
STORE_FULL = Unavailable(
    "the database has no space left (its disk is full); free space, then try again",
    reason="STORE_FULL",
    retry_after=5.0,
)


STORE_CONFLICT = Aborted(
    "the database undid this call (a deadlock or a serialization failure with a concurrent "
    "call); nothing was written; try again",
    reason="STORE_CONFLICT",
    retry_after=0.1,
)

# PostgreSQL's deadlock_detected and serialization_failure: the transaction was rolled back.
CONFLICT_STATES = frozenset({"40P01", "40001"})


def store_problem(exc: BaseException) -> Unavailable | Aborted | None:
    """What a store failure that is not a bug says to callers: a deadlock or serialization
    failure (ABORTED: nothing was written, ask again), the database's disk is full, or the
    database is down (a lost or refused connection); None for anything else."""
    if not isinstance(exc, sa_exc.DBAPIError):
        return None
    cause = exc.orig
    if getattr(cause, "sqlstate", None) in CONFLICT_STATES:
        return STORE_CONFLICT
    code = getattr(cause, "sqlite_errorcode", None)
    if (code is not None and code & 0xFF == sqlite3.SQLITE_FULL) or (
        getattr(cause, "sqlstate", None) == "53100"  # PostgreSQL's disk_full
    ):
        return STORE_FULL
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)):
        return STORE_UNAVAILABLE
    return STORE_UNAVAILABLE if exc.connection_invalidated else None


def first_line(exc: BaseException) -> str:
    lines = str(exc).splitlines()
    return lines[0] if lines else type(exc).__name__


class LoopFailures:
    """How a background loop (an outbox relay, the lease reaper) reports failed rounds. A
    store that is down or full is said once, in one line, until a round succeeds again:
    an outage must not fill the log with a traceback every second. Anything else keeps
    its traceback every time."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._outage: str | None = None  # the reason said, while it lasts

    def failed(self, exc: BaseException) -> None:
        problem = store_problem(exc)
        if problem is None:
            log.error("%s failed; retrying", self.name, exc_info=exc)
            return
        if isinstance(problem, Aborted):  # one round undone by a deadlock: not an outage
            log.warning("%s: %s: %s", self.name, problem.message, first_line(exc))
            return
        if self._outage != problem.reason:
            self._outage = problem.reason
            log.warning(
                "%s: %s: %s; retrying until it is back",
                self.name,
                problem.message.split(";")[0],
                first_line(exc),
            )

    def succeeded(self) -> None:
        if self._outage is not None:
            self._outage = None
            log.info("%s: the database is back; going on", self.name)


def _already_aborted(context: grpc.ServicerContext) -> bool:
    code = context.code() if hasattr(context, "code") else None
    return code is not None and code != grpc.StatusCode.OK


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turns exceptions raised by handlers into statuses with details."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=_wrap_stream(handler.unary_stream))
        if handler.stream_unary:
            return handler._replace(stream_unary=_wrap_unary(handler.stream_unary))
        if handler.stream_stream:
            return handler._replace(stream_stream=_wrap_stream(handler.stream_stream))
        return handler


def _caller_gone(context: grpc.ServicerContext) -> bool:
    """The client cancelled or went away: nobody is left to answer (reading its request
    stream then raises a bare RpcError, which is no error of the handler's)."""
    return hasattr(context, "is_active") and not context.is_active()


def _wrap_unary(behaviour: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behaviour(request, context)
        except Exception as exc:
            if _already_aborted(context):
                raise
            if _caller_gone(context):
                log.debug("the caller went away: %s", first_line(exc))
                return None
            abort(context, exc)

    return wrapped


def _wrap_stream(
    behaviour: Callable[[Any, grpc.ServicerContext], Iterator[Any]],
) -> Callable[..., Iterator[Any]]:
    def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from behaviour(request, context)
        except Exception as exc:
            if _already_aborted(context):
                raise
            if _caller_gone(context):
                log.debug("the caller went away: %s", first_line(exc))
                return
            abort(context, exc)

    return wrapped


# ---- client side -------------------------------------------------------------------------


@dataclass(frozen=True)
class RpcFailure:
    """A failed call, decoded: status code, message, ErrorInfo reason and the details."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    field_violations: list[tuple[str, str]] = field(default_factory=list)
    retry_after: float | None = None

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def describe(error: grpc.RpcError) -> RpcFailure:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = error.details() if hasattr(error, "details") else str(error)
    failure = RpcFailure(code=code, message=message or "")
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except (ValueError, AttributeError):
        status = None
    if status is None:
        return failure
    reason, metadata, violations, retry_after = "", {}, [], None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    return RpcFailure(
        code=code,
        message=status.message,
        reason=reason,
        metadata=metadata,
        field_violations=violations,
        retry_after=retry_after,
    )
