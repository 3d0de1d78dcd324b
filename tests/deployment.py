"""A running Blixard deployment for tests: the one given by addresses in the environment
(TARGET_JOBS_ADDRESS, TARGET_QUEUE_ADDRESS, TARGET_VMS_ADDRESS, and TARGET_CLIENT_TOKEN
when it checks tokens), or the
services started here as real processes on free ports with SQLite in a temp directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.client import open_channel
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
# A deployment of the user's may hold jobs of theirs and of earlier test runs: every job a
# test submits carries this run's label (and request ids start with it), and a test lists
# only the jobs of its run.
RUN_ID = f"t{uuid.uuid4().hex[:12]}"
RUN_LABEL = ("test-run", RUN_ID)


def wait_healthy(
    address: str, timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the process for {address} exited with {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{address} did not become healthy within {timeout}s")


def start_service(module: str, env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", module],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@dataclass
class Deployment:
    jobs: str
    queue: str
    vms: str
    workdir: Path | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    client_token: str | None = None

    @classmethod
    def from_environment(cls) -> Deployment | None:
        jobs = os.environ.get("TARGET_JOBS_ADDRESS")
        if not jobs:
            return None
        return cls(
            jobs=jobs,
            queue=os.environ.get("TARGET_QUEUE_ADDRESS", ""),
            vms=os.environ.get("TARGET_VMS_ADDRESS", ""),
            client_token=os.environ.get("TARGET_CLIENT_TOKEN") or None,
        )

    def channel(self, address: str) -> grpc.Channel:
        """A channel to one of the services, with the client token when there is one."""
        if self.client_token:
            return open_channel(address, self.client_token)
        return grpc.insecure_channel(address)

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        ports: tuple[int, int, int] | None = None,
        workers: int = 1,
        extra_env: Mapping[str, str] | None = None,
    ) -> Deployment:
        jobs_port, queue_port, vms_port = ports or (free_port(), free_port(), free_port())
        env = {
            "JOBS_GRPC_PORT": str(jobs_port),
            "QUEUE_GRPC_PORT": str(queue_port),
            "VMS_GRPC_PORT": str(vms_port),
            "JOBS_DATABASE_URL": f"sqlite:///{workdir}/jobs.sqlite3",
            "QUEUE_DATABASE_URL": f"sqlite:///{workdir}/queue.sqlite3",
            # No microVMs unless a test asks for them (extra_env): they cost a core each.
            "VMS_MANAGER": "none",
            "VMS_DATABASE_URL": f"sqlite:///{workdir}/vms.sqlite3",
            "VMS_STATE_DIR": f"{workdir}/vms",
            "JOBS_QUEUE_ADDRESS": f"127.0.0.1:{queue_port}",
            "QUEUE_JOBS_ADDRESS": f"127.0.0.1:{jobs_port}",
            "WORKER_QUEUE_ADDRESS": f"127.0.0.1:{queue_port}",
            "WORKER_JOBS_ADDRESS": f"127.0.0.1:{jobs_port}",
            "QUEUE_REAP_INTERVAL": "0.2",
            "WORKER_LEASE_SECONDS": "3",
            "WORKER_POLL_WAIT": "2",
            **(extra_env or {}),
        }
        deployment = cls(
            jobs=f"127.0.0.1:{jobs_port}",
            queue=f"127.0.0.1:{queue_port}",
            vms=f"127.0.0.1:{vms_port}",
            workdir=workdir,
            env=env,
        )
        try:
            for name, module, address in (
                ("jobs", "services.jobs", deployment.jobs),
                ("queue", "services.queue", deployment.queue),
                ("vms", "services.vms", deployment.vms),
            ):
                process = start_service(module, env, workdir / f"{name}.log")
                deployment.processes[name] = process
                wait_healthy(address, process=process)
            for i in range(workers):
                deployment.start_worker(f"worker-{i}")
        except BaseException:
            deployment.stop()
            raise
        return deployment

    def start_worker(self, worker_id: str, **extra: str) -> subprocess.Popen[bytes]:
        assert self.workdir is not None
        env = {**self.env, "WORKER_ID": worker_id, **extra}
        process = start_service("services.worker", env, self.workdir / f"{worker_id}.log")
        self.processes[worker_id] = process
        return process

    def log(self, name: str) -> str:
        assert self.workdir is not None
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def stop(self) -> dict[str, int]:
        codes = {}
        for name in reversed(list(self.processes)):
            codes[name] = stop_process(self.processes[name])
        return codes
