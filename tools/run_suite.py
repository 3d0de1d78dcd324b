"""`make run`: the whole suite on this machine (SQLite under ./var/), stopped by Ctrl-C.

Starts the jobs, queue and VM services and one process worker as child processes (on the
ports JOBS_GRPC_PORT, QUEUE_GRPC_PORT and VMS_GRPC_PORT choose, every address between
them following), waits until each answers its health check, prints where they listen,
and on Ctrl-C (or SIGTERM) sends SIGTERM to all of them and waits for them to exit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
SERVICES = [
    # (name, module, port setting, default port)
    ("jobs", "services.jobs", "JOBS_GRPC_PORT", 50051),
    ("queue", "services.queue", "QUEUE_GRPC_PORT", 50052),
    ("vms", "services.vms", "VMS_GRPC_PORT", 50053),
]


def port_of(setting: str, default: int) -> int:
    value = os.environ.get(setting, "").strip()
    return int(value) if value.isdigit() else default


def addresses() -> dict[str, str]:
    """Where each process finds the others: the ports chosen (JOBS_GRPC_PORT, ...), so a
    suite on other ports never calls the default ones. An address set itself is kept."""
    jobs, queue, vms = (
        f"127.0.0.1:{port_of(setting, default)}" for *_, setting, default in SERVICES
    )
    chosen = {
        "JOBS_QUEUE_ADDRESS": queue,
        "QUEUE_JOBS_ADDRESS": jobs,
        "WORKER_QUEUE_ADDRESS": queue,
        "WORKER_JOBS_ADDRESS": jobs,
        "WORKER_VMS_ADDRESS": vms,
    }
    return {name: os.environ.get(name) or value for name, value in chosen.items()}


def wait_healthy(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and process.poll() is None:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                time.sleep(0.2)
    return False


def vm_manager_available(address: str) -> bool:
    from blixard.vms.v1 import vm_service_pb2, vm_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = vm_service_pb2_grpc.VmServiceStub(channel)
        try:
            info = stub.GetManagerInfo(vm_service_pb2.GetManagerInfoRequest(), timeout=5.0)
        except grpc.RpcError:
            return False
    return bool(info.available)


def main() -> int:
    os.chdir(ROOT)
    (ROOT / "var").mkdir(exist_ok=True)
    os.environ.update(addresses())  # the children's environment
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    stopping = False

    def stop_all(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop_all)
    signal.signal(signal.SIGTERM, stop_all)

    def spawn(name: str, module: str) -> subprocess.Popen[bytes]:
        # Own process group: Ctrl-C reaches only this launcher, which stops them in order.
        process = subprocess.Popen([sys.executable, "-m", module], start_new_session=True)
        children.append((name, process))
        return process

    try:
        for name, module, setting, default in SERVICES:
            port = port_of(setting, default)
            process = spawn(name, module)
            if not wait_healthy(port, process):
                print(
                    f"run: the {name} service did not start (exit code {process.poll()}); "
                    f"see its message above",
                    file=sys.stderr,
                )
                return 1
        spawn("worker", "services.worker")
        vms = f"127.0.0.1:{port_of('VMS_GRPC_PORT', 50053)}"
        if vm_manager_available(vms):  # a vm worker beside it, for ISOLATION_LEVEL_VM jobs
            os.environ.update(WORKER_TYPE="vm")
            spawn("vm-worker", "services.worker")
        print("\nBlixard is running (SQLite under ./var/):", flush=True)
        for name, _module, setting, default in SERVICES:
            print(f"  {name:<6} 127.0.0.1:{port_of(setting, default)}")
        workers = "1 process worker" + (", 1 vm worker" if len(children) > 4 else "")
        print(f"  worker  {workers}\nPress Ctrl-C to stop.\n", flush=True)
        while not stopping:
            for name, process in children:
                if process.poll() is not None:
                    print(
                        f"run: {name} exited with {process.returncode}; stopping the rest",
                        file=sys.stderr,
                    )
                    stopping = True
            time.sleep(0.2)
        return 0
    finally:
        for _name, process in reversed(children):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name, process in reversed(children):
            try:
                process.wait(timeout=45)
            except subprocess.TimeoutExpired:
                print(f"run: {name} did not stop in time; killing it", file=sys.stderr)
                process.kill()
        print("Blixard stopped.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
