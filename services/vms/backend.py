"""What a VM backend provides to the manager: start a guest in a directory, and a handle
on the running guest. ``qemu.py`` and ``process_backend.py`` implement it.

A start goes through named steps, and the backend calls ``step(name)`` before each one,
so tests can make any step fail (``Faults``). Whatever a backend made before a failure
(a process, a socket) it undoes before it raises; the manager owns the permit and the
directory and undoes those.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from services.vms.agent import AgentClient

Step = Callable[[str], None]

# Every step of a start, in order (the backend's own steps are in the middle).
START_STEPS = ("permit", "directory", "spawn", "qmp", "agent", "hello", "register")


class StartFailed(Exception):
    """A VM could not be started; the message says which step and why."""


class InjectedFault(StartFailed):
    pass


@dataclass
class Faults:
    """Test hook: ``arm("spawn")`` makes the next start fail at that step."""

    armed: set[str] = field(default_factory=set)
    hits: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def arm(self, *steps: str) -> None:
        with self._lock:
            self.armed.update(steps)

    def __call__(self, step: str) -> None:
        with self._lock:
            if step not in self.armed:
                return
            self.armed.discard(step)
            self.hits.append(step)
        raise InjectedFault(f"fault injected at the {step} step")


def no_faults(step: str) -> None:
    return None


@dataclass(frozen=True)
class LaunchSpec:
    vm_id: str
    directory: Path
    vcpus: int
    memory_mb: int
    boot_timeout: float


class Instance(Protocol):
    """A running guest."""

    pid: int
    agent: AgentClient
    accelerator: str

    def alive(self) -> bool: ...

    def wait(self) -> int | None:
        """Block until the guest's process has ended; its exit code when known."""
        ...

    def kill(self) -> None:
        """SIGKILL it and everything it started, and reap it. Idempotent."""
        ...

    def shutdown(self, timeout: float) -> int | None:
        """Stop it politely (power off), by force after ``timeout``; the exit code."""
        ...

    def close(self) -> None:
        """Close the host's end of every channel (agent, QMP). Idempotent."""
        ...


class Backend(Protocol):
    name: str
    steps: tuple[str, ...]  # the backend's own start steps, in order

    def check(self) -> str:
        """'' when this backend can start VMs on this machine, else why not."""
        ...

    def start(self, spec: LaunchSpec, step: Step) -> Instance: ...

    def adopt(self, spec: LaunchSpec, pid: int) -> Instance:
        """Take over a guest a previous run of the service left running (raises if it is
        not one of ours, or not healthy)."""
        ...

    def owns(self, pid: int, state_dir: Path) -> bool:
        """Whether a process is a guest this backend started under ``state_dir``."""
        ...

    def exec_defaults(self, directory: Path) -> tuple[dict[str, str], str]:
        """The environment a command starts from, and its working directory by default."""
        ...


# ---- processes -----------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def process_cwd(pid: int) -> str:
    try:
        target = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""
    return target.removesuffix(" (deleted)")


def process_exe_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            first = handle.read().split(b"\0", 1)[0]
    except OSError:
        return ""
    return os.path.basename(first.decode(errors="replace"))


def session_members(session: int) -> list[int]:
    """Every process in a session (the process backend runs each guest in its own)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 4 and int(fields[3]) == session:
            members.append(int(entry))
    return members


def processes_under(state_dir: Path, names: tuple[str, ...] | None) -> list[int]:
    """Processes named ``names`` (their argv[0]; None = any) whose working directory is in
    ``state_dir``: the guests that a service with this state directory started."""
    root = str(state_dir.resolve())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if (names is not None and process_exe_name(pid) not in names) or not pid_alive(pid):
            continue
        cwd = process_cwd(pid)
        if cwd.startswith(root + os.sep) or (cwd == root and names is not None):
            found.append(pid)
    return found


def kill_and_wait(pid: int, timeout: float = 10.0) -> bool:
    """SIGKILL a process that may not be our child; True once it is gone."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            waited, _ = os.waitpid(pid, os.WNOHANG)
            if waited == pid:
                return True
        except ChildProcessError:
            pass
        if not pid_alive(pid):
            return True
        time.sleep(0.01)
    return False


def wait_for_exit(pid: int) -> None:
    """Block until a process that is not our child has ended (a pidfd: no polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not poller.poll(1000):
            if not pid_alive(pid):
                return
    finally:
        os.close(fd)


class GuestProcess:
    """The host process of a guest (QEMU, or the agent itself for the process backend):
    our child when we started it, or a process adopted from a previous run."""

    def __init__(
        self,
        pid: int,
        agent: AgentClient,
        accelerator: str,
        *,
        child: subprocess.Popen[bytes] | None = None,
        whole_session: bool = False,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.pid = pid
        self.agent = agent
        self.accelerator = accelerator
        self._child = child
        self._whole_session = whole_session
        self._on_close = on_close
        self._exit_code: int | None = None

    def alive(self) -> bool:
        if self._child is not None:
            return self._child.poll() is None
        return pid_alive(self.pid)

    def wait(self) -> int | None:
        if self._child is not None:
            return self._child.wait()
        wait_for_exit(self.pid)
        return None

    def kill(self) -> None:
        kill_guest(self.pid, self._child, self._whole_session)

    def shutdown(self, timeout: float) -> int | None:
        try:
            with self.agent.lock:
                self.agent.poweroff()
        except Exception:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive():
            time.sleep(0.02)
        self.kill()  # by force if it is still up; else it reaps it and what it left
        return self._child.returncode if self._child is not None else None

    def close(self) -> None:
        self.agent.close()
        if self._on_close is not None:
            hook, self._on_close = self._on_close, None
            hook()


def kill_guest(pid: int, child: subprocess.Popen[bytes] | None, whole_session: bool) -> None:
    """SIGKILL a guest's process (and its whole session) and reap it. Idempotent."""
    if whole_session:
        for member in session_members(pid):
            if member != pid:
                try:
                    os.kill(member, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    if child is not None:
        if child.poll() is None:
            try:
                child.kill()
            except ProcessLookupError:
                pass
        child.wait()
    else:
        kill_and_wait(pid)
    if whole_session:  # what it started while we killed it
        for member in session_members(pid):
            kill_and_wait(member, timeout=2.0)


@contextlib.contextmanager
def short_path(directory: Path, name: str) -> Iterator[str]:
    """A path to ``directory/name`` that fits a unix socket address (108 bytes): the path
    itself when short, else through an open descriptor of the directory."""
    full = str(directory / name)
    if len(full.encode()) < 100:
        yield full
        return
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)
