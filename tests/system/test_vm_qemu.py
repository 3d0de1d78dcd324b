"""Real microVMs (QEMU's microvm machine, Debian's kernel, the agent as PID 1). Required in
CI; skipped here with a reason when QEMU is absent. The guest image is built by the same
`make vm-image` that `make run` uses (cached: a no-op when it is up to date).

- a job with ISOLATION_LEVEL_VM goes through the whole suite (jobs -> queue -> vm worker
  -> VM service -> microVM) and prints the guest's kernel release, not the host's;
- ExecInVm streams stdout and stderr in order, and exit codes come through;
- 50 cycles of create/exec/destroy with faults injected at random start steps and QEMU
  processes killed with SIGKILL at random moments leave no process, directory, socket or
  permit behind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from blixard.common.v1 import job_spec_pb2
from blixard.jobs.v1 import jobs_service_pb2 as jpb
from blixard.jobs.v1 import jobs_service_pb2_grpc as jpb_grpc
from blixard.vms.v1 import vm_service_pb2 as pb
from blixard.vms.v1 import vm_service_pb2_grpc as pb_grpc
from sqlalchemy import Engine

from services.common import db, migrations
from services.common.clock import SYSTEM_CLOCK
from services.vms import bootstrap
from services.vms import config as vms_config
from services.vms.backend import START_STEPS, Faults, processes_under
from services.vms.manager import PoolManager
from services.vms.store import VmStore
from tests.conftest import require
from tests.deployment import ROOT, Deployment

IMAGE_DIR = ROOT / "var" / "vm-image"
QEMU = "qemu-system-x86_64"
TERMINAL = {jpb.JOB_STATE_SUCCEEDED, jpb.JOB_STATE_FAILED, jpb.JOB_STATE_CANCELLED}


@pytest.fixture(scope="module")
def image() -> Path:
    have_qemu = shutil.which(QEMU) is not None
    if have_qemu:
        subprocess.run(["make", "vm-image"], cwd=ROOT, check=True, timeout=600)
    require(have_qemu, f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    require(
        all((IMAGE_DIR / name).exists() for name in ("vmlinux", "initrd.cpio", "blixard-agent")),
        "the guest image is not built (make vm-image)",
    )
    return IMAGE_DIR


def guest_release(image: Path) -> str:
    return str(json.loads((image / "manifest.json").read_text())["kernel_release"])


@pytest.fixture(scope="module")
def suite(image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    workdir = tmp_path_factory.mktemp("vm-suite")
    deployment = Deployment.start(
        workdir,
        workers=0,
        extra_env={
            "VMS_MANAGER": "qemu",
            "VMS_IMAGE_DIR": str(image),
            "VMS_STATE_DIR": str(workdir / "vms"),
            "VMS_DATABASE_URL": f"sqlite:///{workdir}/vms.sqlite3",
            "VMS_PRE_WARM_COUNT": "1",
            "VMS_MAX_VMS": "3",
        },
    )
    try:
        deployment.start_worker(
            "vm-worker",
            WORKER_TYPE="vm",
            WORKER_VMS_ADDRESS=deployment.vms,
            WORKER_JOBS_ADDRESS=deployment.jobs,
            WORKER_LEASE_SECONDS="30",
        )
        yield deployment
    finally:
        deployment.stop()
    assert processes_under(workdir / "vms", None) == [], "VMs outlived the service"


def submit_vm_job(stub: jpb_grpc.JobServiceStub, command: list[str]) -> jpb.Job:
    spec = job_spec_pb2.JobSpec(
        command=command,
        max_attempts=1,
        requirements=job_spec_pb2.JobRequirements(
            worker_types=["vm"], isolation=job_spec_pb2.ISOLATION_LEVEL_VM
        ),
    )
    request = jpb.SubmitJobRequest(request_id=str(uuid.uuid4()), spec=spec)
    return stub.SubmitJob(request, timeout=10).job


def wait_for_end(stub: jpb_grpc.JobServiceStub, job_id: str, timeout: float = 180) -> jpb.Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = stub.GetJob(jpb.GetJobRequest(job_id=job_id), timeout=5).job
        if job.state in TERMINAL:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end within {timeout}s: {job}")


def test_a_vm_job_runs_in_a_microvm_through_the_whole_suite(suite: Deployment, image: Path) -> None:
    with grpc.insecure_channel(suite.jobs) as channel:
        stub = jpb_grpc.JobServiceStub(channel)
        job = submit_vm_job(stub, ["uname", "-r"])
        done = wait_for_end(stub, job.job_id)
        failing = wait_for_end(stub, submit_vm_job(stub, ["sh", "-c", "echo no; exit 5"]).job_id)

    assert jpb.JobState.Name(done.state) == "JOB_STATE_SUCCEEDED", (done, suite.log("vm-worker"))
    assert done.exit_code == 0
    release = done.output_tail.strip()
    assert release == guest_release(image)
    assert release != os.uname().release  # the guest's kernel, not the host's
    assert failing.state == jpb.JOB_STATE_FAILED and failing.exit_code == 5
    assert "no" in failing.output_tail


def test_exec_in_a_microvm_streams_in_order_and_returns_exit_codes(suite: Deployment) -> None:
    with grpc.insecure_channel(suite.vms) as channel:
        stub = pb_grpc.VmServiceStub(channel)
        info = stub.GetManagerInfo(pb.GetManagerInfoRequest(), timeout=10)
        assert (info.available, info.backend) == (True, "qemu")
        assert info.accelerator in ("kvm", "tcg")
        vm = stub.CreateVm(pb.CreateVmRequest(), timeout=120).vm
        assert vm.state == pb.VM_STATE_READY and vm.accelerator == info.accelerator
        try:
            script = "for i in 1 2 3; do echo out$i; sleep 0.2; echo err$i >&2; sleep 0.2; done"
            events = list(
                stub.ExecInVm(
                    pb.ExecInVmRequest(vm_id=vm.vm_id, command=["sh", "-c", script + "; exit 3"]),
                    timeout=60,
                )
            )
            codes = {}
            for command, expected in ((["true"], 0), (["sh", "-c", "kill -9 $$"], 137)):
                reply = stub.ExecInVm(
                    pb.ExecInVmRequest(vm_id=vm.vm_id, command=command), timeout=60
                )
                codes[expected] = [
                    e.exit_code for e in reply if e.WhichOneof("event") == "exit_code"
                ]
        finally:
            stub.DestroyVm(pb.DestroyVmRequest(vm_id=vm.vm_id), timeout=30)

    chunks = [(e.output.stream, e.output.data.strip()) for e in events[:-1]]
    out, err = job_spec_pb2.OUTPUT_STREAM_STDOUT, job_spec_pb2.OUTPUT_STREAM_STDERR
    expected = [(stream, f"{name}{i}".encode()) for i in (1, 2, 3) for stream, name in
                ((out, "out"), (err, "err"))]  # fmt: skip
    assert chunks == expected
    assert events[-1].exit_code == 3
    assert codes == {0: [0], 137: [137]}


# ---- faults and kill -9 --------------------------------------------------------------------


def socket_fds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


def make_manager(tmp: Path, image: Path, faults: Faults) -> tuple[PoolManager, Engine]:
    config = vms_config.load(
        {
            "VMS_MANAGER": "qemu",
            "VMS_ACCEL": "auto",
            "VMS_IMAGE_DIR": str(image),
            "VMS_STATE_DIR": str(tmp / "state"),
            "VMS_MAX_VMS": "2",
            "VMS_PRE_WARM_COUNT": "0",
            "VMS_BOOT_TIMEOUT": "30",
            "VMS_PING_INTERVAL": "1",
        }
    )
    engine = db.make_engine(f"sqlite:///{tmp}/vms.sqlite3", setting="VMS_DATABASE_URL")
    migrations.upgrade(engine, bootstrap.MIGRATIONS, "vms_alembic_version", "VMS_DATABASE_URL")
    manager = bootstrap.build_manager(config, VmStore(engine), clock=SYSTEM_CLOCK, faults=faults)
    assert isinstance(manager, PoolManager), manager.info()
    return manager, engine


def test_fifty_cycles_of_faults_and_kill_9_leak_nothing(image: Path, tmp_path: Path) -> None:
    faults = Faults()
    manager, engine = make_manager(tmp_path, image, faults)
    state_dir = tmp_path / "state"
    sockets_before = socket_fds()
    rng = random.Random(6)
    outcomes: dict[str, int] = {}
    kills: list[int] = []
    done = threading.Event()
    lock = threading.Lock()

    def cycle(n: int) -> None:
        if rng.random() < 0.3:
            faults.arm(rng.choice(START_STEPS))
        try:
            vm = manager.create(0, 0)
        except Exception as exc:
            key = f"create: {type(exc).__name__}"
            with lock:
                outcomes[key] = outcomes.get(key, 0) + 1
            return
        try:
            events = list(manager.exec(vm.vm_id, ["sh", "-c", f"echo cycle {n}"], {}, "", 20.0))
            outcome = "ran" if events and getattr(events[-1], "exit_code", None) == 0 else "odd"
        except Exception as exc:
            outcome = f"exec: {type(exc).__name__}"
        finally:
            manager.destroy(vm.vm_id)
        with lock:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    def killer() -> None:
        while not done.wait(rng.uniform(1.5, 5.0)):
            victims = processes_under(state_dir, (QEMU,))
            if victims:
                victim = rng.choice(victims)
                try:
                    os.kill(victim, signal.SIGKILL)
                    kills.append(victim)
                except ProcessLookupError:
                    pass

    def runner(first: int) -> None:
        for n in range(first, 50, 2):
            cycle(n)

    started = time.monotonic()
    threads = [threading.Thread(target=killer, daemon=True)]
    threads += [threading.Thread(target=runner, args=(i,), daemon=True) for i in (0, 1)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads[1:]:
            thread.join(timeout=250)
            assert not thread.is_alive(), "the cycles did not finish in time"
    finally:
        done.set()
        threads[0].join()
    elapsed = time.monotonic() - started

    # Every VM has ended by now (each cycle destroyed its own); count what is left.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (
        manager.permits.held or processes_under(state_dir, None)
    ):
        time.sleep(0.1)
    leftover = {
        "processes": processes_under(state_dir, None),
        "directories": [p.name for p in state_dir.iterdir() if p.is_dir()],
        "sockets": [str(p) for p in state_dir.rglob("*.sock")],
        "permits held": manager.permits.held,
        "permits not returned": manager.permits.acquired - manager.permits.released,
        "permits returned twice": manager.permits.double_releases,
        "directories that could not be removed": manager.leftover_directories,
    }
    manager.close()
    engine.dispose()
    print(f"50 cycles in {elapsed:.0f}s; {len(kills)} QEMU killed; outcomes {outcomes}")
    assert leftover == {
        "processes": [],
        "directories": [],
        "sockets": [],
        "permits held": 0,
        "permits not returned": 0,
        "permits returned twice": 0,
        "directories that could not be removed": [],
    }
    assert socket_fds() <= sockets_before
    assert sum(outcomes.values()) == 50
    assert outcomes.get("ran", 0) > 0 and kills and faults.hits
