"""Real servers in-process on 127.0.0.1, real SQLite files under tmp_path, no mocks.

``Stack`` starts a queue and a jobs service that talk to each other (the jobs port is chosen
first with ``free_port`` because the queue must know it when it is built; the queue binds
port 0), optionally a VM service and an in-process worker. Every test talks to them through
``services.common.client.open_channel`` (traced, token when given) with a deadline on every
call, except where retries of UNAVAILABLE would blur what is asserted (the VM service).

Tracing: one SDK tracer provider for the whole session, installed by
``telemetry.setup_tracing`` before any server is built, with an in-memory exporter.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from blixard.common.v1 import job_spec_pb2
from blixard.jobs.v1 import jobs_service_pb2 as jpb
from blixard.jobs.v1 import jobs_service_pb2_grpc as jpb_grpc
from blixard.queue.v1 import queue_service_pb2_grpc as qpb_grpc
from blixard.vms.v1 import vm_service_pb2_grpc as vpb_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common import client, telemetry
from services.common.server import Running
from services.jobs import bootstrap as jobs_bootstrap
from services.jobs import config as jobs_config
from services.queue import bootstrap as queue_bootstrap
from services.queue import config as queue_config
from services.vms import bootstrap as vms_bootstrap
from services.vms import config as vms_config
from services.worker import bootstrap as worker_bootstrap
from services.worker import config as worker_config
from services.worker.runner import Worker
from tests.conftest import free_port
from tests.postgres import Cluster

RPC_TIMEOUT = 5.0
STOP_GRACE = 0.5

CLIENT_TOKEN = "client-secret-token"
WORKER_TOKEN = "worker-secret-token"
ADMIN_TOKEN = "admin-secret-token"
TOKENS = {
    "BLIXARD_CLIENT_TOKEN": CLIENT_TOKEN,
    "BLIXARD_WORKER_TOKEN": WORKER_TOKEN,
    "BLIXARD_ADMIN_TOKEN": ADMIN_TOKEN,
}

T = TypeVar("T")


# ---- tracing ---------------------------------------------------------------------------


_EXPORTER = InMemorySpanExporter()
_TRACING_LOCK = threading.Lock()
_TRACING_READY = False


def install_tracing() -> InMemorySpanExporter:
    """Once per session, before any server builds its interceptors."""
    global _TRACING_READY
    with _TRACING_LOCK:
        if not _TRACING_READY:
            telemetry.setup_tracing("tests", processors=[SimpleSpanProcessor(_EXPORTER)])
            _TRACING_READY = True
    return _EXPORTER


@pytest.fixture(scope="session", autouse=True)
def span_exporter() -> InMemorySpanExporter:
    return install_tracing()


def spans_in_trace(exporter: InMemorySpanExporter, trace_id_hex: str) -> list[ReadableSpan]:
    wanted = int(trace_id_hex, 16)
    return [
        s
        for s in exporter.get_finished_spans()
        if s.context is not None and s.context.trace_id == wanted
    ]


# ---- polling ---------------------------------------------------------------------------


def eventually(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    """Call ``probe`` until it returns something truthy, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")


# ---- servers ---------------------------------------------------------------------------


def start(running: Running) -> Running:
    running.server.start()
    return running


