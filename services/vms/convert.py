"""The only module that knows both the VM service's protobuf messages and its domain types."""

from __future__ import annotations

from collections.abc import Iterable

from blixard.common.v1 import job_spec_pb2
from blixard.vms.v1 import vm_service_pb2 as pb

from services.common import pbtime
from services.vms import domain
from services.vms.agent import ExecEvent, Exited, Output, StartFailed
from services.vms.domain import Kind, Vm
from services.vms.manager import ManagerInfo

_STATES = {
    Kind.STARTING: pb.VM_STATE_STARTING,
    Kind.READY: pb.VM_STATE_READY,
    Kind.BUSY: pb.VM_STATE_BUSY,
    Kind.IDLE: pb.VM_STATE_IDLE,
    Kind.DRAINING: pb.VM_STATE_DRAINING,
    Kind.TERMINATED: pb.VM_STATE_TERMINATED,
    Kind.FAILED: pb.VM_STATE_FAILED,
}
_KINDS: dict[int, Kind] = {int(value): kind for kind, value in _STATES.items()}

START_FAILED_EXIT_CODE = 127  # what a shell answers for a command it cannot run


def vm_to_pb(vm: Vm) -> pb.Vm:
    message = pb.Vm(
        vm_id=vm.vm_id,
        state=_STATES[vm.state.kind],
        vcpus=vm.vcpus,
        memory_mb=vm.memory_mb,
        create_time=pbtime.timestamp(vm.created_at),
        update_time=pbtime.timestamp(vm.updated_at),
        backend=vm.backend,
        accelerator=vm.accelerator,
        pooled=vm.pooled,
        jobs_run=vm.jobs_run,
    )
    state = vm.state
    if isinstance(state, domain.Busy):
        message.job_id = state.job_id
        message.started_time.FromNanoseconds(int(state.started_at * 1e9))
    elif isinstance(state, domain.Idle):
        message.jobs_completed = state.jobs_completed
        message.last_job_time.FromNanoseconds(int(state.last_job_at * 1e9))
    elif isinstance(state, domain.Terminated):
        message.reason = state.reason
        if state.exit_code is not None:
            message.exit_code = state.exit_code
    elif isinstance(state, domain.Failed):
        message.error = state.error
    return message


def kinds_from_pb(states: Iterable[int]) -> list[Kind]:
    return list(dict.fromkeys(_KINDS[int(state)] for state in states if int(state) in _KINDS))


def info_to_pb(info: ManagerInfo) -> pb.GetManagerInfoResponse:
    return pb.GetManagerInfoResponse(
        available=info.available,
        backend=info.backend,
        reason=info.reason,
        max_vms=info.max_vms,
        running_vms=info.running_vms,
        accelerator=info.accelerator,
        warm_vms=info.warm_vms,
        pre_warm_count=info.pre_warm_count,
    )


def event_to_pb(event: ExecEvent) -> list[pb.ExecInVmResponse]:
    if isinstance(event, Output):
        stream = (
            job_spec_pb2.OUTPUT_STREAM_STDOUT
            if event.stream == "stdout"
            else job_spec_pb2.OUTPUT_STREAM_STDERR
        )
        return [pb.ExecInVmResponse(output=pb.OutputChunk(stream=stream, data=event.data))]
    if isinstance(event, Exited):
        return [pb.ExecInVmResponse(exit_code=event.exit_code)]
    assert isinstance(event, StartFailed)
    # A command that cannot start says why on stderr and ends with 127, as a shell would.
    chunk = pb.OutputChunk(
        stream=job_spec_pb2.OUTPUT_STREAM_STDERR, data=(event.message + "\n").encode()
    )
    return [
        pb.ExecInVmResponse(output=chunk),
        pb.ExecInVmResponse(exit_code=START_FAILED_EXIT_CODE),
    ]
