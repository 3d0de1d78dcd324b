"""The ``qemu`` backend: real microVMs on QEMU's ``microvm`` machine.

Each VM is one QEMU process started in the VM's own directory, which holds everything it
uses: ``qmp.sock`` (QMP, the machine's control channel), ``agent.sock`` (the virtio-serial
port named ``blixard.agent``, where the guest agent listens), ``console.log`` (the
guest's serial console) and ``qemu.log``. The guest is the image ``make vm-image`` builds:
Debian's kernel, uncompressed (``vmlinux``: booting the bzImage makes the guest
decompress itself in emulation, twice as slow), and an initramfs with busybox and the agent.

The accelerator is chosen by a boot probe, never by the presence of ``/dev/kvm``: KVM when
a guest really boots under it, software emulation (TCG) otherwise. Under TCG the kernel
gets ``tsc_early_khz=<host TSC> no_timer_check``: without them about one boot in seven
hangs. Every wait has a deadline, and a VM that misses one is killed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
KVM_PROBE_TIMEOUT = 6.0


@dataclass(frozen=True)
class Image:
    directory: Path

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinux"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.cpio"

    @property
    def agent(self) -> Path:
        return self.directory / "blixard-agent"

    def missing(self) -> str:
        """'' when the image is complete, else what is missing."""
        absent = [p.name for p in (self.kernel, self.initrd, self.agent) if not p.exists()]
        if absent:
            return (
                f"the guest image in {self.directory} lacks {', '.join(absent)} "
                f"(run `make vm-image`)"
            )
        return ""

    def fingerprint(self) -> str:
        parts = []
        for path in (self.kernel, self.initrd):
            info = path.stat()
            parts.append(f"{path.name}:{info.st_size}:{info.st_mtime_ns}")
        return ",".join(parts)

    def kernel_release(self) -> str:
        try:
            manifest = json.loads((self.directory / "manifest.json").read_text())
        except (OSError, ValueError):
            return ""
        release = manifest.get("kernel_release", "") if isinstance(manifest, dict) else ""
        return str(release)


def host_tsc_khz() -> int:
    """The host's TSC frequency in kHz (for tsc_early_khz), 0 when unknown."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text())
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return 0


