"""The VM service in-process with the ``process`` backend: the real guest agent (the same
binary that runs as PID 1 in a microVM) behind the real protocol, real SQLite, real
processes. Everything above the backend is what runs with QEMU; tests/system/test_vm_qemu.py
runs the microVM half.

Every test that makes VMs ends by counting what is left: processes, directories, sockets
and permits (each permit given back exactly once).
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from blixard.common.v1 import job_spec_pb2
from blixard.vms.v1 import vm_service_pb2 as pb
from blixard.vms.v1 import vm_service_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import pbtime
from services.common.errors import describe
from services.vms import bootstrap
from services.vms import config as vms_config
from services.vms import manager as manager_module
from services.vms.backend import START_STEPS, Faults, processes_under
from services.vms.manager import PoolManager
from tests.conftest import free_port, require
from tests.deployment import ROOT, start_service, stop_process, wait_healthy
from tests.grpc.conftest import eventually

IMAGE_DIR = ROOT / "var" / "vm-image"
AGENT = IMAGE_DIR / "blixard-agent"
TIMEOUT = 10.0


@pytest.fixture(scope="module", autouse=True)
def agent_binary() -> None:
    if shutil.which("gcc"):
        subprocess.run(
            [sys.executable, "vm/build_image.py", "--agent-only", "--out", str(IMAGE_DIR)],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    require(
        os.access(AGENT, os.X_OK),
        "the guest agent is not built and gcc is missing (apt-get install gcc libc6-dev)",
    )


@dataclass
class VmServer:
    running: object
    manager: PoolManager
    stub: pb_grpc.VmServiceStub
    channel: grpc.Channel
    state_dir: Path
    faults: Faults

    def stop(self) -> None:
        self.channel.close()
        self.running.stop(0.5)  # type: ignore[attr-defined]


def vms_env(tmp: Path, **extra: str) -> dict[str, str]:
    return {
        "VMS_GRPC_HOST": "127.0.0.1",
        "VMS_GRPC_PORT": "0",
        "VMS_MANAGER": "process",
        "VMS_IMAGE_DIR": str(IMAGE_DIR),
        "VMS_STATE_DIR": str(tmp / "state"),
        "VMS_DATABASE_URL": f"sqlite:///{tmp}/vms.sqlite3",
        "VMS_PRE_WARM_COUNT": "0",
        "VMS_MAX_VMS": "4",
        "VMS_PING_INTERVAL": "0.2",
        "VMS_BOOT_TIMEOUT": "10",
        **extra,
    }


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[object]:
    servers: list[VmServer] = []

    def make(**extra: str) -> VmServer:
        faults = Faults()
        config = vms_config.load(vms_env(tmp_path, **extra))
        running, manager = bootstrap.build_with_manager(config, faults=faults)
        running.server.start()
        assert isinstance(manager, PoolManager), manager.info()
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        server = VmServer(
            running, manager, pb_grpc.VmServiceStub(channel), channel, config.state_dir, faults
        )
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server) -> VmServer:  # type: ignore[no-untyped-def]
    return make_server()  # type: ignore[no-any-return]


# ---- helpers -----------------------------------------------------------------------------


def create(server: VmServer, **kw: int) -> pb.Vm:
    return server.stub.CreateVm(pb.CreateVmRequest(**kw), timeout=TIMEOUT).vm


def run(
    server: VmServer, vm_id: str, command: list[str], **kw: object
) -> tuple[list[tuple[str, bytes]], int | None]:
    chunks: list[tuple[str, bytes]] = []
    code = None
    request = pb.ExecInVmRequest(vm_id=vm_id, command=command, **kw)  # type: ignore[arg-type]
    for event in server.stub.ExecInVm(request, timeout=TIMEOUT):
        if event.WhichOneof("event") == "output":
            name = job_spec_pb2.OutputStream.Name(event.output.stream)
            chunks.append((name.removeprefix("OUTPUT_STREAM_").lower(), event.output.data))
        else:
            code = event.exit_code
    return chunks, code


def joined(chunks: list[tuple[str, bytes]], stream: str) -> bytes:
    return b"".join(data for name, data in chunks if name == stream)


def failure_of(call: object) -> object:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return describe(caught.value)


def socket_fds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            pass
    return count


def assert_nothing_leaked(server: VmServer, *, sockets_before: int | None = None) -> None:
    manager = server.manager

    def settled() -> bool:
        return manager.permits.held == 0 and not processes_under(server.state_dir, None)

    eventually(settled, 10, "every VM to end")
    assert processes_under(server.state_dir, None) == []
    assert [p for p in server.state_dir.iterdir() if p.is_dir()] == []
    assert list(server.state_dir.rglob("*.sock")) == []
    assert manager.permits.held == 0
    assert manager.permits.acquired == manager.permits.released
    assert manager.permits.double_releases == 0
    assert manager.leftover_directories == []
    if sockets_before is not None:
        assert socket_fds() <= sockets_before


# ---- the manager's info and health ----------------------------------------------------------


def test_manager_info_names_the_backend_and_its_limits(server: VmServer) -> None:
    info = server.stub.GetManagerInfo(pb.GetManagerInfoRequest(), timeout=TIMEOUT)
    assert (info.available, info.backend, info.accelerator) == (True, "process", "none")
    assert info.max_vms == 4 and info.reason == ""
    health = health_pb2_grpc.HealthStub(server.channel).Check(
        health_pb2.HealthCheckRequest(service="blixard.vms.v1.VmService"), timeout=TIMEOUT
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING


# ---- ExecInVm: the protocol end to end --------------------------------------------------------


def test_exec_streams_output_in_order_then_the_exit_code(server: VmServer) -> None:
    vm = create(server)
    script = "for i in 1 2 3; do echo out$i; sleep 0.05; echo err$i >&2; sleep 0.05; done; exit 3"
    chunks, code = run(server, vm.vm_id, ["sh", "-c", script], job_id="j-42")

    assert code == 3
    assert joined(chunks, "stdout") == b"out1\nout2\nout3\n"
    assert joined(chunks, "stderr") == b"err1\nerr2\nerr3\n"
    # The streams interleave as written: out1 comes before err1, err1 before out2.
    order = [data.strip() for _name, data in chunks]
    assert order == [b"out1", b"err1", b"out2", b"err2", b"out3", b"err3"]
    after = server.stub.GetVm(pb.GetVmRequest(vm_id=vm.vm_id), timeout=TIMEOUT).vm
    assert after.state == pb.VM_STATE_IDLE
    assert after.jobs_completed == 1 and after.last_job_time.seconds > 0
    server.stub.DestroyVm(pb.DestroyVmRequest(vm_id=vm.vm_id), timeout=TIMEOUT)
    assert_nothing_leaked(server)


@pytest.mark.parametrize(
    "command, code",
    [
        (["true"], 0),
        (["false"], 1),
        (["sh", "-c", "exit 42"], 42),
        (["sh", "-c", "kill -9 $$"], 137),
        (["sh", "-c", "kill -TERM $$"], 143),
    ],
)
def test_exit_codes_come_through(server: VmServer, command: list[str], code: int) -> None:
    vm = create(server)
    assert run(server, vm.vm_id, command)[1] == code


def test_env_working_directory_and_binary_output(server: VmServer, tmp_path: Path) -> None:
    vm = create(server)
    chunks, code = run(
        server,
        vm.vm_id,
        ["sh", "-c", 'echo "$GREETING"; pwd; head -c 300000 /dev/zero | tr "\\0" "\\377"'],
        env={"GREETING": "hello vm", "PATH": "/usr/bin:/bin"},
        working_directory=str(tmp_path),
    )
    out = joined(chunks, "stdout")
    assert code == 0
    assert out.startswith(f"hello vm\n{tmp_path}\n".encode())
    assert out.endswith(b"\xff" * 300000)


def test_a_program_that_cannot_start_ends_with_127_and_says_why(server: VmServer) -> None:
    vm = create(server)
    chunks, code = run(server, vm.vm_id, ["/no/such/program"])
    assert code == 127
    assert b"/no/such/program" in joined(chunks, "stderr")
    assert run(server, vm.vm_id, ["true"])[1] == 0  # the VM is fine afterwards


def test_a_timeout_kills_the_command_and_the_vm_runs_again(server: VmServer) -> None:
    vm = create(server)
    request = pb.ExecInVmRequest(
        vm_id=vm.vm_id, command=["sh", "-c", "echo begun; sleep 30"], timeout=pbtime.duration(0.5)
    )
    seen: list[bytes] = []
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        for event in server.stub.ExecInVm(request, timeout=TIMEOUT):
            seen.append(event.output.data)
    assert time.monotonic() - started < 5
    failure = describe(caught.value)
    assert (failure.code, failure.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "EXEC_TIMEOUT")
    assert seen == [b"begun\n"]
    assert run(server, vm.vm_id, ["echo", "again"])[0] == [("stdout", b"again\n")]


def test_a_caller_that_goes_away_stops_the_command(server: VmServer, tmp_path: Path) -> None:
    vm = create(server)
    marker = tmp_path / "still-running"
    request = pb.ExecInVmRequest(
        vm_id=vm.vm_id,
        command=["sh", "-c", f"echo go; sleep 2; touch {marker}"],
    )
    stream = server.stub.ExecInVm(request, timeout=TIMEOUT)
    assert next(stream).output.data == b"go\n"
    stream.cancel()

    def idle() -> bool:
        got = server.stub.GetVm(pb.GetVmRequest(vm_id=vm.vm_id), timeout=TIMEOUT).vm
        return got.state == pb.VM_STATE_IDLE

    eventually(idle, 5, "the VM to be idle again")
    time.sleep(2.5)
    assert not marker.exists()
    assert run(server, vm.vm_id, ["true"])[1] == 0


def test_one_command_at_a_time(server: VmServer) -> None:
    vm = create(server)
    stream = server.stub.ExecInVm(
        pb.ExecInVmRequest(vm_id=vm.vm_id, command=["sh", "-c", "echo a; sleep 1"]),
        timeout=TIMEOUT,
    )
    next(stream)
    failure = failure_of(lambda: run(server, vm.vm_id, ["true"]))
    assert (failure.code, failure.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "VM_BUSY")  # type: ignore[attr-defined]
    assert [e.exit_code for e in stream if e.WhichOneof("event") == "exit_code"] == [0]


# ---- create, limits, validation ---------------------------------------------------------------


def test_create_lists_every_problem_at_once(server: VmServer) -> None:
    failure = failure_of(lambda: create(server, vcpus=999, memory_mb=10))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert sorted(f for f, _ in failure.field_violations) == ["memory_mb", "vcpus"]  # type: ignore[attr-defined]


def test_exec_checks_its_request(server: VmServer) -> None:
    failure = failure_of(lambda: run(server, "", [], env={"A=B": "x"}))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    fields = sorted(f for f, _ in failure.field_violations)  # type: ignore[attr-defined]
    assert fields == ["command", "env[A=B]", "vm_id"]


def test_an_unknown_vm_is_not_found(server: VmServer) -> None:
    for call in (
        lambda: server.stub.GetVm(pb.GetVmRequest(vm_id="nope"), timeout=TIMEOUT),
        lambda: server.stub.DestroyVm(pb.DestroyVmRequest(vm_id="nope"), timeout=TIMEOUT),
        lambda: run(server, "nope", ["true"]),
    ):
        assert failure_of(call).code == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def test_the_limit_holds_for_each_vms_whole_life(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(VMS_MAX_VMS="2")
    first, second = create(server), create(server)
    run(server, first.vm_id, ["true"])  # a VM that ran its job still holds its permit

    failure = failure_of(lambda: create(server))
    assert (failure.code, failure.reason) == (  # type: ignore[attr-defined]
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "VM_LIMIT_REACHED",
    )
    assert failure.retry_after  # type: ignore[attr-defined]
    gone = server.stub.DestroyVm(pb.DestroyVmRequest(vm_id=first.vm_id), timeout=TIMEOUT).vm
    assert gone.state == pb.VM_STATE_TERMINATED and gone.reason == "destroyed"
    third = create(server)
    for vm in (second, third):
        server.stub.DestroyVm(pb.DestroyVmRequest(vm_id=vm.vm_id), timeout=TIMEOUT)
    assert_nothing_leaked(server)
    assert server.manager.permits.acquired == 3


def test_list_filters_by_state(server: VmServer) -> None:
    ready, used = create(server), create(server)
    run(server, used.vm_id, ["true"])
    server.stub.DestroyVm(pb.DestroyVmRequest(vm_id=ready.vm_id), timeout=TIMEOUT)

    def ids(*states: int) -> set[str]:
        reply = server.stub.ListVms(pb.ListVmsRequest(states=list(states)), timeout=TIMEOUT)
        return {vm.vm_id for vm in reply.vms}

    assert ids(pb.VM_STATE_IDLE) == {used.vm_id}
    assert ids(pb.VM_STATE_TERMINATED) == {ready.vm_id}
    assert ids() == {ready.vm_id, used.vm_id}


def test_stopping_a_busy_vm_lets_its_command_finish_first(server: VmServer) -> None:
    vm = create(server)
    stream = server.stub.ExecInVm(
        pb.ExecInVmRequest(vm_id=vm.vm_id, command=["sh", "-c", "echo a; sleep 0.5; echo b"]),
        timeout=TIMEOUT,
    )
    next(stream)
    stopping = server.stub.StopVm(pb.StopVmRequest(vm_id=vm.vm_id), timeout=TIMEOUT).vm
    assert stopping.state == pb.VM_STATE_DRAINING
    rest = list(stream)
    assert rest[0].output.data == b"b\n" and rest[-1].exit_code == 0

    def stopped() -> pb.Vm | None:
        got = server.stub.GetVm(pb.GetVmRequest(vm_id=vm.vm_id), timeout=TIMEOUT).vm
        return got if got.state == pb.VM_STATE_TERMINATED else None

    assert eventually(stopped, 5, "the VM to stop").reason == "stopped"
    assert_nothing_leaked(server)


# ---- the warm pool --------------------------------------------------------------------------


def warm(server: VmServer) -> int:
    return server.stub.GetManagerInfo(pb.GetManagerInfoRequest(), timeout=TIMEOUT).warm_vms


def test_the_warm_pool_hands_out_a_booted_vm_and_refills(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(VMS_PRE_WARM_COUNT="1")
    eventually(lambda: warm(server) == 1, 10, "a warm VM")
    waiting = server.stub.ListVms(pb.ListVmsRequest(), timeout=TIMEOUT).vms[0]
    assert waiting.pooled and waiting.state == pb.VM_STATE_READY

    started = time.monotonic()
    vm = create(server)
    assert time.monotonic() - started < 1.0
    assert vm.vm_id == waiting.vm_id and not vm.pooled
    eventually(lambda: warm(server) == 1, 10, "the pool to refill")
    run(server, vm.vm_id, ["true"])
    server.stub.DestroyVm(pb.DestroyVmRequest(vm_id=vm.vm_id), timeout=TIMEOUT)
    assert server.manager.permits.held == 1  # only the new warm VM


def test_release_recycles_a_vm_up_to_reuse_jobs(make_server) -> None:  # type: ignore[no-untyped-def]
    # One VM in all: the pool cannot refill while it is handed out, so a release is what
    # brings a warm VM back.
    server = make_server(VMS_PRE_WARM_COUNT="1", VMS_REUSE_JOBS="2", VMS_MAX_VMS="1")
    eventually(lambda: warm(server) == 1, 10, "a warm VM")
    vm = create(server)
    run(server, vm.vm_id, ["true"])
    back = server.stub.ReleaseVm(pb.ReleaseVmRequest(vm_id=vm.vm_id), timeout=TIMEOUT).vm
    assert back.pooled and back.state == pb.VM_STATE_IDLE and back.jobs_run == 1

    again = create(server)
    assert again.vm_id == vm.vm_id
    run(server, again.vm_id, ["true"])
    done = server.stub.ReleaseVm(pb.ReleaseVmRequest(vm_id=again.vm_id), timeout=TIMEOUT).vm
    assert (done.state, done.reason) == (pb.VM_STATE_TERMINATED, "released")  # ran its 2 jobs
    eventually(lambda: warm(server) == 1, 10, "a fresh warm VM")
    fresh = server.stub.ListVms(pb.ListVmsRequest(states=[pb.VM_STATE_READY]), timeout=TIMEOUT)
    assert [v.jobs_run for v in fresh.vms] == [0]


def test_a_vm_up_longer_than_max_uptime_is_recycled_not_reused(make_server) -> None:  # type: ignore[no-untyped-def]
    """DESIGN: recycling after N jobs or max uptime. A warm VM that has waited longer
    than VMS_MAX_UPTIME is replaced by a fresh one; one released after that long is
    destroyed though it could run more jobs."""
    server = make_server(VMS_PRE_WARM_COUNT="1", VMS_REUSE_JOBS="5", VMS_MAX_UPTIME="2")
    first = eventually(lambda: pooled_ready(server), 10, "a warm VM")[0]
    ended = eventually(lambda: ended_vm(server, first.vm_id), 10, "the warm VM to be recycled")
    assert ended.reason == "recycled: up longer than VMS_MAX_UPTIME"
    second = eventually(lambda: pooled_ready(server), 10, "a fresh warm VM")[0]
    assert second.vm_id != first.vm_id

    vm = create(server)  # it takes the fresh one, and keeps it past its uptime
    run(server, vm.vm_id, ["true"])
    time.sleep(2.1)
    done = server.stub.ReleaseVm(pb.ReleaseVmRequest(vm_id=vm.vm_id), timeout=TIMEOUT).vm
    assert (done.state, done.reason) == (pb.VM_STATE_TERMINATED, "released")


def pooled_ready(server: VmServer) -> list[pb.Vm]:
    vms = server.stub.ListVms(pb.ListVmsRequest(states=[pb.VM_STATE_READY]), timeout=TIMEOUT)
    return [v for v in vms.vms if v.pooled]


def ended_vm(server: VmServer, vm_id: str) -> pb.Vm | None:
    vm = server.stub.GetVm(pb.GetVmRequest(vm_id=vm_id), timeout=TIMEOUT).vm
    return vm if vm.state == pb.VM_STATE_TERMINATED else None


# ---- failures: every start step, crashes, silence ----------------------------------------------


def test_a_fault_at_every_start_step_leaks_nothing(server: VmServer) -> None:
    server.stub.GetManagerInfo(pb.GetManagerInfoRequest(), timeout=TIMEOUT)  # gRPC connects
    sockets_before = socket_fds()
    steps = [s for s in START_STEPS if s not in ("qmp",)]  # the process backend has no QMP
    for step in steps:
        server.faults.arm(step)
        failure = failure_of(lambda: create(server))
        assert failure.code == grpc.StatusCode.UNAVAILABLE, step  # type: ignore[attr-defined]
        assert failure.reason == "VM_START_FAILED", step  # type: ignore[attr-defined]
        assert_nothing_leaked(server)
    assert server.faults.hits == steps
    failed = server.stub.ListVms(pb.ListVmsRequest(states=[pb.VM_STATE_FAILED]), timeout=TIMEOUT)
    assert len(failed.vms) == len(steps) - 1  # the permit step fails before a VM exists
    assert all("fault injected" in vm.error for vm in failed.vms)
    assert server.manager.permits.acquired == len(steps) - 1
    assert_nothing_leaked(server, sockets_before=sockets_before)
    assert run(server, create(server).vm_id, ["true"])[1] == 0  # and it still works


def test_a_killed_guest_is_failed_and_released(server: VmServer) -> None:
    vm = create(server)
    (pid,) = processes_under(server.state_dir, ("blixard-agent",))
    os.kill(pid, signal.SIGKILL)

    def failed() -> pb.Vm | None:
        got = server.stub.GetVm(pb.GetVmRequest(vm_id=vm.vm_id), timeout=TIMEOUT).vm
        return got if got.state == pb.VM_STATE_FAILED else None

    assert "SIGKILL" in eventually(failed, 5, "the VM to fail").error
    assert_nothing_leaked(server)


def test_a_guest_killed_during_a_command_fails_the_stream(server: VmServer) -> None:
    vm = create(server)
    stream = server.stub.ExecInVm(
        pb.ExecInVmRequest(vm_id=vm.vm_id, command=["sh", "-c", "echo a; sleep 30"]),
        timeout=TIMEOUT,
    )
    next(stream)
    (pid,) = processes_under(server.state_dir, ("blixard-agent",))
    os.kill(pid, signal.SIGKILL)
    failure = failure_of(lambda: list(stream))
    assert (failure.code, failure.reason) == (grpc.StatusCode.ABORTED, "VM_LOST")  # type: ignore[attr-defined]
    assert_nothing_leaked(server)  # the command (sleep 30) went with it


def test_the_health_monitor_fails_a_silent_vm_and_the_pool_replaces_it(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(VMS_PRE_WARM_COUNT="1", VMS_PING_INTERVAL="0.1", VMS_PING_FAILURES="2")
    eventually(lambda: warm(server) == 1, 10, "a warm VM")
    first = server.stub.ListVms(pb.ListVmsRequest(), timeout=TIMEOUT).vms[0]
    (pid,) = processes_under(server.state_dir, ("blixard-agent",))
    os.kill(pid, signal.SIGSTOP)  # alive, but silent

    def failed() -> pb.Vm | None:
        got = server.stub.GetVm(pb.GetVmRequest(vm_id=first.vm_id), timeout=TIMEOUT).vm
        return got if got.state == pb.VM_STATE_FAILED else None

    assert "2 pings" in eventually(failed, 10, "the silent VM to fail").error
    eventually(lambda: warm(server) == 1, 10, "a replacement warm VM")
    assert server.manager.permits.held == 1
    assert pid not in processes_under(server.state_dir, None)


# ---- start-up: recovery, orphans, legacy rows ---------------------------------------------------


def test_recovery_takes_back_warm_vms_and_reaps_the_rest(tmp_path: Path, make_server) -> None:  # type: ignore[no-untyped-def]
    env = vms_env(tmp_path, VMS_PRE_WARM_COUNT="1", VMS_GRPC_PORT=str(free_port()))
    address = f"127.0.0.1:{env['VMS_GRPC_PORT']}"
    crashed = start_service("services.vms", env, tmp_path / "first.log")
    try:
        wait_healthy(address, process=crashed)
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.VmServiceStub(channel)
            eventually(
                lambda: stub.GetManagerInfo(pb.GetManagerInfoRequest(), timeout=5).warm_vms == 1,
                10,
                "a warm VM",
            )
            busy = stub.CreateVm(pb.CreateVmRequest(), timeout=TIMEOUT).vm
            warm_vm = eventually(
                lambda: [
                    v
                    for v in stub.ListVms(pb.ListVmsRequest(), timeout=5).vms
                    if v.pooled and v.state == pb.VM_STATE_READY
                ],
                10,
                "the pool to refill with a READY VM",
            )[0]
            stream = stub.ExecInVm(
                pb.ExecInVmRequest(vm_id=busy.vm_id, command=["sh", "-c", "echo a; sleep 60"]),
                timeout=30,
            )
            next(stream)
            crashed.send_signal(signal.SIGKILL)  # the service dies; its VMs do not
            crashed.wait()
    finally:
        stop_process(crashed)
    state_dir = tmp_path / "state"
    assert len(processes_under(state_dir, ("blixard-agent",))) == 2
    (state_dir / "orphan-dir").mkdir()

    server = make_server(VMS_PRE_WARM_COUNT="1")

    get = server.stub.GetVm
    kept = get(pb.GetVmRequest(vm_id=warm_vm.vm_id), timeout=TIMEOUT).vm
    assert kept.state == pb.VM_STATE_READY and kept.pooled
    ended = get(pb.GetVmRequest(vm_id=busy.vm_id), timeout=TIMEOUT).vm
    assert ended.state == pb.VM_STATE_TERMINATED and "BUSY" in ended.reason
    counters = server.manager.counters
    assert counters.recovered == 1 and counters.orphan_directories == 2
    assert not (state_dir / "orphan-dir").exists()
    assert not (state_dir / busy.vm_id).exists()
    assert len(processes_under(state_dir, ("blixard-agent",))) == 1  # the warm one
    assert processes_under(state_dir, ("sleep",)) == []  # the busy VM's command went too
    assert run(server, create(server).vm_id, ["echo", "ok"])[0] == [("stdout", b"ok\n")]


def test_a_process_that_ends_during_recovery_does_not_stop_it(
    tmp_path: Path,
    make_server,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A command a crash left in a VM's directory ends between recovery's listing of
    processes and its look at their directories: recovery goes on (the service used to
    start with no VM manager), and still removes what was left."""
    make_server().stop()
    leftover = tmp_path / "state" / "vm-gone"
    leftover.mkdir(parents=True)
    command = subprocess.Popen(["sleep", "60"], cwd=leftover)
    look = manager_module.process_cwd

    def ends_as_it_is_looked_at(pid: int) -> str:
        if pid == command.pid:
            command.kill()
            command.wait()
        return look(pid)

    monkeypatch.setattr(manager_module, "process_cwd", ends_as_it_is_looked_at)
    server = make_server()  # asserts a working manager, not NoManager

    assert command.returncode is not None
    assert not leftover.exists()
    assert run(server, create(server).vm_id, ["echo", "ok"])[0] == [("stdout", b"ok\n")]


