"""The VM manager: the interface the servicer calls, and its implementations.

``NoManager`` stands where no backend can run: every VM call raises UNAVAILABLE with the
reason VM_MANAGER_UNAVAILABLE, and ``info`` says why.

``PoolManager`` runs VMs on a backend (``qemu`` or ``process``): it owns the registry
(``VmStore``), the limit (``Permits``: one permit per VM, held from before its directory is
made until its process is dead, released exactly once on every path), the warm pool, the
health monitor and start-up recovery. Every resource a VM holds (permit, directory,
process, sockets) is released by one idempotent ``_finish``, whatever ended it: stop,
destroy, a crash of the guest, QEMU killed, or a start that failed at any step.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import ClassVar, Protocol

import grpc

from services.common.backoff import backoff
from services.common.clock import Clock
from services.common.errors import (
    Aborted,
    BlixardError,
    FailedPrecondition,
    LoopFailures,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.common.validation import Problems
from services.vms import domain
from services.vms.agent import AgentError, AgentTimeout, ExecEvent, Exited, Output
from services.vms.backend import (
    Backend,
    Instance,
    LaunchSpec,
    Step,
    kill_and_wait,
    no_faults,
    pid_alive,
    process_cwd,
    processes_under,
)
from services.vms.backend import StartFailed as BootFailed
from services.vms.domain import Kind, Vm
from services.vms.store import VmStore

log = logging.getLogger(__name__)

MIN_MEMORY_MB = 64
UNAVAILABLE_MESSAGE = "VM manager is not available (SKIP_VM_MANAGER may be set)"
ENDED_RETENTION = timedelta(days=1)
_END = object()


class DeadlineExceeded(BlixardError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "EXEC_TIMEOUT"
    default_message = "the command ran past its timeout"


@dataclass(frozen=True)
class ManagerInfo:
    available: bool
    backend: str
    reason: str = ""
    max_vms: int = 0
    running_vms: int = 0
    accelerator: str = ""
    warm_vms: int = 0
    pre_warm_count: int = 0


class VmManager(Protocol):
    def info(self) -> ManagerInfo: ...

    def create(self, vcpus: int, memory_mb: int) -> Vm: ...

    def get(self, vm_id: str) -> Vm: ...

    def list_vms(self, kinds: Iterable[Kind] = ()) -> list[Vm]: ...

    def stop(self, vm_id: str) -> Vm: ...

    def destroy(self, vm_id: str) -> Vm: ...

    def release(self, vm_id: str) -> Vm: ...

    def exec(
        self,
        vm_id: str,
        command: list[str],
        env: dict[str, str],
        working_directory: str,
        timeout: float,
        job_id: str = "",
    ) -> Iterator[ExecEvent]: ...

    def cancel_exec(self, vm_id: str) -> None: ...

    def close(self) -> None: ...


class NoManager:
    def __init__(self, reason: str, backend: str = "none") -> None:
        self.reason = reason
        self.backend = backend

    def info(self) -> ManagerInfo:
        return ManagerInfo(available=False, backend=self.backend, reason=self.reason)

    def _unavailable(self) -> Unavailable:
        return Unavailable(
            UNAVAILABLE_MESSAGE,
            reason="VM_MANAGER_UNAVAILABLE",
            metadata={"why": self.reason},
            retry_after=30.0,
        )

    def create(self, vcpus: int, memory_mb: int) -> Vm:
        raise self._unavailable()

    def get(self, vm_id: str) -> Vm:
        raise self._unavailable()

    def list_vms(self, kinds: Iterable[Kind] = ()) -> list[Vm]:
        raise self._unavailable()

    def stop(self, vm_id: str) -> Vm:
        raise self._unavailable()

    def destroy(self, vm_id: str) -> Vm:
        raise self._unavailable()

    def release(self, vm_id: str) -> Vm:
        raise self._unavailable()

    def exec(
        self,
        vm_id: str,
        command: list[str],
        env: dict[str, str],
        working_directory: str,
        timeout: float,
        job_id: str = "",
    ) -> Iterator[ExecEvent]:
        raise self._unavailable()

    def cancel_exec(self, vm_id: str) -> None:
        raise self._unavailable()

    def close(self) -> None:
        return None


# ---- permits -------------------------------------------------------------------------------


class Permit:
    def __init__(self, owner: str, permits: Permits) -> None:
        self.owner = owner
        self._permits = permits
        self._released = False

    def release(self) -> bool:
        """Give the permit back; True the first time, False (and counted) after."""
        return self._permits._release(self)


class Permits:
    """The VM limit: one permit per VM for its whole life. Counts every acquire and
    release so tests can check that each permit came back exactly once."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._held: dict[str, Permit] = {}
        self._lock = threading.Lock()
        self.acquired = 0
        self.released = 0
        self.double_releases = 0

    def try_acquire(self, owner: str) -> Permit | None:
        with self._lock:
            if len(self._held) >= self.capacity:
                return None
            permit = Permit(owner, self)
            self._held[owner] = permit
            self.acquired += 1
            return permit

    def _release(self, permit: Permit) -> bool:
        with self._lock:
            if permit._released:
                self.double_releases += 1
                log.error("the permit of VM %s was released twice", permit.owner)
                return False
            permit._released = True
            self._held.pop(permit.owner, None)
            self.released += 1
            return True

    @property
    def held(self) -> int:
        with self._lock:
            return len(self._held)

    @property
    def free(self) -> int:
        with self._lock:
            return self.capacity - len(self._held)


