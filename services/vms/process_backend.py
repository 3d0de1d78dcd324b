"""The ``process`` backend: a "VM" that is the guest agent run as a local process, for
machines without QEMU. No isolation beyond a session of its own; the same agent and the
same protocol as a microVM, so everything above the backend is exercised as it is with
QEMU.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import IO

from services.vms.agent import AgentClient, AgentError
from services.vms.backend import (
    GuestProcess,
    LaunchSpec,
    StartFailed,
    Step,
    kill_guest,
    pid_alive,
    process_cwd,
    process_exe_name,
    short_path,
)

AGENT_NAME = "blixard-agent"


class ProcessBackend:
    name = "process"
    steps: tuple[str, ...] = ("spawn", "agent", "hello")

    def __init__(self, agent_binary: Path) -> None:
        self.agent_binary = agent_binary

    def check(self) -> str:
        if not os.access(self.agent_binary, os.X_OK):
            return (
                f"the guest agent {self.agent_binary} is not built "
                f"(run `make vm-image`; it needs gcc)"
            )
        return ""

    def start(self, spec: LaunchSpec, step: Step) -> GuestProcess:
        step("spawn")
        with open(spec.directory / "agent.log", "wb") as log:
            child = self._spawn(spec, log)
        agent: AgentClient | None = None
        try:
            step("agent")
            with short_path(spec.directory, "agent.sock") as path:
                agent = AgentClient.connect(path, spec.boot_timeout)
            step("hello")
            with agent.lock:
                agent.ping(spec.boot_timeout)
            return GuestProcess(child.pid, agent, "none", child=child, whole_session=True)
        except BaseException as exc:
            if agent is not None:
                agent.close()
            kill_guest(child.pid, child, whole_session=True)
            if isinstance(exc, AgentError):
                raise StartFailed(f"the agent did not answer: {exc}") from None
            raise

    def _spawn(self, spec: LaunchSpec, log: IO[bytes]) -> subprocess.Popen[bytes]:
        try:
            return subprocess.Popen(
                [str(self.agent_binary), "--listen", "agent.sock"],
                cwd=spec.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(spec.directory)},
            )
        except OSError as exc:
            raise StartFailed(f"cannot start the agent: {exc}") from None

    def adopt(self, spec: LaunchSpec, pid: int) -> GuestProcess:
        if not self.owns(pid, spec.directory):
            raise StartFailed(f"process {pid} is not this VM's agent")
        with short_path(spec.directory, "agent.sock") as path:
            agent = AgentClient.connect(path, 2.0)
        try:
            with agent.lock:
                agent.ping(5.0)
        except AgentError:
            agent.close()
            raise
        return GuestProcess(pid, agent, "none", whole_session=True)

    def exec_defaults(self, directory: Path) -> tuple[dict[str, str], str]:
        path = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
        return {"PATH": path, "HOME": str(directory)}, str(directory)

    def owns(self, pid: int, state_dir: Path) -> bool:
        if not pid_alive(pid) or process_exe_name(pid) != AGENT_NAME:
            return False
        cwd, root = process_cwd(pid), str(state_dir.resolve())
        return cwd == root or cwd.startswith(root + os.sep)
