"""gRPC servers: created apart from serving (so tests bind port 0), with health, reflection,
auth, errors and tracing mounted on every one; stopped gracefully on SIGTERM."""

from __future__ import annotations

import errno
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common import reflection, telemetry
from services.common.auth import AuthInterceptor, Policy
from services.common.config import DEFAULT_GRPC_THREADS, Tokens
from services.common.errors import ErrorInterceptor, InvalidArgument, ResourceExhausted, first_line
from services.common.startup import StartupError
from services.common.validation import check_request, request_bytes

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024

SERVER_OPTIONS = [
    # A leftover server on the same port must not silently take a share of the calls.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


class WaitSlots:
    """The server threads that waiting calls (long polls, watch and follow streams) may hold
    at once: all but a quarter (at least 4) of them. The sync gRPC server gives each call a
    thread until it returns, and queues calls past its thread count: without this limit, a
    fleet of idle workers in long polls, or of followers of running jobs, would leave every
    heartbeat, completion and submit waiting behind them."""

    def __init__(self, threads: int, setting: str = "GRPC_THREADS") -> None:
        self.threads = threads
        self.setting = setting  # where the thread count is set, for the refusal message
        self.limit = threads - max(4, threads // 4)
        self._free = threading.BoundedSemaphore(self.limit)

    @contextmanager
    def hold(self) -> Iterator[bool]:
        """Take a slot for the ``with`` block if one is free: True; else False at once (the
        call must then answer without waiting)."""
        taken = self._free.acquire(blocking=False)
        try:
            yield taken
        finally:
            if taken:
                self._free.release()

    @contextmanager
    def held_or_refused(self, what: str) -> Iterator[None]:
        """Hold a slot for the ``with`` block, or refuse the call at once: RESOURCE_EXHAUSTED
        naming the setting (RetryInfo: ask again in 1 s)."""
        with self.hold() as held:
            if not held:
                raise ResourceExhausted(
                    f"all {self.limit} slots for {what} are taken (three quarters of "
                    f"{self.setting}={self.threads}); try again shortly, or raise "
                    f"{self.setting}",
                    reason="TOO_MANY_WAITING_CALLS",
                    metadata={"limit": str(self.limit), "setting": self.setting},
                    retry_after=1.0,
                )
            yield


@dataclass
class Running:
    """A created server and what stops with it."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: list[str]
    # Called once new calls are refused, before waiting for running ones (wake long polls).
    before_stop: list[Callable[[], None]] = field(default_factory=list)
    # Called after the server has stopped (background threads, engines).
    on_stop: list[Callable[[], None]] = field(default_factory=list)

    def set_serving(self, name: str, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self.health.set(name, status)

    def stop(self, grace: float) -> None:
        """Health NOT_SERVING, refuse new calls, let running ones finish, then stop helpers."""
        self.health.enter_graceful_shutdown()
        stopped = self.server.stop(grace)
        _run_all(self.before_stop)
        stopped.wait()
        _run_all(self.on_stop)


def _run_all(hooks: list[Callable[[], None]]) -> None:
    for hook in hooks:
        try:
            hook()
        except Exception:
            log.exception("a component failed to stop cleanly")


def create_server(
    address: str,
    *,
    register: Callable[[grpc.Server], None],
    service_names: Sequence[str],
    tokens: Tokens,
    policy: Policy,
    max_workers: int = DEFAULT_GRPC_THREADS,
    setting: str = "GRPC_PORT",
    extra_interceptors: Iterable[Any] = (),
) -> Running:
    interceptors = [
        *telemetry.server_interceptors(),
        AuthInterceptor(tokens, policy),
        ErrorInterceptor(),
        RequestInterceptor(),
        *extra_interceptors,
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=interceptors,
        options=SERVER_OPTIONS,
    )
    register(server)
    names = list(service_names)
    health_servicer = Health(["", *names])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable([*names, health.SERVICE_NAME], server)
    check_bindable(address, setting)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise StartupError(f"{setting}: cannot listen on {address}")
    running = Running(server, port, health_servicer, names)
    for name in ["", *names]:
        running.set_serving(name, True)
    return running


class Health(health.HealthServicer):
    """grpc's health servicer, with ``List`` too: grpc.health.v1 has it, and the servicer
    of grpcio-health-checking leaves it to the generated base, which answers UNIMPLEMENTED
    and logs a traceback for every caller."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__(experimental_non_blocking=True)
        self._names = list(names)

    def List(
        self, request: health_pb2.HealthListRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                name: self.Check(health_pb2.HealthCheckRequest(service=name), context)
                for name in self._names
            }
        )


class RequestInterceptor(grpc.ServerInterceptor):
    """Parses each request itself, inside the chain: gRPC then hands the handler the bytes
    as they came. So a body that is not a valid message of its type is refused after the
    auth check (no token: UNAUTHENTICATED, whatever the body), as INVALID_ARGUMENT with no
    traceback; and every parsed request passes the edge rule (``check_request``: no NUL,
    no integer past a column's range, bounded lists) before any handler reads it."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = _parser(handler_call_details.method, handler.request_deserializer)
        if handler.unary_unary or handler.unary_stream:
            kind = "unary_unary" if handler.unary_unary else "unary_stream"
            behaviour = getattr(handler, kind)

            def unary(raw: bytes, context: grpc.ServicerContext) -> Any:
                request = parse(raw)
                with request_bytes(raw):
                    return behaviour(request, context)

            return handler._replace(request_deserializer=None, **{kind: unary})
        kind = "stream_unary" if handler.stream_unary else "stream_stream"
        behaviour = getattr(handler, kind)

        def streaming(raws: Iterator[bytes], context: grpc.ServicerContext) -> Any:
            return behaviour((parse(raw) for raw in raws), context)

        return handler._replace(request_deserializer=None, **{kind: streaming})


def _parser(method: str, deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        try:
            request = deserialize(raw)
        except Exception as exc:  # DecodeError, or a message nested past the parser's limit
            log.info("%s: refused a request that does not parse: %s", method, first_line(exc))
            raise InvalidArgument(
                "the request is not a valid protobuf message of its type",
                violations=[("request", "does not parse as the method's request message")],
            ) from None
        check_request(request, raw)
        return request

    return parse


def check_bindable(address: str, setting: str) -> None:
    """Say why an address cannot be bound, in one line, before gRPC logs its own error."""
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not port_text.isdigit() or int(port_text) == 0:
        return
    try:
        infos = socket.getaddrinfo(host, int(port_text), type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise StartupError(
            f"{setting}: cannot listen on {address}: the host does not resolve ({exc.strerror})"
        ) from None
    for family, kind, proto, _name, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                cause = {
                    errno.EADDRINUSE: "the port is in use by another process",
                    errno.EADDRNOTAVAIL: "the address is not one of this machine's",
                    errno.EACCES: "permission denied (ports below 1024 need root)",
                }.get(exc.errno or 0, exc.strerror or str(exc))
                raise StartupError(f"{setting}: cannot listen on {address}: {cause}") from None


def serve_until_signalled(running: Running, grace: float, *, banner: str = "") -> None:
    """Start, wait for SIGTERM or SIGINT, then stop gracefully."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    running.server.start()
    log.info("%s listening on port %d", banner or "server", running.port)
    stop.wait()
    running.stop(grace)
    log.info("%s stopped", banner or "server")
