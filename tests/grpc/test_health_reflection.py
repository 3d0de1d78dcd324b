"""Every server answers grpc.health.v1 and server reflection, so probes and grpcurl work."""

from __future__ import annotations

import threading

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common.server import Running
from tests.grpc.conftest import RPC_TIMEOUT, Stack

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

JOBS = "blixard.jobs.v1.JobService"
QUEUE = "blixard.queue.v1.QueueService"
VMS = "blixard.vms.v1.VmService"
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"

# service -> (its full name, the health of that name)
SERVICES = {
    "jobs": (JOBS, SERVING),
    "queue": (QUEUE, SERVING),
    # No VM manager on this build: the service runs, but says it cannot serve VMs.
    "vms": (VMS, NOT_SERVING),
}


def _target(stack: Stack, service: str) -> str:
    return {"jobs": stack.jobs_target, "queue": stack.queue_target, "vms": stack.vms_target}[
        service
    ]


def _health(stack: Stack, target: str) -> health_pb2_grpc.HealthStub:
    return health_pb2_grpc.HealthStub(stack.channel(target))


def _check(stub: health_pb2_grpc.HealthStub, name: str) -> int:
    request = health_pb2.HealthCheckRequest(service=name)
    return stub.Check(request, timeout=RPC_TIMEOUT).status


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_health_reports_the_server_and_its_service(stack: Stack, service: str) -> None:
    name, expected = SERVICES[service]
    stub = _health(stack, _target(stack, service))

    assert _check(stub, "") == SERVING
    assert _check(stub, name) == expected


def test_health_of_an_unknown_service_is_not_found(stack: Stack) -> None:
    stub = _health(stack, stack.jobs_target)

    with pytest.raises(grpc.RpcError) as caught:
        _check(stub, "blixard.nothing.v1.NoService")

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_reflection_lists_the_service_health_and_reflection(stack: Stack, service: str) -> None:
    name, _ = SERVICES[service]
    stub = reflection_pb2_grpc.ServerReflectionStub(stack.channel(_target(stack, service)))

    responses = list(
        stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=RPC_TIMEOUT
        )
    )

    assert len(responses) == 1
    listed = {s.name for s in responses[0].list_services_response.service}
    assert {name, HEALTH, REFLECTION} <= listed
    # One service per server: the others are not mounted here.
    assert not ({JOBS, QUEUE, VMS} - {name}) & listed


def test_reflection_describes_the_service_methods(stack: Stack) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(stack.channel(stack.jobs_target))

    [response] = list(
        stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=JOBS)]),
            timeout=RPC_TIMEOUT,
        )
    )

    assert response.WhichOneof("message_response") == "file_descriptor_response"
    assert response.file_descriptor_response.file_descriptor_proto


@pytest.mark.parametrize("symbol", [f"{QUEUE}.Claim", f"{QUEUE}", "blixard.queue.v1.ClaimRequest"])
def test_reflection_finds_the_file_of_a_method_service_or_message(
    stack: Stack, symbol: str
) -> None:
    """What ``grpcurl describe <symbol>`` asks for (a method too: grpc/grpc#34743)."""
    stub = reflection_pb2_grpc.ServerReflectionStub(stack.channel(stack.queue_target))
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)

    [response] = list(stub.ServerReflectionInfo(iter([request]), timeout=RPC_TIMEOUT))

    assert response.WhichOneof("message_response") == "file_descriptor_response"
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]
    queue_file = next(f for f in files if f.package == "blixard.queue.v1")
    service = next(s for s in queue_file.service if s.name == "QueueService")
    assert "Claim" in {m.name for m in service.method}


@pytest.mark.parametrize("symbol", [f"{QUEUE}.NoSuchMethod", "blixard.queue.v1.Nothing.Claim"])
def test_reflection_says_not_found_for_an_unknown_symbol(stack: Stack, symbol: str) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(stack.channel(stack.queue_target))
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)

    [response] = list(stub.ServerReflectionInfo(iter([request]), timeout=RPC_TIMEOUT))

    assert response.WhichOneof("message_response") == "error_response"
    assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def _start_alone(make_stack, service: str) -> tuple[Stack, Running]:  # type: ignore[no-untyped-def]
    alone = make_stack()
    if service == "vms":
        alone.start_vms()
        return alone, alone.vms
    alone.start_pair()
    return alone, alone.jobs if service == "jobs" else alone.queue


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_health_is_gone_or_not_serving_after_stop(make_stack, service: str) -> None:  # type: ignore[no-untyped-def]
    alone, running = _start_alone(make_stack, service)
    stub = _health(alone, f"127.0.0.1:{running.port}")
    assert _check(stub, "") == SERVING

    running.stop(0.2)

    try:
        status = _check(stub, "")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE
    else:
        assert status == NOT_SERVING


def test_health_watchers_see_not_serving_when_the_server_stops(make_stack) -> None:  # type: ignore[no-untyped-def]
    alone, running = _start_alone(make_stack, "jobs")
    # A plain channel: the traced one hands back a generator, which cannot be cancelled.
    channel = grpc.insecure_channel(alone.jobs_target)
    alone.channels.append(channel)
    stub = health_pb2_grpc.HealthStub(channel)
    stream = stub.Watch(health_pb2.HealthCheckRequest(service=JOBS), timeout=10)
    assert next(stream).status == SERVING

    stopper = threading.Thread(target=running.stop, args=(2.0,))
    stopper.start()
    try:
        assert next(stream).status == NOT_SERVING
    finally:
        stream.cancel()
        stopper.join(timeout=10)
    assert not stopper.is_alive()
