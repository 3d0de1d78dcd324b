"""A deadlock or serialization failure is not an outage: the database undid the call and
nothing was written, so it answers ABORTED (STORE_CONFLICT, with a RetryInfo), and the
suite's own channels ask again for the calls that are idempotent."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from blixard.jobs.v1 import jobs_service_pb2 as jpb
from blixard.queue.v1 import queue_service_pb2 as qpb
from blixard.vms.v1 import vm_service_pb2 as vpb
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from services.common import client
from services.common.errors import (
    STORE_CONFLICT,
    Aborted,
    ErrorInterceptor,
    describe,
    store_problem,
)
from tests.postgres import Cluster

TIMEOUT = 5.0


def _deadlock(url: str) -> DBAPIError:
    """Two transactions that each hold the row the other wants, for real: PostgreSQL
    breaks the cycle by failing one of them (SQLSTATE 40P01)."""
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (id int PRIMARY KEY, n int)"))
        connection.execute(text("INSERT INTO t VALUES (1, 0), (2, 0)"))
    both_hold = threading.Barrier(2)
    failures: list[DBAPIError] = []

    def lock(first: int, second: int) -> None:
        try:
            with engine.begin() as connection:
                connection.execute(text("SET deadlock_timeout = '100ms'"))
                connection.execute(text(f"UPDATE t SET n = n + 1 WHERE id = {first}"))
                both_hold.wait(timeout=10)
                connection.execute(text(f"UPDATE t SET n = n + 1 WHERE id = {second}"))
        except DBAPIError as exc:
            failures.append(exc)

    threads = [threading.Thread(target=lock, args=pair) for pair in ((1, 2), (2, 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    engine.dispose()
    assert len(failures) == 1, failures
    return failures[0]


def test_a_real_deadlock_is_aborted_with_retry_info_not_unavailable(
    postgres_cluster: Cluster,
) -> None:
    exc = _deadlock(postgres_cluster.new_database())

    problem = store_problem(exc)

    assert problem is STORE_CONFLICT
    assert isinstance(problem, Aborted)
    assert problem.code == grpc.StatusCode.ABORTED and problem.reason == "STORE_CONFLICT"
    assert problem.retry_after is not None and problem.retry_after > 0


# ---- the suite's channels retry ABORTED where that is safe ---------------------------------


class _AbortsOnce:
    """A server whose every method answers ABORTED (as a deadlock does) on its first call
    and succeeds after: it counts the calls."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()

    def handler(self, method: str) -> grpc.RpcMethodHandler:
        def behaviour(request: bytes, context: grpc.ServicerContext) -> bytes:
            with self._lock:
                self.calls[method] = self.calls.get(method, 0) + 1
                first = self.calls[method] == 1
            if first:
                raise STORE_CONFLICT
            return b""

        return grpc.unary_unary_rpc_method_handler(behaviour)


class _Generic(grpc.GenericRpcHandler):
    def __init__(self, server: _AbortsOnce) -> None:
        self._server = server

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return self._server.handler(handler_call_details.method)


@pytest.fixture
def aborts_once() -> Iterator[tuple[_AbortsOnce, str]]:
    fake = _AbortsOnce()
    server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[ErrorInterceptor()])
    server.add_generic_rpc_handlers((_Generic(fake),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(0)


def test_the_suites_channels_ask_an_idempotent_call_again_after_aborted(
    aborts_once: tuple[_AbortsOnce, str],
) -> None:
    fake, target = aborts_once
    channel = client.open_channel(target)
    idempotent = [
        ("/blixard.jobs.v1.JobService/UpdateJobStatus", jpb.UpdateJobStatusRequest()),
        ("/blixard.queue.v1.QueueService/BatchEnqueue", qpb.BatchEnqueueRequest()),
        ("/blixard.vms.v1.VmService/GetVm", vpb.GetVmRequest()),
    ]
    for method, request in idempotent:
        call = channel.unary_unary(method, request_serializer=type(request).SerializeToString)
        call(request, timeout=TIMEOUT)
        assert fake.calls[method] == 2, method

    method = "/blixard.queue.v1.QueueService/Complete"  # not idempotent: its caller decides
    call = channel.unary_unary(method, request_serializer=qpb.CompleteRequest.SerializeToString)
    with pytest.raises(grpc.RpcError) as caught:
        call(qpb.CompleteRequest(), timeout=TIMEOUT)
    assert describe(caught.value).code == grpc.StatusCode.ABORTED
    assert describe(caught.value).reason == "STORE_CONFLICT"
    assert fake.calls[method] == 1
    channel.close()


def test_every_idempotent_call_named_is_a_method_of_the_contracts() -> None:
    files = {"JobService": jpb, "QueueService": qpb, "VmService": vpb}
    for service, methods in client.IDEMPOTENT.items():
        descriptor = files[service.rsplit(".", 1)[-1]].DESCRIPTOR.services_by_name[
            service.rsplit(".", 1)[-1]
        ]
        assert descriptor.full_name == service
        for method in methods:
            assert method in descriptor.methods_by_name, f"{service}/{method}"
