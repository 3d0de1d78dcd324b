"""The gRPC edge of the VM service: check the request's shape, convert, call the manager."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from blixard.vms.v1 import vm_service_pb2 as pb
from blixard.vms.v1 import vm_service_pb2_grpc as pb_grpc

from services.common import pbtime
from services.common.auth import Policy, Role
from services.common.validation import Problems
from services.vms import convert
from services.vms.manager import VmManager

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VmService"].full_name

MAX_ARGS = 1024
MAX_COMMAND_BYTES = 64 * 1024
MAX_ENV = 256
MAX_ENV_BYTES = 64 * 1024

_WORKER = frozenset({Role.WORKER})
POLICY: Policy = {
    "CreateVm": _WORKER,
    "GetVm": _WORKER,
    "ListVms": _WORKER,
    "StopVm": _WORKER,
    "DestroyVm": _WORKER,
    "ReleaseVm": _WORKER,
    "ExecInVm": _WORKER,
    "GetManagerInfo": frozenset({Role.CLIENT, Role.WORKER}),
}


def _need_vm_id(vm_id: str) -> None:
    problems = Problems()
    problems.check(bool(vm_id.strip()), "vm_id", "required")
    problems.check(len(vm_id) <= 64, "vm_id", "at most 64 characters")
    problems.raise_if_any()


class VmServicer(pb_grpc.VmServiceServicer):
    def __init__(self, manager: VmManager) -> None:
        self.manager = manager

    def CreateVm(
        self, request: pb.CreateVmRequest, context: grpc.ServicerContext
    ) -> pb.CreateVmResponse:
        vm = self.manager.create(request.vcpus, request.memory_mb)
        return pb.CreateVmResponse(vm=convert.vm_to_pb(vm))

    def GetVm(self, request: pb.GetVmRequest, context: grpc.ServicerContext) -> pb.GetVmResponse:
        if self.manager.info().available:  # without one: UNAVAILABLE, whatever was asked
            _need_vm_id(request.vm_id)
        return pb.GetVmResponse(vm=convert.vm_to_pb(self.manager.get(request.vm_id)))

    def ListVms(
        self, request: pb.ListVmsRequest, context: grpc.ServicerContext
    ) -> pb.ListVmsResponse:
        vms = self.manager.list_vms(convert.kinds_from_pb(request.states))
        return pb.ListVmsResponse(vms=[convert.vm_to_pb(vm) for vm in vms])

    def StopVm(self, request: pb.StopVmRequest, context: grpc.ServicerContext) -> pb.StopVmResponse:
        if self.manager.info().available:
            _need_vm_id(request.vm_id)
        return pb.StopVmResponse(vm=convert.vm_to_pb(self.manager.stop(request.vm_id)))

    def DestroyVm(
        self, request: pb.DestroyVmRequest, context: grpc.ServicerContext
    ) -> pb.DestroyVmResponse:
        if self.manager.info().available:
            _need_vm_id(request.vm_id)
        return pb.DestroyVmResponse(vm=convert.vm_to_pb(self.manager.destroy(request.vm_id)))

    def ReleaseVm(
        self, request: pb.ReleaseVmRequest, context: grpc.ServicerContext
    ) -> pb.ReleaseVmResponse:
        if self.manager.info().available:
            _need_vm_id(request.vm_id)
        return pb.ReleaseVmResponse(vm=convert.vm_to_pb(self.manager.release(request.vm_id)))

    def ExecInVm(
        self, request: pb.ExecInVmRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ExecInVmResponse]:
        timeout = 0.0
        if self.manager.info().available:
            timeout = _check_exec(request)
        events = self.manager.exec(
            request.vm_id,
            list(request.command),
            dict(request.env),
            request.working_directory,
            timeout,
            request.job_id,
        )
        vm_id = request.vm_id
        done = False

        def on_rpc_end() -> None:
            # A caller that went away stops the command; the stream then ends by itself.
            if not done:
                self.manager.cancel_exec(vm_id)

        context.add_callback(on_rpc_end)
        try:
            for event in events:
                yield from convert.event_to_pb(event)
        finally:
            done = True
            close = getattr(events, "close", None)
            if close is not None:
                close()

    def GetManagerInfo(
        self, request: pb.GetManagerInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetManagerInfoResponse:
        return convert.info_to_pb(self.manager.info())


def _check_exec(request: pb.ExecInVmRequest) -> float:
    problems = Problems()
    problems.check(bool(request.vm_id.strip()), "vm_id", "required")
    problems.check(len(request.command) > 0, "command", "required: the program and its arguments")
    problems.check(len(request.command) <= MAX_ARGS, "command", f"at most {MAX_ARGS} arguments")
    size = sum(len(arg.encode()) for arg in request.command)
    problems.check(size <= MAX_COMMAND_BYTES, "command", f"at most {MAX_COMMAND_BYTES} bytes")
    problems.check(not any("\0" in arg for arg in request.command), "command", "no NUL characters")
    problems.check(len(request.env) <= MAX_ENV, "env", f"at most {MAX_ENV} variables")
    env_size = sum(len(k.encode()) + len(v.encode()) for k, v in request.env.items())
    problems.check(env_size <= MAX_ENV_BYTES, "env", f"at most {MAX_ENV_BYTES} bytes")
    for key, value in request.env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            problems.add(f"env[{key}]", "a name without '=' or NUL, a value without NUL")
    problems.check(
        "\0" not in request.working_directory and len(request.working_directory) <= 4096,
        "working_directory",
        "at most 4,096 characters, no NUL",
    )
    timeout = 0.0
    if request.HasField("timeout"):
        problem = pbtime.duration_problem(request.timeout)
        timeout = pbtime.seconds(request.timeout) if problem is None else 0.0
        problems.check(problem is None, "timeout", problem or "")
        problems.check(timeout >= 0, "timeout", "cannot be negative")
    problems.raise_if_any()
    return timeout