def queue_env(tmp: Path, jobs_port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {
        "QUEUE_GRPC_HOST": "127.0.0.1",
        "QUEUE_GRPC_PORT": "0",
        "QUEUE_DATABASE_URL": f"sqlite:///{tmp}/queue.sqlite3",
        "QUEUE_JOBS_ADDRESS": f"127.0.0.1:{jobs_port}",
        "QUEUE_REAP_INTERVAL": "0.5",
        "QUEUE_RETRY_BASE_SECONDS": "0.2",
        "QUEUE_RETRY_CAP_SECONDS": "1",
        **(extra or {}),
    }


def jobs_env(
    tmp: Path, port: int, queue_port: int, extra: dict[str, str] | None = None
) -> dict[str, str]:
    return {
        "JOBS_GRPC_HOST": "127.0.0.1",
        "JOBS_GRPC_PORT": str(port),
        "JOBS_DATABASE_URL": f"sqlite:///{tmp}/jobs.sqlite3",
        "JOBS_QUEUE_ADDRESS": f"127.0.0.1:{queue_port}",
        **(extra or {}),
    }


def vms_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # No VM manager unless a test asks for one: with QEMU installed, `auto` would boot VMs.
    return {
        "VMS_GRPC_HOST": "127.0.0.1",
        "VMS_GRPC_PORT": "0",
        "VMS_MANAGER": "none",
        **(extra or {}),
    }


@dataclass
class Stack:
    """A queue and a jobs service wired to each other; optionally a VM service and a worker."""

    tmp: Path
    shared: dict[str, str] = field(default_factory=dict)
    # Settings that win over the defaults below (a PostgreSQL URL per service, say).
    overrides: dict[str, str] = field(default_factory=dict)
    queue: Running | None = None
    jobs: Running | None = None
    vms: Running | None = None
    worker: Worker | None = None
    worker_thread: threading.Thread | None = None
    channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def jobs_target(self) -> str:
        assert self.jobs is not None
        return f"127.0.0.1:{self.jobs.port}"

    @property
    def queue_target(self) -> str:
        assert self.queue is not None
        return f"127.0.0.1:{self.queue.port}"

    @property
    def vms_target(self) -> str:
        assert self.vms is not None
        return f"127.0.0.1:{self.vms.port}"

    def start_pair(
        self, queue_extra: dict[str, str] | None = None, jobs_extra: dict[str, str] | None = None
    ) -> Stack:
        """``*_extra``: settings over the defaults (a PostgreSQL ``*_DATABASE_URL``)."""
        jobs_port = free_port()
        queue = queue_config.load(
            {**self.shared, **queue_env(self.tmp, jobs_port, queue_extra), **self.overrides}
        )
        self.queue = start(queue_bootstrap.build(queue))
        jobs = jobs_config.load(
            {
                **self.shared,
                **jobs_env(self.tmp, jobs_port, self.queue.port, jobs_extra),
                **self.overrides,
            }
        )
        self.jobs = start(jobs_bootstrap.build(jobs))
        return self

    def start_jobs(self) -> Stack:
        """The jobs service alone: its queue address is a port nobody listens on."""
        jobs = jobs_config.load({**self.shared, **jobs_env(self.tmp, free_port(), free_port())})
        self.jobs = start(jobs_bootstrap.build(jobs))
        return self

    def start_vms(self, extra: dict[str, str] | None = None) -> Stack:
        settings = {**self.shared, **vms_env(extra), **self.overrides}
        self.vms = start(vms_bootstrap.build(vms_config.load(settings)))
        return self

    def start_worker(self, worker_id: str = "grpc-test-worker") -> Stack:
        config = worker_config.load(
            {
                **self.shared,
                "WORKER_ID": worker_id,
                "WORKER_TYPE": "process",
                "WORKER_SLOTS": "2",
                "WORKER_QUEUE_ADDRESS": self.queue_target,
                "WORKER_LEASE_SECONDS": "6",
                "WORKER_POLL_WAIT": "1",
                "WORKER_DRAIN_GRACE": "2",
                "WORKER_KILL_GRACE": "1",
                "WORKER_DEFAULT_TIMEOUT": "30",
            }
        )
        channel = self.channel(self.queue_target, self.shared.get("BLIXARD_WORKER_TOKEN"))
        self.worker = worker_bootstrap.build(config, channel)
        self.worker_thread = threading.Thread(
            target=self.worker.run, name="grpc-test-worker", daemon=True
        )
        self.worker_thread.start()
        return self

    def channel(self, target: str, token: str | None = None) -> grpc.Channel:
        channel = client.open_channel(target, token)
        self.channels.append(channel)
        return channel

    def jobs_stub(self, token: str | None = None) -> jpb_grpc.JobServiceStub:
        return jpb_grpc.JobServiceStub(self.channel(self.jobs_target, token))

    def queue_stub(self, token: str | None = None) -> qpb_grpc.QueueServiceStub:
        return qpb_grpc.QueueServiceStub(self.channel(self.queue_target, token))

    def vms_stub(self) -> vpb_grpc.VmServiceStub:
        # A plain channel: the suite's channels retry UNAVAILABLE, which the VM tests assert.
        channel = grpc.insecure_channel(self.vms_target)
        self.channels.append(channel)
        return vpb_grpc.VmServiceStub(channel)

    def stop(self) -> None:
        if self.worker is not None and self.worker_thread is not None:
            self.worker.stop()
            self.worker_thread.join(timeout=15)
            assert not self.worker_thread.is_alive(), "the worker did not stop"
        for running in (self.queue, self.jobs, self.vms):
            if running is not None:
                running.stop(STOP_GRACE)
        for channel in self.channels:
            channel.close()


@pytest.fixture
def make_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Stack]]:
    """Function-scoped stacks, stopped at the end of the test."""
    stacks: list[Stack] = []

    def make(
        shared: dict[str, str] | None = None, overrides: dict[str, str] | None = None
    ) -> Stack:
        stack = Stack(tmp_path_factory.mktemp("stack"), dict(shared or {}), dict(overrides or {}))
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """jobs + queue + VM service, no tokens; shared by a module's tests."""
    running = Stack(tmp_path_factory.mktemp("stack"))
    try:
        running.start_pair().start_vms()
        yield running
    finally:
        running.stop()


def postgres_overrides(cluster: Cluster) -> dict[str, str]:
    """A fresh PostgreSQL database for each service of a stack."""
    return {
        "JOBS_DATABASE_URL": cluster.new_database(),
        "QUEUE_DATABASE_URL": cluster.new_database(),
        "VMS_DATABASE_URL": cluster.new_database(),
    }


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> dict[str, str]:
    """The settings that put a stack on SQLite (the default: none) or on PostgreSQL."""
    if request.param == "sqlite":
        return {}
    return postgres_overrides(request.getfixturevalue("postgres_cluster"))


# ---- helpers for tests -----------------------------------------------------------------


def spec(*command: str, **kw: Any) -> job_spec_pb2.JobSpec:
    return job_spec_pb2.JobSpec(command=list(command), **kw)


def wait_for_state(
    jobs: jpb_grpc.JobServiceStub, job_id: str, states: set[int], timeout: float = 20.0
) -> jpb.Job:
    def probe() -> jpb.Job | None:
        job = jobs.GetJob(jpb.GetJobRequest(job_id=job_id), timeout=RPC_TIMEOUT).job
        return job if job.state in states else None

    return eventually(probe, timeout, f"job {job_id} to reach {sorted(states)}")
