"""Bearer tokens per role, checked by a server interceptor; added by a client interceptor.

Roles: ``client`` (submits and reads jobs), ``worker`` (claims and reports), ``admin``
(everything, and the services' calls to each other). Health and reflection are open, so
probes and ``grpcurl list`` work without a token. With no token configured the check is
off: ``config.check_auth_binding`` allows that only on a loopback address.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import grpc

from services.common.config import Tokens
from services.common.errors import (
    BlixardError,
    PermissionDenied,
    Unauthenticated,
    to_status,
)


class Role(enum.Enum):
    CLIENT = "client"
    WORKER = "worker"
    ADMIN = "admin"


OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# method name (without the service) -> roles allowed besides admin
Policy = Mapping[str, frozenset[Role]]


def role_of(tokens: Tokens, token: str) -> Role | None:
    candidates = (
        (Role.ADMIN, tokens.admin),
        (Role.WORKER, tokens.worker),
        (Role.CLIENT, tokens.client),
    )
    for role, expected in candidates:
        if expected and hmac.compare_digest(expected.encode(), token.encode()):
            return role
    return None


def _bearer(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, tokens: Tokens, policy: Policy) -> None:
        self._tokens = tokens
        self._policy = policy

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method = handler_call_details.method
        if not self._tokens.enabled or method.startswith(OPEN_PREFIXES):
            return continuation(handler_call_details)
        token = _bearer(handler_call_details.invocation_metadata)
        role = role_of(self._tokens, token) if token else None
        if role is None:
            return _refusal(continuation(handler_call_details), Unauthenticated())
        allowed = self._policy.get(method.rsplit("/", 1)[-1], frozenset())
        if role is not Role.ADMIN and role not in allowed:
            return _refusal(
                continuation(handler_call_details),
                PermissionDenied(
                    f"the {role.value} role may not call {method}",
                    metadata={"role": role.value, "method": method},
                ),
            )
        return continuation(handler_call_details)


def _refusal(handler: Any, error: BlixardError) -> Any:
    status = to_status(error)

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort_with_status(status)

    def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        context.abort_with_status(status)
        yield  # pragma: no cover - abort raises

    if handler is None:
        return None
    if handler.unary_stream or handler.stream_stream:
        kind = "unary_stream" if handler.unary_stream else "stream_stream"
        return handler._replace(**{kind: stream})
    kind = "unary_unary" if handler.unary_unary else "stream_unary"
    return handler._replace(**{kind: unary})


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class BearerTokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every outgoing call."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> _CallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request)
