"""VM service benchmark: microVMs on this machine, measured in one run.

    .venv/bin/python -m bench.vm_bench [--cold 5] [--warm 20] [--sustain 60] [--rss-vms 2]

1. bare boot: QEMU started directly (the same image, command line and accelerator as the
   service uses), until the guest agent has run `true` and said its exit code;
2. cold: the VM service with an empty pool: CreateVm -> ExecInVm(true) -> exit code, over
   gRPC; the ratio cold / bare is the service's overhead on a boot (aim: <= 1.2);
3. warm: with a warm pool, CreateVm -> ExecInVm(true) -> exit code when a booted VM waits
   (aim: p50/p99 <= 50 ms);
4. sustained: VM jobs (create, exec `echo`, destroy) per minute from 2 clients with a warm
   pool of 2, for --sustain seconds;
5. RSS per idle VM (QEMU's resident memory).

Needs QEMU and the image (`make vm-image`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from blixard.vms.v1 import vm_service_pb2 as pb
from blixard.vms.v1 import vm_service_pb2_grpc as pb_grpc

from bench.common import Summary, machine_facts
from services.vms import bootstrap
from services.vms import config as vms_config
from services.vms.agent import Exited
from services.vms.backend import LaunchSpec, no_faults, processes_under
from services.vms.manager import PoolManager
from services.vms.qemu import QEMU, Image, QemuBackend

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "var" / "vm-image"


def bare_boot(backend: QemuBackend, work: Path) -> float:
    directory = Path(tempfile.mkdtemp(prefix="bare-", dir=work))
    started = time.monotonic()
    instance = backend.start(LaunchSpec("bare", directory, 1, 256, 60.0), no_faults)
    try:
        with instance.agent.lock:
            events = list(instance.agent.execute(["true"], {}, "/", time.monotonic() + 30))
        assert isinstance(events[-1], Exited) and events[-1].exit_code == 0
        return time.monotonic() - started
    finally:
        instance.kill()
        instance.close()


@contextmanager
def service(
    work: Path, name: str, **env: str
) -> Iterator[tuple[pb_grpc.VmServiceStub, PoolManager]]:
    config = vms_config.load(
        {
            "VMS_GRPC_PORT": "0",
            "VMS_MANAGER": "qemu",
            "VMS_IMAGE_DIR": str(IMAGE),
            "VMS_STATE_DIR": str(work / name),
            "VMS_DATABASE_URL": f"sqlite:///{work}/{name}.sqlite3",
            **env,
        }
    )
    running, manager = bootstrap.build_with_manager(config)
    assert isinstance(manager, PoolManager), manager.info().reason
    running.server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield pb_grpc.VmServiceStub(channel), manager
    finally:
        channel.close()
        running.stop(1.0)


def one_job(stub: pb_grpc.VmServiceStub, command: list[str]) -> tuple[float, str]:
    """CreateVm -> ExecInVm -> exit code (timed), then DestroyVm (not timed)."""
    started = time.monotonic()
    vm = stub.CreateVm(pb.CreateVmRequest(), timeout=120).vm
    codes = [
        e.exit_code
        for e in stub.ExecInVm(pb.ExecInVmRequest(vm_id=vm.vm_id, command=command), timeout=60)
        if e.WhichOneof("event") == "exit_code"
    ]
    elapsed = time.monotonic() - started
    stub.DestroyVm(pb.DestroyVmRequest(vm_id=vm.vm_id), timeout=30)
    assert codes == [0], codes
    return elapsed, vm.vm_id


def wait_warm(stub: pb_grpc.VmServiceStub, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stub.GetManagerInfo(pb.GetManagerInfoRequest(), timeout=5).warm_vms >= count:
            return
        time.sleep(0.05)
    raise TimeoutError("the warm pool did not fill")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", type=int, default=5, help="cold boots (and bare boots)")
    parser.add_argument("--warm", type=int, default=20, help="warm-pool dispatches")
    parser.add_argument("--sustain", type=float, default=60.0, help="seconds of sustained load")
    parser.add_argument("--rss-vms", type=int, default=2, help="idle VMs for the RSS figure")
    args = parser.parse_args()
    image = Image(IMAGE)
    if image.missing():
        print(f"vm_bench: {image.missing()}", file=sys.stderr)
        return 2
    for key, value in machine_facts():
        print(f"{key:>14}: {value}")
    with tempfile.TemporaryDirectory(prefix="vm-bench-") as scratch:
        work = Path(scratch)
        backend = QemuBackend(image, state_dir=work / "bare")
        accelerator = backend.probe()
        print(f"{'accelerator':>14}: {accelerator} (boot probe)\n")

        # 1 and 2, alternated so both see the same machine
        bare, cold = [], []
        with service(work, "cold", VMS_PRE_WARM_COUNT="0") as (stub, _manager):
            for _ in range(args.cold):
                bare.append(bare_boot(backend, work))
                cold.append(one_job(stub, ["true"])[0])
        bare_median, cold_median = statistics.median(bare), statistics.median(cold)
        print("cold CreateVm -> ExecInVm(true) -> exit, against a bare QEMU boot to the same point")
        for name, values in (("bare boot", bare), ("cold job", cold)):
            s = Summary.of(values)
            print(
                f"  {name:<10} median {s.p50:6.0f} ms   mean {s.mean:6.0f} ms   max {s.max:6.0f} ms"
            )
        print(f"  ratio cold / bare: {cold_median / bare_median:.2f}  (aim <= 1.2)\n")

        # 3: one warm VM waits before each dispatch
        warm = []
        with service(work, "warm", VMS_PRE_WARM_COUNT="1", VMS_MAX_VMS="2") as (stub, _):
            for _ in range(args.warm):
                wait_warm(stub, 1)
                warm.append(one_job(stub, ["true"])[0])
        summary = Summary.of(warm)
        print(f"warm-pool dispatch, CreateVm -> ExecInVm(true) -> exit ({args.warm} jobs)")
        print(f"  p50 {summary.p50:.1f} ms   p99 {summary.p99:.1f} ms   (aim <= 50 ms)\n")

        # 4 and 5
        with service(work, "sustained", VMS_PRE_WARM_COUNT="2", VMS_MAX_VMS="4") as (
            stub,
            manager,
        ):
            wait_warm(stub, 2)
            pids = processes_under(work / "sustained", (QEMU,))
            rss = [rss_kib(pid) for pid in pids[: args.rss_vms]]
            done = 0
            lock = threading.Lock()
            stop_at = time.monotonic() + args.sustain

            def client() -> None:
                nonlocal done
                while time.monotonic() < stop_at:
                    one_job(stub, ["echo", "hello"])
                    with lock:
                        done += 1

            started = time.monotonic()
            clients = [threading.Thread(target=client) for _ in range(2)]
            for thread in clients:
                thread.start()
            for thread in clients:
                thread.join()
            elapsed = time.monotonic() - started
            print("sustained VM jobs (create, exec echo, destroy; 2 clients, warm pool 2)")
            print(f"  {done} jobs in {elapsed:.0f} s = {done / elapsed * 60:.0f} jobs/min\n")
            print(f"RSS per idle VM ({len(rss)} VMs, 256 MiB guests, {accelerator})")
            print(f"  mean {statistics.mean(rss) / 1024:.0f} MiB   max {max(rss) / 1024:.0f} MiB")
            assert manager.permits.acquired >= done
    return 0


if __name__ == "__main__":
    sys.exit(main())
