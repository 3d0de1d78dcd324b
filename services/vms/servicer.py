"""The gRPC edge of the VM service."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from blixard.vms.v1 import vm_service_pb2 as pb
from blixard.vms.v1 import vm_service_pb2_grpc as pb_grpc

from services.common.auth import Policy, Role
from services.vms.manager import VmManager

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VmService"].full_name

_WORKER = frozenset({Role.WORKER})
POLICY: Policy = {
    "CreateVm": _WORKER,
    "GetVm": _WORKER,
    "ListVms": _WORKER,
    "StopVm": _WORKER,
    "DestroyVm": _WORKER,
    "ExecInVm": _WORKER,
    "GetManagerInfo": frozenset({Role.CLIENT, Role.WORKER}),
}


class VmServicer(pb_grpc.VmServiceServicer):
    def __init__(self, manager: VmManager) -> None:
        self.manager = manager

    def CreateVm(
        self, request: pb.CreateVmRequest, context: grpc.ServicerContext
    ) -> pb.CreateVmResponse:
        self.manager.create(request.vcpus, request.memory_mb)
        raise NotImplementedError  # only NoManager exists in this build, and it raised

    def GetVm(self, request: pb.GetVmRequest, context: grpc.ServicerContext) -> pb.GetVmResponse:
        self.manager.get(request.vm_id)
        raise NotImplementedError

    def ListVms(
        self, request: pb.ListVmsRequest, context: grpc.ServicerContext
    ) -> pb.ListVmsResponse:
        self.manager.list_vms()
        raise NotImplementedError

    def StopVm(self, request: pb.StopVmRequest, context: grpc.ServicerContext) -> pb.StopVmResponse:
        self.manager.stop(request.vm_id)
        raise NotImplementedError

    def DestroyVm(
        self, request: pb.DestroyVmRequest, context: grpc.ServicerContext
    ) -> pb.DestroyVmResponse:
        self.manager.destroy(request.vm_id)
        return pb.DestroyVmResponse()

    def ExecInVm(
        self, request: pb.ExecInVmRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ExecInVmResponse]:
        for _event in self.manager.exec(
            request.vm_id, list(request.command), dict(request.env), request.working_directory, 0.0
        ):
            raise NotImplementedError
        yield from ()

    def GetManagerInfo(
        self, request: pb.GetManagerInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetManagerInfoResponse:
        info = self.manager.info()
        return pb.GetManagerInfoResponse(
            available=info.available,
            backend=info.backend,
            reason=info.reason,
            max_vms=info.max_vms,
            running_vms=info.running_vms,
        )