# ---- the pool manager ---------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    max_vms: int = 4
    default_vcpus: int = 1
    default_memory_mb: int = 256
    max_vcpus: int = 2
    max_memory_mb: int = 2048
    pre_warm_count: int = 1
    reuse_jobs: int = 1
    max_uptime: float = 3600.0  # seconds a VM may be reused or wait in the pool (0 = no limit)
    boot_timeout: float = 60.0
    ping_interval: float = 5.0
    ping_failures: int = 3
    stop_timeout: float = 10.0


@dataclass(eq=False)
class Live:
    """A VM this manager runs: its record and everything it holds."""

    vm: Vm
    permit: Permit
    directory: Path
    instance: Instance | None = None
    ping_failures: int = 0
    exec_active: bool = False
    drain_after_exec: bool = False
    ending: bool = False
    finishing: bool = False
    exec_abandoned: threading.Event = field(default_factory=threading.Event)
    ready: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)


@dataclass
class Counters:
    """What happened to resources, for operators and for the leak tests."""

    started: int = 0
    start_failures: int = 0
    finished: int = 0
    directories_removed: int = 0
    directory_failures: int = 0
    orphan_processes: int = 0
    orphan_directories: int = 0
    recovered: int = 0
    legacy_rows_migrated: int = 0
    health_failures: int = 0


class StateDirBusy(Exception):
    pass