class Qmp:
    """Just enough QMP: the greeting, capabilities, and a command at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""

    @classmethod
    def connect(cls, path: str, timeout: float) -> Qmp:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                sock.connect(path)
                qmp = cls(sock)
                qmp._read(deadline)  # the greeting
                qmp.command("qmp_capabilities", deadline=deadline)
                return qmp
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() >= deadline:
                    raise StartFailed(f"QEMU opened no QMP socket at {path}") from None
                time.sleep(0.02)
            except BaseException:
                sock.close()
                raise

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StartFailed("QMP did not answer in time")
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise StartFailed("QMP did not answer in time") from None
            except OSError as exc:
                raise StartFailed(f"QMP failed: {exc}") from None
            if not data:
                raise StartFailed("QEMU closed the QMP connection")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    def command(self, name: str, *, deadline: float | None = None) -> Any:
        deadline = deadline if deadline is not None else time.monotonic() + 5.0
        self._sock.sendall(json.dumps({"execute": name}).encode() + b"\n")
        while True:
            message = self._read(deadline)
            if "return" in message:
                return message["return"]
            if "error" in message:
                raise StartFailed(f"QMP {name}: {message['error'].get('desc', message)}")
            # an asynchronous event: not the answer

    def close(self) -> None:
        self._sock.close()


class QemuBackend:
    name = "qemu"
    steps: tuple[str, ...] = ("spawn", "qmp", "agent", "hello")

    def __init__(
        self,
        image: Image,
        *,
        accel: str = "auto",
        state_dir: Path,
        qemu: str = QEMU,
    ) -> None:
        self.image = image
        self.requested_accel = accel
        self.state_dir = state_dir
        self.qemu = qemu
        self.accelerator = ""  # chosen by ``probe``
        self.tsc_khz = host_tsc_khz()
        self._probe_lock = threading.Lock()

    # ---- can this machine run it --------------------------------------------------------

    def check(self) -> str:
        if shutil.which(self.qemu) is None:
            return f"{self.qemu} is not installed (apt-get install qemu-system-x86)"
        missing = self.image.missing()
        if missing:
            return missing
        try:
            self.probe()
        except StartFailed as exc:
            return str(exc)
        return ""

    def probe(self) -> str:
        """Choose the accelerator by booting the guest: KVM where it really boots, else
        TCG. The answer is kept in the state directory for this QEMU and this image."""
        with self._probe_lock:
            if self.accelerator:
                return self.accelerator
            if self.requested_accel != "auto":  # the operator chose: no probe
                self.accelerator = self.requested_accel
                return self.accelerator
            # Kept beside the image (shared by every state directory), else in the state dir.
            cache = self.image.directory / "accel-probe.json"
            if not os.access(self.image.directory, os.W_OK):
                cache = self.state_dir / "accel-probe.json"
            key = f"{shutil.which(self.qemu)}|{self.image.fingerprint()}"
            with contextlib.suppress(OSError, ValueError):
                cached = json.loads(cache.read_text())
                if cached.get("key") == key and cached.get("accelerator") in ("kvm", "tcg"):
                    self.accelerator = cached["accelerator"]
                    log.info("accelerator %s (probed before)", self.accelerator)
                    return self.accelerator
            reasons = []
            for accel in ("kvm", "tcg"):
                if accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
                    reasons.append("kvm: /dev/kvm is not usable")
                    continue
                timeout = KVM_PROBE_TIMEOUT if accel == "kvm" else 60.0
                started = time.monotonic()
                try:
                    self._probe_boot(accel, timeout)
                except (StartFailed, AgentError, OSError) as exc:
                    reasons.append(f"{accel}: {exc}")
                    log.info("boot probe: no guest booted under %s (%s)", accel, exc)
                    continue
                log.info(
                    "boot probe: a guest booted under %s in %.1fs",
                    accel,
                    time.monotonic() - started,
                )
                self.accelerator = accel
                with contextlib.suppress(OSError):
                    self.state_dir.mkdir(parents=True, exist_ok=True)
                    cache.write_text(json.dumps({"key": key, "accelerator": accel}))
                return accel
            raise StartFailed(f"no guest boots on this machine ({'; '.join(reasons)})")

    def _probe_boot(self, accel: str, timeout: float) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="probe-", dir=self.state_dir) as directory:
            spec = LaunchSpec("probe", Path(directory), 1, 128, timeout)
            instance = self._launch(spec, accel, lambda _step: None)
            try:
                with instance.agent.lock:
                    instance.agent.info(5.0)
            finally:
                instance.kill()
                instance.close()

    # ---- one VM ---------------------------------------------------------------------------

    def command_line(self, spec: LaunchSpec, accel: str) -> list[str]:
        append = "console=ttyS0 quiet panic=-1 reboot=t"
        if accel == "tcg" and self.tsc_khz:
            append += f" tsc_early_khz={self.tsc_khz} no_timer_check"
        return [
            self.qemu,
            "-name", f"blixard-{spec.vm_id}",
            "-M", "microvm",
            "-accel", accel,
            "-cpu", "host" if accel == "kvm" else "max",
            "-smp", str(spec.vcpus),
            "-m", str(spec.memory_mb),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(self.image.kernel),
            "-initrd", str(self.image.initrd),
            "-append", append,
            "-serial", "file:console.log",
            "-qmp", "unix:qmp.sock,server=on,wait=off",
            "-chardev", "socket,id=agent,path=agent.sock,server=on,wait=off",
            "-device", "virtio-serial-device",
            "-device", "virtserialport,chardev=agent,name=blixard.agent",
        ]  # fmt: skip

    def start(self, spec: LaunchSpec, step: Step) -> GuestProcess:
        return self._launch(spec, self.probe(), step)

    def _launch(self, spec: LaunchSpec, accel: str, step: Step) -> GuestProcess:
        deadline = time.monotonic() + spec.boot_timeout
        step("spawn")
        with open(spec.directory / "qemu.log", "wb") as qemu_log:
            try:
                child = subprocess.Popen(
                    self.command_line(spec, accel),
                    cwd=spec.directory,
                    stdin=subprocess.DEVNULL,
                    stdout=qemu_log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                raise StartFailed(f"cannot start {self.qemu}: {exc}") from None
        qmp: Qmp | None = None
        agent: AgentClient | None = None
        try:
            step("qmp")
            with short_path(spec.directory, "qmp.sock") as path:
                qmp = _until_exit(child, lambda: Qmp.connect(path, _left(deadline)))
            status = qmp.command("query-status", deadline=deadline)
            if status.get("status") not in ("running", "prelaunch"):
                raise StartFailed(f"QEMU reports the guest {status.get('status')}")
            step("agent")
            with short_path(spec.directory, "agent.sock") as path:
                agent = AgentClient.connect(path, _left(deadline))
            step("hello")
            with agent.lock:
                _until_exit(child, lambda: agent.ping(_left(deadline)) if agent else None)
            closing = qmp
            return GuestProcess(child.pid, agent, accel, child=child, on_close=closing.close)
        except BaseException as exc:
            if agent is not None:
                agent.close()
            if qmp is not None:
                qmp.close()
            kill_guest(child.pid, child, whole_session=False)
            if isinstance(exc, AgentError):
                raise StartFailed(
                    f"the guest agent did not answer within {spec.boot_timeout:g}s ({exc})"
                    f"{_console_tail(spec.directory)}"
                ) from None
            raise

    def adopt(self, spec: LaunchSpec, pid: int) -> GuestProcess:
        """A QEMU left by a previous run: ours (name and directory), QMP says it runs, and
        its agent answers."""
        if not self.owns(pid, spec.directory):
            raise StartFailed(f"process {pid} is not this VM's QEMU")
        with short_path(spec.directory, "qmp.sock") as path:
            qmp = Qmp.connect(path, 3.0)
        try:
            status = qmp.command("query-status")
            if status.get("status") != "running":
                raise StartFailed(f"QEMU reports the guest {status.get('status')}")
            with short_path(spec.directory, "agent.sock") as path:
                agent = AgentClient.connect(path, 3.0)
            try:
                with agent.lock:
                    agent.ping(5.0)
            except AgentError:
                agent.close()
                raise
        except BaseException:
            qmp.close()
            raise
        accel = self.accelerator or "unknown"
        return GuestProcess(pid, agent, accel, on_close=qmp.close)

    def exec_defaults(self, directory: Path) -> tuple[dict[str, str], str]:
        return {"PATH": "/sbin:/bin:/usr/sbin:/usr/bin", "HOME": "/root"}, "/root"

    def owns(self, pid: int, state_dir: Path) -> bool:
        if not pid_alive(pid) or process_exe_name(pid) != os.path.basename(self.qemu):
            return False
        cwd, root = process_cwd(pid), str(state_dir.resolve())
        return cwd == root or cwd.startswith(root + os.sep)


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _until_exit(child: subprocess.Popen[bytes], action: Callable[[], Any]) -> Any:
    """Run ``action``; if QEMU has exited meanwhile, say so rather than time out."""
    try:
        return action()
    except (StartFailed, AgentError):
        code = child.poll()
        if code is not None:
            raise StartFailed(f"QEMU exited with {code} while the guest booted") from None
        raise


def _console_tail(directory: Path) -> str:
    try:
        lines = (directory / "console.log").read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return f"; console: {' | '.join(lines[-3:])}" if lines else ""
