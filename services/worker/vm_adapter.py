"""Jobs run inside a VM from the VM service: CreateVm, ExecInVm (output chunks, then the
exit code), then ReleaseVm after a clean run, DestroyVm otherwise.

When the VM service answers UNAVAILABLE (no VM manager on that host, or the service is
down), the result says so (``Result.unavailable``) instead of failing the job: the worker
gives the lease back so another worker, or this one later, runs it.
"""

from __future__ import annotations

import logging
import threading

import grpc
from blixard.vms.v1 import vm_service_pb2 as vpb
from blixard.vms.v1 import vm_service_pb2_grpc as vpb_grpc

from services.common import pbtime
from services.common.errors import describe
from services.worker.adapters import Execution, OutputSink, OutputTail, Result, Task

log = logging.getLogger(__name__)

CALL_TIMEOUT = 10.0
CREATE_TIMEOUT = 120.0  # a VM may boot from scratch when the warm pool is empty
EXEC_MARGIN = 30.0  # on top of the job's timeout, for the stream's own deadline


class VmExecution:
    def __init__(self, stub: vpb_grpc.VmServiceStub, task: Task, output: OutputSink | None) -> None:
        self._stub = stub
        self._task = task
        self._output = output
        self.tail = OutputTail()
        self.vm_id = ""
        self._exit_code: int | None = None
        self._error = ""
        self._unavailable = ""
        self._stopped = threading.Event()
        self._destroyed = False
        self._stream: object = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"vm-{task.job_id[:8]}", daemon=True)
        self._thread.start()

    # ---- the execution's own thread ---------------------------------------------------

    def _run(self) -> None:
        try:
            vm = self._stub.CreateVm(
                vpb.CreateVmRequest(vcpus=self._task.vcpus, memory_mb=self._task.memory_mb),
                timeout=CREATE_TIMEOUT,
            ).vm
        except grpc.RpcError as exc:
            self._failed("cannot get a VM", exc)
            return
        with self._lock:
            self.vm_id = vm.vm_id
        try:
            if not self._stopped.is_set():
                self._exec()
        except grpc.RpcError as exc:
            if not self._stopped.is_set():
                self._failed(f"the execution in VM {self.vm_id} broke off", exc)
        finally:
            clean = self._exit_code is not None and not self._stopped.is_set()
            self._destroy(reuse=clean and not self._error)

    def _exec(self) -> None:
        task = self._task
        request = vpb.ExecInVmRequest(
            vm_id=self.vm_id,
            command=task.command,
            env=task.env,
            working_directory=task.working_directory,
            job_id=task.job_id,
        )
        if task.timeout > 0:
            request.timeout.CopyFrom(pbtime.duration(task.timeout))
        deadline = task.timeout + EXEC_MARGIN if task.timeout > 0 else None
        stream = self._stub.ExecInVm(request, timeout=deadline)
        with self._lock:
            self._stream = stream
        for event in stream:
            kind = event.WhichOneof("event")
            if kind == "output":
                self.tail.add(event.output.data)
                if self._output is not None:
                    self._output.write(event.output.data)
            elif kind == "exit_code":
                self._exit_code = event.exit_code

    def _destroy(self, reuse: bool = False) -> None:
        """Once, from whichever comes first: the end of the execution or ``stop``. A VM
        whose job ended cleanly is given back with ReleaseVm (the VM service recycles it
        up to VMS_REUSE_JOBS jobs, else destroys it); any other is destroyed."""
        with self._lock:
            if self._destroyed or not self.vm_id:
                return
            self._destroyed = True
        try:
            if reuse:
                self._stub.ReleaseVm(vpb.ReleaseVmRequest(vm_id=self.vm_id), timeout=CALL_TIMEOUT)
            else:
                self._stub.DestroyVm(vpb.DestroyVmRequest(vm_id=self.vm_id), timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            log.warning("cannot give back VM %s (%s)", self.vm_id, describe(exc))

    def _failed(self, what: str, exc: grpc.RpcError) -> None:
        failure = describe(exc)
        if failure.code == grpc.StatusCode.UNAVAILABLE:
            self._unavailable = f"{what}: {failure}"
        else:
            self._error = f"{what}: {failure}"

    # ---- the Execution interface ------------------------------------------------------

    def wait(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self, grace: float) -> None:
        """Destroy the VM, which ends the command and its stream. (Cancelling the stream is
        not enough: through an intercepted channel it is a generator that cannot be.)"""
        self._stopped.set()
        with self._lock:
            stream = self._stream
        cancel = getattr(stream, "cancel", None)
        if callable(cancel):
            cancel()
        self._destroy()
        self.wait(grace + CALL_TIMEOUT)

    def result(self) -> Result:
        error = self._error
        if self._stopped.is_set() and not error:
            error = "stopped"
        elif self._exit_code is None and not error and not self._unavailable:
            error = f"VM {self.vm_id} ended the execution without an exit code"
        return Result(self._exit_code, self.tail.data(), self.tail.total, error, self._unavailable)


class VmAdapter:
    """Each job in a VM of its own, from the VM service behind ``channel``."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = vpb_grpc.VmServiceStub(channel)

    def start(self, task: Task, output: OutputSink | None = None) -> Execution:
        return VmExecution(self._stub, task, output)