class PoolManager:
    TERMINAL_WAIT: ClassVar[float] = 30.0

    def __init__(
        self,
        backend: Backend,
        store: VmStore,
        clock: Clock,
        limits: Limits,
        state_dir: Path,
        *,
        faults: Step = no_faults,
    ) -> None:
        self.backend = backend
        self.store = store
        self.clock = clock
        self.limits = limits
        self.state_dir = state_dir.resolve()
        self.faults = faults
        self.permits = Permits(limits.max_vms)
        self.counters = Counters()
        self._live: dict[str, Live] = {}
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._leftover_dirs: set[Path] = set()
        self._boot_failures = 0
        self._breaker_until = 0.0
        self._lock_file: int | None = None
        self._closed = False

    # ---- life of the manager ----------------------------------------------------------

    def lock_state_dir(self) -> None:
        """One service per state directory: another one's recovery would reap our VMs."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateDirBusy(
                f"VMS_STATE_DIR={self.state_dir} is in use by another VM service"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_file = fd

    def start(self) -> None:
        """Recover, reap, then run the pool filler and the health monitor."""
        self.recover()
        for name, target in (("vm-pool", self._fill_pool), ("vm-monitor", self._monitor)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Stop the threads and end every VM (a stopped service leaves nothing running)."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()
        for thread in self._threads:
            thread.join(timeout=self.limits.boot_timeout + 5)
        with self._lock:
            live = list(self._live.values())
        for item in live:
            self._finish(item, domain.Terminated("the VM service stopped"), "service stopped")
        self._retry_leftovers()
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None

    # ---- reads ------------------------------------------------------------------------

    def info(self) -> ManagerInfo:
        with self._lock:
            live = list(self._live.values())
        warm = sum(
            1
            for item in live
            if item.vm.pooled and not item.ending and item.vm.state.kind in (Kind.READY, Kind.IDLE)
        )
        return ManagerInfo(
            available=True,
            backend=self.backend.name,
            max_vms=self.limits.max_vms,
            running_vms=len(live),
            accelerator=getattr(self.backend, "accelerator", "") or "none",
            warm_vms=warm,
            pre_warm_count=self.limits.pre_warm_count,
        )

    def get(self, vm_id: str) -> Vm:
        with self._lock:
            item = self._live.get(vm_id)
            if item is not None:
                return item.vm
        vm = self.store.get(vm_id)
        if vm is None:
            raise NotFound("VM", vm_id)
        return vm

    def list_vms(self, kinds: Iterable[Kind] = ()) -> list[Vm]:
        return self.store.select(kinds)

    # ---- create -----------------------------------------------------------------------

    def create(self, vcpus: int, memory_mb: int) -> Vm:
        """A READY VM of this size: from the warm pool when one waits (or is booting),
        else booted now."""
        vcpus = vcpus or self.limits.default_vcpus
        memory_mb = memory_mb or self.limits.default_memory_mb
        problems = Problems()
        problems.check(
            vcpus <= self.limits.max_vcpus,
            "vcpus",
            f"at most {self.limits.max_vcpus} (VMS_MAX_VCPUS), not {vcpus}",
        )
        problems.check(
            MIN_MEMORY_MB <= memory_mb <= self.limits.max_memory_mb,
            "memory_mb",
            f"between {MIN_MEMORY_MB} and {self.limits.max_memory_mb} MiB "
            f"(VMS_MAX_MEMORY_MB), not {memory_mb}",
        )
        problems.raise_if_any()
        while True:
            claimed = self._claim_pooled(vcpus, memory_mb)
            if claimed is None:
                break
            if claimed.ready.wait(self.limits.boot_timeout + 5) and not claimed.ending:
                with self._lock:
                    if not claimed.ending and claimed.vm.state.kind in (Kind.READY, Kind.IDLE):
                        return claimed.vm
            # the pool VM we waited for failed to boot: try again
        if self.permits.free == 0:
            self._evict_pooled()
        item = self._boot(vcpus, memory_mb, pooled=False)
        return item.vm

    def _claim_pooled(self, vcpus: int, memory_mb: int) -> Live | None:
        with self._lock:
            candidates = [
                item
                for item in self._live.values()
                if item.vm.pooled
                and not item.ending
                and (item.vm.vcpus, item.vm.memory_mb) == (vcpus, memory_mb)
                and item.vm.state.kind in (Kind.STARTING, Kind.READY, Kind.IDLE)
            ]
            if not candidates:
                return None
            # A booted one first, then the one that has booted the longest.
            candidates.sort(key=lambda i: (i.vm.state.kind is Kind.STARTING, i.vm.created_at))
            item = candidates[0]
            self._update(item, pooled=False, detail="handed out from the warm pool")
            self._wake.notify_all()  # the pool refills
            return item

    def _evict_pooled(self) -> None:
        """At the limit, a warm VM of another size makes room for the one asked for."""
        with self._lock:
            spare = [
                i
                for i in self._live.values()
                if i.vm.pooled and not i.ending and i.vm.state.kind is not Kind.STARTING
            ]
            victim = spare[0] if spare else None
            if victim is not None:
                victim.ending = True
        if victim is not None:
            self._finish(victim, domain.Terminated("evicted from the warm pool"), "evicted")

    def _boot(self, vcpus: int, memory_mb: int, *, pooled: bool) -> Live:
        vm_id = str(uuid.uuid4())
        try:
            self.faults("permit")
        except BootFailed as exc:
            raise Unavailable(f"the VM did not start: {exc}", reason="VM_START_FAILED") from None
        permit = self.permits.try_acquire(vm_id)
        if permit is None:
            raise ResourceExhausted(
                f"all {self.limits.max_vms} VMs are in use (VMS_MAX_VMS)",
                reason="VM_LIMIT_REACHED",
                metadata={"max_vms": str(self.limits.max_vms)},
                retry_after=5.0,
            )
        directory = self.state_dir / vm_id
        now = self.clock.now()
        item = Live(
            Vm(
                vm_id=vm_id,
                state=domain.Starting(),
                vcpus=vcpus,
                memory_mb=memory_mb,
                backend=self.backend.name,
                created_at=now,
                updated_at=now,
                directory=str(directory),
                pooled=pooled,
            ),
            permit,
            directory,
        )
        try:
            self.faults("directory")
            directory.mkdir(parents=True)
            with self._lock:
                self._live[vm_id] = item
                self.store.save(item.vm, "starting")
            step = self._step_for(item)
            spec = LaunchSpec(vm_id, directory, vcpus, memory_mb, self.limits.boot_timeout)
            item.instance = self.backend.start(spec, step)
            self.faults("register")
            with self._lock:
                if item.ending:
                    raise BootFailed("the VM was destroyed while it started")
                self._update(
                    item,
                    state=domain.Ready(),
                    pid=item.instance.pid,
                    accelerator=item.instance.accelerator,
                    detail="booted",
                )
            self._watch(item)
            self.counters.started += 1
            self._boot_failures = 0
            return item
        except BaseException as exc:
            self.counters.start_failures += 1
            message = f"the VM did not start: {exc}"
            log.warning("VM %s: %s", vm_id, message)
            self._finish(item, domain.Failed(message), "start failed")
            if isinstance(exc, BootFailed | AgentError | OSError):
                raise Unavailable(message, reason="VM_START_FAILED", retry_after=5.0) from None
            raise
        finally:
            item.ready.set()

    def _step_for(self, item: Live) -> Step:
        def step(name: str) -> None:
            if item.ending:
                raise BootFailed("the VM was destroyed while it started")
            self.faults(name)

        return step

    def _watch(self, item: Live) -> None:
        """A thread that notices the guest's process ending, whoever ended it."""

        def watch() -> None:
            instance = item.instance
            assert instance is not None
            code = instance.wait()
            if not item.ending:
                how = f"exit code {code}" if code is not None and code >= 0 else ""
                if code is not None and code < 0:
                    how = f"killed by {signal.Signals(-code).name}"
                self._finish(
                    item,
                    domain.Failed(f"the VM's process ended unexpectedly ({how or 'gone'})"),
                    "process ended",
                )

        threading.Thread(target=watch, name=f"vm-watch-{item.vm.vm_id[:8]}", daemon=True).start()

    # ---- the end of a VM --------------------------------------------------------------

    def _finish(self, item: Live, final: domain.VmState, detail: str) -> None:
        """Release everything the VM holds, exactly once, and record how it ended."""
        with self._lock:
            already = item.finishing
            item.finishing = True
            item.ending = True
        if already:
            item.finished.wait(self.TERMINAL_WAIT)
            return
        try:
            if item.instance is not None:
                try:
                    item.instance.kill()
                except Exception:
                    log.exception("VM %s: cannot kill its process", item.vm.vm_id)
                item.instance.close()
            self._remove_directory(item.directory)
        finally:
            item.permit.release()
            with self._lock:
                self._live.pop(item.vm.vm_id, None)
                try:
                    self._update(item, state=final, pooled=False, detail=detail)
                except Exception:
                    log.exception("VM %s: cannot record that it ended", item.vm.vm_id)
                self.counters.finished += 1
                item.finished.set()
                item.ready.set()
                self._wake.notify_all()

    def _remove_directory(self, directory: Path) -> None:
        """Remove a VM's directory; retried, and kept for the monitor to retry if it still
        fails (reported, never dropped)."""
        for attempt in range(3):
            try:
                shutil.rmtree(directory)
                self.counters.directories_removed += 1
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                error = exc
                time.sleep(0.05 * (attempt + 1))
        self.counters.directory_failures += 1
        log.error("cannot remove %s (%s); will retry", directory, error)
        with self._lock:
            self._leftover_dirs.add(directory)

    def _retry_leftovers(self) -> None:
        with self._lock:
            pending = list(self._leftover_dirs)
        for directory in pending:
            try:
                shutil.rmtree(directory)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("still cannot remove %s (%s)", directory, exc)
                continue
            with self._lock:
                self._leftover_dirs.discard(directory)
                self.counters.directories_removed += 1

    @property
    def leftover_directories(self) -> list[Path]:
        with self._lock:
            return sorted(self._leftover_dirs)

    # ---- stop, destroy, release -------------------------------------------------------

    def _live_item(self, vm_id: str) -> Live | None:
        with self._lock:
            item = self._live.get(vm_id)
        if item is None and self.store.get(vm_id) is None:
            raise NotFound("VM", vm_id)
        return item

    def destroy(self, vm_id: str) -> Vm:
        item = self._live_item(vm_id)
        if item is not None:
            self._finish(item, domain.Terminated("destroyed"), "DestroyVm")
        return self.get(vm_id)

    def stop(self, vm_id: str) -> Vm:
        item = self._live_item(vm_id)
        if item is None:
            return self.get(vm_id)
        with self._lock:
            if item.ending:
                pass
            elif item.exec_active:
                item.drain_after_exec = True
                self._update(item, state=domain.Draining(), detail="StopVm while busy")
                return item.vm
            elif item.vm.state.kind is Kind.STARTING:
                raise FailedPrecondition(
                    f"VM {vm_id} is still starting; destroy it instead",
                    reason="ILLEGAL_TRANSITION",
                    subject=f"vms/{vm_id}",
                )
            else:
                self._update(item, state=domain.Draining(), pooled=False, detail="StopVm")
                item.ending = True
        self._stop_now(item)
        return self.get(vm_id)

    def _stop_now(self, item: Live) -> None:
        code = None
        if item.instance is not None:
            try:
                code = item.instance.shutdown(self.limits.stop_timeout)
            except Exception:
                log.exception("VM %s: a graceful stop failed; killing it", item.vm.vm_id)
        self._finish(item, domain.Terminated("stopped", code), "stopped")

    def release(self, vm_id: str) -> Vm:
        """Give a VM back: into the warm pool while it may run more jobs (VMS_REUSE_JOBS)
        and the pool wants it, else destroyed."""
        item = self._live_item(vm_id)
        if item is None:
            return self.get(vm_id)
        with self._lock:
            reusable = (
                not item.ending
                and not item.exec_active
                and item.vm.state.kind in (Kind.READY, Kind.IDLE)
                and item.vm.jobs_run < self.limits.reuse_jobs
                and not self._too_old(item)
                and self._warm_count(booted=True) < self.limits.pre_warm_count
            )
            if reusable:
                self._update(item, pooled=True, detail="released into the warm pool")
                return item.vm
        self._finish(item, domain.Terminated("released"), "ReleaseVm")
        return self.get(vm_id)

    # ---- exec -------------------------------------------------------------------------

    def exec(
        self,
        vm_id: str,
        command: list[str],
        env: dict[str, str],
        working_directory: str,
        timeout: float,
        job_id: str = "",
    ) -> Iterator[ExecEvent]:
        """Run a command in the VM: its output as it comes, then how it ended. Lazy: the
        VM becomes BUSY when the caller starts reading."""
        item = self._begin_exec(vm_id, job_id)
        yield from self._run_exec(item, command, env, working_directory, timeout)

    def _begin_exec(self, vm_id: str, job_id: str) -> Live:
        item = self._live_item(vm_id)
        with self._lock:
            if item is None or item.ending:
                state = self.get(vm_id).state
                raise FailedPrecondition(
                    f"VM {vm_id} is {state.kind.name}: it runs nothing any more",
                    reason="VM_NOT_RUNNING",
                    subject=f"vms/{vm_id}",
                )
            if item.exec_active or item.vm.state.kind not in (Kind.READY, Kind.IDLE):
                raise FailedPrecondition(
                    f"VM {vm_id} is {item.vm.state.kind.name}; it runs one command at a time",
                    reason="VM_BUSY",
                    subject=f"vms/{vm_id}",
                )
            item.exec_active = True
            self._update(
                item,
                state=domain.Busy(job_id, self.clock.timestamp()),
                pooled=False,
                detail=f"exec for job {job_id}" if job_id else "exec",
            )
        return item

    def _run_exec(
        self,
        item: Live,
        command: list[str],
        env: dict[str, str],
        working_directory: str,
        timeout: float,
    ) -> Iterator[ExecEvent]:
        """A pump thread reads the agent's stream to its end, whatever the caller does; the
        caller reads from a bounded queue. A caller that goes away (``abandoned``) gets its
        command killed, and the VM is IDLE again once the agent has said so."""
        instance = item.instance
        assert instance is not None
        agent = instance.agent
        deadline = time.monotonic() + timeout if timeout > 0 else None
        default_env, default_workdir = self.backend.exec_defaults(item.directory)
        events: queue.Queue[object] = queue.Queue(maxsize=64)
        abandoned = item.exec_abandoned = threading.Event()

        def offer(thing: object) -> bool:
            while not abandoned.is_set():
                try:
                    events.put(thing, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def pump() -> None:
            last: object = None
            try:
                with agent.lock:
                    try:
                        for event in agent.execute(
                            command,
                            {**default_env, **env},
                            working_directory or default_workdir,
                            deadline,
                        ):
                            if isinstance(event, Output):
                                if not offer(event):
                                    self._kill_command(item)
                                    return
                            else:
                                last = event
                    except AgentTimeout:
                        self._kill_command(item)
                        last = DeadlineExceeded(f"the command ran past its timeout of {timeout:g}s")
                    except AgentError as exc:
                        if not item.ending:
                            self._finish(
                                item,
                                domain.Failed(f"the agent broke off an execution: {exc}"),
                                "lost",
                            )
                        last = Aborted(
                            f"VM {item.vm.vm_id} was lost during the execution: {exc}",
                            reason="VM_LOST",
                        )
            except BaseException as exc:  # never leave the caller waiting
                log.exception("VM %s: the execution failed", item.vm.vm_id)
                last = exc
            finally:
                self._end_exec(item)
                if last is not None:
                    offer(last)
                offer(_END)

        pump_thread = threading.Thread(
            target=pump, name=f"vm-exec-{item.vm.vm_id[:8]}", daemon=True
        )
        pump_thread.start()
        try:
            while True:
                try:
                    thing = events.get(timeout=0.5)
                except queue.Empty:
                    if pump_thread.is_alive() or not events.empty():
                        continue
                    # The pump ended without a last word for this caller: the execution
                    # was abandoned elsewhere (the VM stopped or destroyed meanwhile).
                    raise Aborted(
                        f"VM {item.vm.vm_id} ended during the execution", reason="VM_LOST"
                    ) from None
                if thing is _END:
                    return
                if isinstance(thing, BaseException):
                    raise thing
                yield thing  # type: ignore[misc]
        finally:
            abandoned.set()

    def _kill_command(self, item: Live) -> None:
        """Kill the running command and read its stream to the exit frame (short deadline);
        a VM whose agent does not get there is not trusted again."""
        instance = item.instance
        if instance is None:
            return
        try:
            instance.agent.signal(signal.SIGKILL)
            deadline = time.monotonic() + 5.0
            while True:
                kind, _ = instance.agent.receive(deadline)
                if kind in (b"x", b"f"):
                    return
        except AgentError as exc:
            self._finish(item, domain.Failed(f"the agent did not stop a command: {exc}"), "stuck")

    def cancel_exec(self, vm_id: str) -> None:
        """The caller of an exec went away: kill the command (its stream then ends)."""
        with self._lock:
            item = self._live.get(vm_id)
        if item is None or item.instance is None or not item.exec_active:
            return
        item.exec_abandoned.set()
        try:
            item.instance.agent.signal(signal.SIGKILL)
        except AgentError:
            pass

    def _end_exec(self, item: Live) -> None:
        with self._lock:
            item.exec_active = False
            if item.ending:
                return
            item.vm = replace(item.vm, jobs_run=item.vm.jobs_run + 1)
            drain = item.drain_after_exec
            if drain:
                item.ending = True
            else:
                self._update(
                    item,
                    state=domain.Idle(item.vm.jobs_run, self.clock.timestamp()),
                    detail="exec ended",
                )
        if drain:
            self._stop_now(item)

    # ---- state changes ----------------------------------------------------------------

    def _update(
        self,
        item: Live,
        *,
        state: domain.VmState | None = None,
        detail: str = "",
        **changes: object,
    ) -> None:
        """Change the VM's record (memory and store). Caller holds the lock."""
        vm = item.vm
        if state is not None and state != vm.state:
            domain.check_move(vm.vm_id, vm.state, state)
        new = replace(vm, state=state or vm.state, updated_at=self.clock.now(), **changes)  # type: ignore[arg-type]
        self.store.save(new, detail, event=state is not None)
        item.vm = new

    def _warm_count(self, *, booted: bool = False) -> int:
        """Pooled VMs (with ``booted``: only those READY or IDLE, not still STARTING)."""
        return sum(
            1
            for i in self._live.values()
            if i.vm.pooled
            and not i.ending
            and (not booted or i.vm.state.kind in (Kind.READY, Kind.IDLE))
        )

    # ---- the warm pool ----------------------------------------------------------------

    def _too_old(self, item: Live) -> bool:
        """Up longer than VMS_MAX_UPTIME: it is replaced rather than used again."""
        limit = self.limits.max_uptime
        return limit > 0 and (self.clock.now() - item.vm.created_at).total_seconds() >= limit

    def _fill_pool(self) -> None:
        while not self._stopping.is_set():
            with self._wake:
                extra = [i for i in self._live.values() if i.vm.pooled and not i.ending]
                old = [
                    i for i in extra if i.vm.state.kind is not Kind.STARTING and self._too_old(i)
                ]
                if old:  # recycled: a fresh one boots in its place
                    victim, why = old[0], "recycled: up longer than VMS_MAX_UPTIME"
                    victim.ending = True
                elif self._warm_count(booted=True) > self.limits.pre_warm_count:
                    # A released VM came back while a new one booted: the most used goes.
                    victim = max(extra, key=lambda i: i.vm.jobs_run)
                    victim.ending, why = True, "the warm pool is full"
                else:
                    victim = None
            if victim is not None:
                self._finish(victim, domain.Terminated(why), "pool trim")
                continue
            with self._wake:
                wanted = self.limits.pre_warm_count - self._warm_count()
                wait = 1.0
                if time.monotonic() < self._breaker_until:
                    wait = self._breaker_until - time.monotonic()
                    wanted = 0
                if wanted <= 0 or self.permits.free == 0:
                    self._wake.wait(wait)
                    continue
            try:
                self._boot(self.limits.default_vcpus, self.limits.default_memory_mb, pooled=True)
            except Exception as exc:
                # The circuit breaker: boots that keep failing are retried ever later.
                self._boot_failures += 1
                delay = backoff(self._boot_failures, base=1.0, cap=60.0)
                self._breaker_until = time.monotonic() + delay
                log.warning(
                    "the warm pool could not boot a VM (%d in a row; next try in %.1fs): %s",
                    self._boot_failures,
                    delay,
                    exc,
                )

    # ---- the health monitor -----------------------------------------------------------

    def _monitor(self) -> None:
        last_prune = 0.0
        failures = LoopFailures("the VM health monitor")
        while not self._stopping.wait(self.limits.ping_interval):
            try:
                self.check_health()
                self._retry_leftovers()
                if time.monotonic() - last_prune > 3600:
                    last_prune = time.monotonic()
                    self.store.prune(self.clock.now() - ENDED_RETENTION)
                failures.succeeded()
            except Exception as exc:
                failures.failed(exc)

    def check_health(self) -> None:
        """Ping every VM that is not running a command; N failures in a row and it is
        FAILED, its resources released, and the pool refills."""
        with self._lock:
            items = [
                i
                for i in self._live.values()
                if not i.ending and i.instance is not None and not i.exec_active
            ]
        timeout = min(self.limits.ping_interval, 5.0)
        for item in items:
            instance = item.instance
            assert instance is not None
            if not instance.agent.lock.acquire(blocking=False):
                continue  # an exec just began: its stream is the proof of life
            try:
                instance.agent.ping(timeout)
                item.ping_failures = 0
                continue
            except AgentError as exc:
                error = exc
            finally:
                instance.agent.lock.release()
            item.ping_failures += 1
            self.counters.health_failures += 1
            log.warning(
                "VM %s: ping %d/%d failed: %s",
                item.vm.vm_id,
                item.ping_failures,
                self.limits.ping_failures,
                error,
            )
            if item.ping_failures >= self.limits.ping_failures:
                self._finish(
                    item,
                    domain.Failed(
                        f"the agent did not answer {item.ping_failures} pings in a row: {error}"
                    ),
                    "health check",
                )

    # ---- start-up recovery ------------------------------------------------------------

    def recover(self) -> None:
        """Rewrite legacy rows, take back the warm VMs still alive (pid, then QMP and the
        agent), end the rest, and reap what a crash left behind: processes and directories
        no live VM owns."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        migrated = self.store.migrate_legacy(self.clock.now())
        self.counters.legacy_rows_migrated = len(migrated)
        kept: set[str] = set()
        for vm in self.store.live():
            if self._adopt(vm):
                kept.add(vm.vm_id)
        names: tuple[str, ...] = (
            os.path.basename(getattr(self.backend, "qemu", "qemu-system-x86_64")),
            "blixard-agent",
        )
        with self._lock:
            keep_pids = {i.instance.pid for i in self._live.values() if i.instance is not None}
        for pid in processes_under(self.state_dir, names):
            if pid not in keep_pids:
                log.warning("reaping an orphan VM process %d", pid)
                if kill_and_wait(pid):
                    self.counters.orphan_processes += 1
        # What those left running in a VM's directory (commands of the process backend).
        # A process may end between the listing and the look at its directory (killing
        # the ones above ends others): it has no directory then, and nothing to reap.
        root = self.state_dir.resolve()
        for pid in processes_under(self.state_dir, None):
            where = Path(process_cwd(pid))
            if pid == os.getpid() or not where.is_relative_to(root):
                continue
            inside = where.relative_to(root).parts
            if inside and inside[0] not in kept:
                log.warning("reaping an orphan command %d", pid)
                kill_and_wait(pid)
                self.counters.orphan_processes += 1
        for entry in self.state_dir.iterdir():
            if entry.is_dir() and entry.name not in kept:
                log.warning("removing an orphan VM directory %s", entry)
                self._remove_directory(entry)
                self.counters.orphan_directories += 1
        if migrated or kept or self.counters.orphan_processes or self.counters.orphan_directories:
            log.info(
                "recovery: %d legacy rows rewritten, %d VMs taken back, "
                "%d orphan processes and %d directories reaped",
                len(migrated),
                len(kept),
                self.counters.orphan_processes,
                self.counters.orphan_directories,
            )

    def _adopt(self, vm: Vm) -> bool:
        now = self.clock.now()
        directory = Path(vm.directory) if vm.directory else self.state_dir / vm.vm_id
        alive = pid_alive(vm.pid)
        reason = ""
        if vm.backend != self.backend.name:
            reason = f"it ran on the {vm.backend} backend"
        elif not (vm.pooled and vm.state.kind is Kind.READY):
            reason = f"it was {vm.state.kind.name} when the service stopped"
        elif not alive:
            reason = "its process was gone"
        if not reason:
            permit = self.permits.try_acquire(vm.vm_id)
            if permit is None:
                reason = "over the VM limit"
            else:
                spec = LaunchSpec(
                    vm.vm_id, directory, vm.vcpus, vm.memory_mb, self.limits.boot_timeout
                )
                try:
                    instance = self.backend.adopt(spec, vm.pid)
                except (BootFailed, AgentError, OSError) as exc:
                    permit.release()
                    reason = f"it did not answer ({exc})"
                else:
                    item = Live(vm, permit, directory, instance)
                    item.ready.set()
                    with self._lock:
                        self._live[vm.vm_id] = item
                    self._watch(item)
                    self.counters.recovered += 1
                    log.info("VM %s (pid %d) taken back into the warm pool", vm.vm_id, vm.pid)
                    return True
        if alive and self.backend.owns(vm.pid, self.state_dir):
            kill_and_wait(vm.pid)
        final: domain.VmState = (
            domain.Terminated(f"the VM service restarted; {reason}")
            if alive
            else domain.Failed(f"gone at start-up: {reason} (was {domain.to_json(vm.state)})")
        )
        self.store.save(replace(vm, state=final, pooled=False, updated_at=now), "recovery")
        return False


def count_live(manager: PoolManager) -> dict[Kind, int]:
    with manager._lock:
        return domain.count_by_kind([i.vm.state for i in manager._live.values()])


__all__ = [
    "UNAVAILABLE_MESSAGE",
    "Exited",
    "Limits",
    "ManagerInfo",
    "NoManager",
    "Output",
    "PoolManager",
    "VmManager",
]