LEGACY_ROWS = {
    "vm-busy": 'Busy { job_id: "j-1", started_at: 1732700000 }',
    "vm-idle": "Idle { jobs_completed: 3, last_job_at: 1732700100 }",
    "vm-term": 'Terminated { reason: "stopped by admin", exit_code: Some(137) }',
    "vm-fail": 'Failed { error: "boot timed out after 30s" }',
    "vm-ready": "Ready",
}


def test_legacy_rows_are_read_with_all_fields_and_rewritten_as_json(
    tmp_path: Path,
    make_server,  # type: ignore[no-untyped-def]
) -> None:
    make_server().stop()  # creates the schema
    database = tmp_path / "vms.sqlite3"
    with sqlite3.connect(database) as db:
        for vm_id, legacy in LEGACY_ROWS.items():
            db.execute(
                "INSERT INTO vms VALUES (?, ?, '', 1, 256, 'process', 0, '', '', 0, 0, "
                "'2024-11-27 10:00:00', '2024-11-27 10:00:00')",
                (vm_id, legacy),
            )

    server = make_server()

    assert server.manager.counters.legacy_rows_migrated == len(LEGACY_ROWS)
    with sqlite3.connect(database) as db:
        stored = dict(db.execute("SELECT vm_id, state FROM vms WHERE vm_id LIKE 'vm-%'"))
        details = [d for (d,) in db.execute("SELECT detail FROM vm_events WHERE vm_id='vm-busy'")]
    assert all(text.startswith("{") for text in stored.values())
    assert stored["vm-term"] == '{"exit_code":137,"reason":"stopped by admin","state":"terminated"}'
    assert stored["vm-fail"] == '{"error":"boot timed out after 30s","state":"failed"}'
    # The migration kept every field (the event holds the state as migrated) ...
    assert details[0].startswith("migrated from the legacy form 'Busy {")
    with sqlite3.connect(database) as db:
        (migrated,) = db.execute(
            "SELECT state FROM vm_events WHERE vm_id='vm-busy' ORDER BY id LIMIT 1"
        ).fetchone()
    assert migrated == '{"job_id":"j-1","started_at":1732700000.0,"state":"busy"}'
    # ... and recovery then ended the live ones, whose processes are long gone.
    term = server.stub.GetVm(pb.GetVmRequest(vm_id="vm-term"), timeout=TIMEOUT).vm
    assert (term.state, term.reason, term.exit_code) == (
        pb.VM_STATE_TERMINATED,
        "stopped by admin",
        137,
    )
    busy = server.stub.GetVm(pb.GetVmRequest(vm_id="vm-busy"), timeout=TIMEOUT).vm
    assert busy.state == pb.VM_STATE_FAILED and "j-1" in busy.error and "1732700000" in busy.error
    idle = server.stub.GetVm(pb.GetVmRequest(vm_id="vm-idle"), timeout=TIMEOUT).vm
    assert '"jobs_completed":3' in idle.error
    failed = server.stub.ListVms(pb.ListVmsRequest(states=[pb.VM_STATE_FAILED]), timeout=TIMEOUT)
    assert {vm.vm_id for vm in failed.vms} == {"vm-busy", "vm-idle", "vm-fail", "vm-ready"}


