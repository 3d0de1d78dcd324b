"""The VmManager interface and the backends this build has.

``NoManager`` stands where no backend can run: every VM call raises UNAVAILABLE with the
reason VM_MANAGER_UNAVAILABLE, and ``info`` says why. The qemu and process backends come
with the VM service's own issue; until then asking for them degrades to NoManager with a
reason that says so, as a backend that cannot start does.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from services.common.errors import Unavailable

UNAVAILABLE_MESSAGE = "VM manager is not available (SKIP_VM_MANAGER may be set)"


@dataclass(frozen=True)
class ManagerInfo:
    available: bool
    backend: str
    reason: str = ""
    max_vms: int = 0
    running_vms: int = 0


class VmManager(Protocol):
    def info(self) -> ManagerInfo: ...

    def create(self, vcpus: int, memory_mb: int) -> object: ...

    def get(self, vm_id: str) -> object: ...

    def list_vms(self) -> list[object]: ...

    def stop(self, vm_id: str) -> object: ...

    def destroy(self, vm_id: str) -> None: ...

    def exec(
        self,
        vm_id: str,
        command: list[str],
        env: dict[str, str],
        working_directory: str,
        timeout: float,
    ) -> Iterator[object]: ...


class NoManager:
    def __init__(self, reason: str) -> None:
        self.reason = reason

    def info(self) -> ManagerInfo:
        return ManagerInfo(available=False, backend="none", reason=self.reason)

    def _unavailable(self) -> Unavailable:
        return Unavailable(
            UNAVAILABLE_MESSAGE,
            reason="VM_MANAGER_UNAVAILABLE",
            metadata={"why": self.reason},
            retry_after=30.0,
        )

    def create(self, vcpus: int, memory_mb: int) -> object:
        raise self._unavailable()

    def get(self, vm_id: str) -> object:
        raise self._unavailable()

    def list_vms(self) -> list[object]:
        raise self._unavailable()

    def stop(self, vm_id: str) -> object:
        raise self._unavailable()

    def destroy(self, vm_id: str) -> None:
        raise self._unavailable()

    def exec(
        self,
        vm_id: str,
        command: list[str],
        env: dict[str, str],
        working_directory: str,
        timeout: float,
    ) -> Iterator[object]:
        raise self._unavailable()


def choose(backend: str, skip: bool) -> VmManager:
    """The manager for the settings; never fails: the service starts degraded instead."""
    if skip:
        return NoManager("SKIP_VM_MANAGER=1 is set")
    if backend == "none":
        return NoManager("VMS_MANAGER=none is set")
    if backend == "auto":
        if shutil.which("qemu-system-x86_64") is None:
            return NoManager("VMS_MANAGER=auto found no qemu-system-x86_64 on this machine")
        return NoManager("VMS_MANAGER=auto found QEMU, but this build has no qemu backend yet")
    return NoManager(f"VMS_MANAGER={backend}: this build has no {backend} backend yet")