def test_a_second_service_on_the_same_state_dir_has_no_manager(
    server: VmServer, tmp_path: Path
) -> None:
    config = vms_config.load(vms_env(tmp_path))
    running, manager = bootstrap.build_with_manager(config)
    try:
        info = manager.info()
        assert not info.available and "in use by another VM service" in info.reason
    finally:
        running.stop(0)


# ---- no manager ------------------------------------------------------------------------------


VM_MESSAGE = "VM manager is not available (SKIP_VM_MANAGER may be set)"


@pytest.mark.parametrize("env", [{"VMS_MANAGER": "none"}, {"SKIP_VM_MANAGER": "1"}])
def test_without_a_manager_every_vm_call_is_unavailable(
    tmp_path: Path, env: dict[str, str]
) -> None:
    config = vms_config.load({**vms_env(tmp_path), **env})
    running, _manager = bootstrap.build_with_manager(config)
    running.server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.VmServiceStub(channel)
            calls = [
                lambda: stub.CreateVm(pb.CreateVmRequest(), timeout=TIMEOUT),
                lambda: stub.GetVm(pb.GetVmRequest(), timeout=TIMEOUT),
                lambda: stub.ListVms(pb.ListVmsRequest(), timeout=TIMEOUT),
                lambda: stub.StopVm(pb.StopVmRequest(vm_id="x"), timeout=TIMEOUT),
                lambda: stub.DestroyVm(pb.DestroyVmRequest(vm_id="x"), timeout=TIMEOUT),
                lambda: stub.ReleaseVm(pb.ReleaseVmRequest(vm_id="x"), timeout=TIMEOUT),
                lambda: list(stub.ExecInVm(pb.ExecInVmRequest(), timeout=TIMEOUT)),
            ]
            for call in calls:
                failure = failure_of(call)
                assert (failure.code, failure.reason, failure.message) == (  # type: ignore[attr-defined]
                    grpc.StatusCode.UNAVAILABLE,
                    "VM_MANAGER_UNAVAILABLE",
                    VM_MESSAGE,
                )
            info = stub.GetManagerInfo(pb.GetManagerInfoRequest(), timeout=TIMEOUT)
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="blixard.vms.v1.VmService"), timeout=TIMEOUT
            )
    finally:
        running.stop(0)
    assert info.available is False and info.backend == "none"
    assert next(iter(env)) in info.reason
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
