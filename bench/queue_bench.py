"""Queue service benchmark.

1. A raw gRPC echo (a generic unary handler on a bare ``grpc.server`` in its own process, the
   same thread pool and options as the services, no interceptors) and the health Check of the
   queue server (the full interceptor stack), called by the same client set-up: the baselines.
   And the ceiling: the claim runs of 2. against the queue's own servicer and interceptors
   over a manager that does no work (canned leases, nothing stored, cached or reported),
   in a process of its own: the most any queue behind this gRPC edge reaches here.
2. Per backend (SQLite, PostgreSQL): Enqueue throughput with 1 and 8 clients; Claim+Complete
   throughput (items/s) with 1, 4 and 16 workers and max_items 1 (Claim, Complete) and 32
   (Claim, BatchComplete of every lease); Claim latency with the long poll (idle queue, workers
   waiting in Claim(wait=5s), one Enqueue every 20 ms). Each enqueue and claim rate is also
   given as a ratio of the echo's calls/s at the same concurrency, from a short echo run made
   right before it (the machine is shared: runs made minutes apart would compare the drift).
3. RSS of the queue service with 10^6 waiting items (SQLite), its start-up (cache load) time,
   and both for an empty queue.
4. An idle fleet (SQLite): 100 workers in long polls (each its own channel, a thread of
   this process), the server's CPU while they only wait, and Enqueue throughput of one
   client while they wait: workers of another type (no item is theirs) and of the items'
   type (each takes an item as it comes and completes it); against no fleet.
5. The claim index on its own (in this process, no store): the time of one claim (stage and
   roll back) with 10^5 other claimable items in the index: items the worker may take
   behind its pick, items requiring labels it lacks ahead of it, and those spread over 10
   and 1,000 label sets; each as a ratio of a claim from an index holding only its pick.

The queue service runs as a real process (``python -m services.queue``). Its status reports
(every claim and completion makes one) go to a report sink: a stand-in jobs service in a
process of its own that accepts each report at once (BatchUpdateJobStatus), so the relay's
reads, calls and deletes are paid as in a deployment, while the jobs service's own work is
not (its CPU is not in the server CPU either). ``--no-reports`` points the queue at an
unused port instead (reports stay in the outbox; the relay only retries). The items the
claim runs consume are inserted straight into the ``items`` table before the service starts
(it loads its cache from the store at start-up); when a run may need more than are left, the
service is stopped, more are inserted, and it is started again (untimed).

Clients are threads of this process, each with its own channel and connection (a worker
process of its own, as it were); ``--client-procs N`` spreads them over N processes instead.
The table gives the CPU the server and the clients used (100% = one core).

    python -m bench.queue_bench            # 5 s windows, 1/4/16 workers, 10^6 items for RSS
    python -m bench.queue_bench --quick    # 1.5 s windows, 1/16 workers, 10^5 items for RSS

It prints; it does not assert (the aims are reported as met or missed, exit status 0).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Protocol

import grpc
from blixard.common.v1 import job_spec_pb2
from blixard.jobs.v1 import jobs_service_pb2 as jpb
from blixard.queue.v1 import queue_service_pb2 as pb
from blixard.queue.v1 import queue_service_pb2_grpc as pb_grpc
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import Engine, func, insert, select, text

from bench.common import Phases, Summary, cpu_seconds, machine_facts, ratio, say, table
from bench.jobs_bench import Backends
from services.common import db, migrations
from services.common.config import DEFAULT_GRPC_THREADS, Tokens
from services.common.server import SERVER_OPTIONS, WaitSlots, create_server
from services.queue.bootstrap import MIGRATIONS
from services.queue.cache import Entry, ItemCache
from services.queue.domain import Item, ItemState
from services.queue.manager import Completion, Lease
from services.queue.models import OutboxRow
from services.queue.servicer import MAX_ITEMS, POLICY, SERVICE_NAME, QueueServicer
from services.queue.store import ITEMS, _columns
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
CALL_TIMEOUT = 30.0
LEASE_SECONDS = 60
WORKER_TYPE = "process"
SPEC = job_spec_pb2.JobSpec(command=["true"])
SPEC_BYTES = SPEC.SerializeToString(deterministic=True)
ECHO_METHOD = "/bench.Echo/Echo"
JOBS_SERVICE = jpb.DESCRIPTOR.services_by_name["JobService"].full_name
ECHO_PAYLOAD = b"x" * 64
INSERT_BATCH = 10_000
# Client channels get their own connection each, as separate worker processes would.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
# A first guess of the items/s a run may reach, until a run with the same max_items says.
FIRST_GUESS = {1: 2_000.0, 32: 10_000.0}
AIM_BATCHED = 10_000.0
AIM_SINGLE_RATIO = 0.40
NO_WORK = "no work"  # the backend column of the ceiling runs (serve_no_work)


# -- processes -------------------------------------------------------------------------------


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0])
    return out


def wait_serving(port: int, alive: Callable[[], bool], timeout: float) -> None:
    """Until the server at ``port`` answers health SERVING."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if not alive():
                raise RuntimeError("the server process exited before serving")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not serve within {timeout:g} s")
            time.sleep(0.05)


class QueueService:
    """``python -m services.queue`` on a database URL, as a child process."""

    def __init__(self, url: str, log_path: Path, jobs_address: str = "") -> None:
        self.url = url
        self.log_path = log_path
        self.jobs_address = jobs_address  # "" = an unused port: reports are not delivered
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 900.0) -> float:
        """Start and wait for SERVING; the seconds that took (imports, migrations, cache)."""
        self.port = free_port()
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("QUEUE_", "BLIXARD_", "JOBS_", "VMS_", "WORKER_"))
        }
        env.update(
            QUEUE_GRPC_PORT=str(self.port),
            QUEUE_DATABASE_URL=self.url,
            QUEUE_JOBS_ADDRESS=self.jobs_address or f"127.0.0.1:{free_port()}",
            QUEUE_SHUTDOWN_GRACE="1",
            BLIXARD_LOG_LEVEL="warning",
        )
        start = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.queue"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_serving(self.port, lambda: self.process.poll() is None, timeout)  # type: ignore[union-attr]
        except RuntimeError as exc:
            self.stop()
            tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"queue service: {exc}\n" + "\n".join(tail)) from None
        return time.monotonic() - start

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def serve_echo(port: int) -> None:
    """A bare gRPC server answering every ECHO_METHOD call with its request bytes."""
    from concurrent import futures

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="grpc"),
        options=SERVER_OPTIONS,
    )
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler})]
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


@contextmanager
def echo_server() -> Iterator[tuple[int, int]]:
    """The echo server in a child process: (port, pid)."""
    port = free_port()
    process = get_context("spawn").Process(target=serve_echo, args=(port,), daemon=True)
    process.start()
    try:
        deadline = time.monotonic() + 30
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            echo = channel.unary_unary(ECHO_METHOD)
            while True:
                try:
                    echo(ECHO_PAYLOAD, timeout=1)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline or not process.is_alive():
                        raise RuntimeError("the echo server did not start") from None
                    time.sleep(0.05)
        assert process.pid is not None
        yield port, process.pid
    finally:
        process.terminate()
        process.join(10)


class NoWork:
    """Stands in for the QueueManager behind the queue's real servicer and interceptors: a
    claim gets ``max_items`` canned leases at once and every completion succeeds; nothing is
    stored, cached or reported. What the claim runs reach against it (the 'no work' rows) is
    the most any queue behind this gRPC edge could reach on this machine."""

    worker_timeout = 30.0

    def __init__(self) -> None:
        now = datetime.now(UTC)
        self.items = [
            Item(
                job_id=f"no-work-{i:04d}",
                generation=1,
                spec=SPEC_BYTES,
                state=ItemState.LEASED,
                priority=0,
                run_at=now,
                seq=i,
                max_attempts=3,
                created_at=now,
                updated_at=now,
                attempt=1,
                lease_token=f"token-{i:04d}",
                lease_deadline=now + timedelta(seconds=LEASE_SECONDS),
                lease_seconds=LEASE_SECONDS,
                worker_id="bench-worker",
            )
            for i in range(MAX_ITEMS)
        ]

    def claim(
        self,
        worker_id: str,
        worker_type: str,
        labels: dict[str, str],
        max_items: int,
        lease_seconds: float,
        wait_seconds: float = 0.0,
        named_only: bool = False,
        caller_waiting: Callable[[], bool] = lambda: True,
    ) -> list[Lease]:
        return [
            Lease(item, item.lease_token or "", item.lease_deadline or item.run_at)
            for item in self.items[:max_items]
        ]

    def complete(
        self, token: str, outcome: object, exit_code: int | None, output_tail: bytes, error: str
    ) -> Item:
        return self.items[0]

    def complete_many(self, completions: list[Completion]) -> list[Item]:
        return self.items[: len(completions)]


def serve_no_work(port: int) -> None:
    """The queue's servicer and interceptors (as ``python -m services.queue`` builds them)
    over NoWork, on ``port``."""
    servicer = QueueServicer(NoWork(), WaitSlots(DEFAULT_GRPC_THREADS))  # type: ignore[arg-type]
    running = create_server(
        f"127.0.0.1:{port}",
        register=lambda s: pb_grpc.add_QueueServiceServicer_to_server(servicer, s),
        service_names=[SERVICE_NAME],
        tokens=Tokens(),
        policy=POLICY,
        max_workers=DEFAULT_GRPC_THREADS,
    )
    running.server.start()
    running.server.wait_for_termination()


@dataclass(frozen=True)
class Endpoint:
    port: int
    pid: int


@contextmanager
def no_work_server() -> Iterator[Endpoint]:
    """serve_no_work in a child process, once it serves."""
    port = free_port()
    process = get_context("spawn").Process(target=serve_no_work, args=(port,), daemon=True)
    process.start()
    try:
        wait_serving(port, process.is_alive, 60)
        assert process.pid is not None
        yield Endpoint(port, process.pid)
    finally:
        process.terminate()
        process.join(10)


def serve_sink(port: int, received: Any) -> None:
    """A stand-in jobs service: every status report (batch or single) accepted at once."""
    from concurrent import futures

    def batch(
        request: jpb.BatchUpdateJobStatusRequest, context: grpc.ServicerContext
    ) -> jpb.BatchUpdateJobStatusResponse:
        with received.get_lock():
            received.value += len(request.requests)
        applied = jpb.BatchUpdateJobStatusResult(response=jpb.UpdateJobStatusResponse(applied=True))
        return jpb.BatchUpdateJobStatusResponse(results=[applied] * len(request.requests))

    def single(
        request: jpb.UpdateJobStatusRequest, context: grpc.ServicerContext
    ) -> jpb.UpdateJobStatusResponse:
        with received.get_lock():
            received.value += 1
        return jpb.UpdateJobStatusResponse(applied=True)

    handlers = {
        "BatchUpdateJobStatus": grpc.unary_unary_rpc_method_handler(
            batch,
            request_deserializer=jpb.BatchUpdateJobStatusRequest.FromString,
            response_serializer=jpb.BatchUpdateJobStatusResponse.SerializeToString,
        ),
        "UpdateJobStatus": grpc.unary_unary_rpc_method_handler(
            single,
            request_deserializer=jpb.UpdateJobStatusRequest.FromString,
            response_serializer=jpb.UpdateJobStatusResponse.SerializeToString,
        ),
    }
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="sink"),
        options=SERVER_OPTIONS,
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(JOBS_SERVICE, handlers)])
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


@dataclass
class Sink:
    address: str
    received: Any  # a multiprocessing Value: reports received so far


@contextmanager
def report_sink() -> Iterator[Sink]:
    """The report sink in a child process."""
    context = get_context("spawn")
    port = free_port()
    received = context.Value("q", 0)
    process = context.Process(target=serve_sink, args=(port, received), daemon=True)
    process.start()
    try:
        deadline = time.monotonic() + 30
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            while True:
                try:
                    grpc.channel_ready_future(channel).result(timeout=1)
                    break
                except grpc.FutureTimeoutError:
                    if time.monotonic() > deadline or not process.is_alive():
                        raise RuntimeError("the report sink did not start") from None
        yield Sink(f"127.0.0.1:{port}", received)
    finally:
        process.terminate()
        process.join(10)


# -- the load --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """``threads`` clients calling as fast as they can until ``end_at``; only what completes
    in [start_at, end_at] (time.monotonic, the same clock in every process) is counted."""

    kind: str  # echo | health | enqueue | claim
    port: int
    threads: int
    start_at: float
    end_at: float
    max_items: int = 1
    first: int = 0  # the first thread's number (worker ids, job ids) across processes
    tag: str = ""  # job id prefix of enqueues


@dataclass
class LoadResult:
    ops: int = 0  # calls (echo, health, enqueue) or items completed (claim)
    calls: int = 0  # round trips in the window (claim: Claim + Complete each)
    first: list[float] = field(default_factory=list)  # call latency; claim: the Claim
    second: list[float] = field(default_factory=list)  # claim: the Complete/BatchComplete
    errors: Counter[str] = field(default_factory=Counter)
    empty: int = 0  # claims that found nothing
    short: int = 0  # claims that found fewer than max_items
    cpu: float = 0.0  # CPU seconds the client process(es) used in the window

    def add(self, other: LoadResult) -> None:
        self.ops += other.ops
        self.calls += other.calls
        self.first += other.first
        self.second += other.second
        self.errors.update(other.errors)
        self.empty += other.empty
        self.short += other.short
        self.cpu += other.cpu


def run_load(load: Load) -> LoadResult:
    """Run ``load`` in this process's threads; returns what they counted."""
    results = [LoadResult() for _ in range(load.threads)]
    target = f"127.0.0.1:{load.port}"

    def thread(n: int) -> None:
        result = results[n]
        number = load.first + n
        channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        try:
            grpc.channel_ready_future(channel).result(timeout=10)
            body = BODIES[load.kind]
            body(channel, load, number, result)
        finally:
            channel.close()

    threads = [threading.Thread(target=thread, args=(n,), daemon=True) for n in range(load.threads)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, load.start_at - time.monotonic()))
    cpu_start = time.process_time()
    time.sleep(max(0.0, load.end_at - time.monotonic()))
    cpu = time.process_time() - cpu_start
    for t in threads:
        t.join(CALL_TIMEOUT + 10)
    total = LoadResult(cpu=cpu)
    for r in results:
        total.add(r)
    return total


def _failed(result: LoadResult, exc: grpc.RpcError) -> None:
    result.errors[exc.code().name] += 1  # type: ignore[attr-defined]
    time.sleep(0.01)


def _simple_calls(call: Callable[[], object], load: Load, result: LoadResult) -> None:
    while (t0 := time.monotonic()) < load.end_at:
        try:
            call()
        except grpc.RpcError as exc:
            _failed(result, exc)
            continue
        t1 = time.monotonic()
        if load.start_at <= t1 <= load.end_at:
            result.ops += 1
            result.calls += 1
            result.first.append(t1 - t0)


def echo_body(channel: grpc.Channel, load: Load, number: int, result: LoadResult) -> None:
    echo = channel.unary_unary(ECHO_METHOD)
    _simple_calls(lambda: echo(ECHO_PAYLOAD, timeout=CALL_TIMEOUT), load, result)


def health_body(channel: grpc.Channel, load: Load, number: int, result: LoadResult) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest()
    _simple_calls(lambda: stub.Check(request, timeout=CALL_TIMEOUT), load, result)


def enqueue_body(channel: grpc.Channel, load: Load, number: int, result: LoadResult) -> None:
    stub = pb_grpc.QueueServiceStub(channel)
    count = 0

    def enqueue() -> object:
        nonlocal count
        count += 1
        request = pb.EnqueueRequest(
            job_id=f"{load.tag}-{number}-{count:08d}", generation=1, spec=SPEC
        )
        return stub.Enqueue(request, timeout=CALL_TIMEOUT)

    _simple_calls(enqueue, load, result)


def claim_body(channel: grpc.Channel, load: Load, number: int, result: LoadResult) -> None:
    """Claim(max_items) then Complete (one lease) or BatchComplete (all of them), in a loop."""
    stub = pb_grpc.QueueServiceStub(channel)
    claim = pb.ClaimRequest(
        worker_id=f"bench-worker-{number}",
        worker_type=WORKER_TYPE,
        max_items=load.max_items,
        lease_duration=duration_pb2.Duration(seconds=LEASE_SECONDS),
    )
    while (t0 := time.monotonic()) < load.end_at:
        try:
            leases = stub.Claim(claim, timeout=CALL_TIMEOUT).leases
        except grpc.RpcError as exc:
            _failed(result, exc)
            continue
        t1 = time.monotonic()
        counted = load.start_at <= t1 <= load.end_at
        if counted and len(leases) < load.max_items:
            result.short += 1
            result.empty += not leases
        if not leases:
            continue
        done = [
            pb.CompleteRequest(
                lease_token=lease.lease_token, outcome=job_spec_pb2.OUTCOME_SUCCEEDED, exit_code=0
            )
            for lease in leases
        ]
        try:
            if load.max_items == 1:
                stub.Complete(done[0], timeout=CALL_TIMEOUT)
                completed = 1
            else:
                response = stub.BatchComplete(
                    pb.BatchCompleteRequest(requests=done), timeout=CALL_TIMEOUT
                )
                completed = sum(r.WhichOneof("result") == "item" for r in response.results)
                if completed < len(done):
                    result.errors["BATCH_ITEM_REFUSED"] += len(done) - completed
        except grpc.RpcError as exc:
            _failed(result, exc)
            continue
        t2 = time.monotonic()
        if load.start_at <= t2 <= load.end_at:
            result.ops += completed
            result.calls += 2
            result.first.append(t1 - t0)
            result.second.append(t2 - t1)


BODIES: dict[str, Callable[[grpc.Channel, Load, int, LoadResult], None]] = {
    "echo": echo_body,
    "health": health_body,
    "enqueue": enqueue_body,
    "claim": claim_body,
}


def _warm(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


class Clients:
    """Runs loads in this process's threads, or spread over ``procs`` child processes, and
    samples the server's CPU over the same window."""

    def __init__(self, procs: int) -> None:
        self.procs = procs
        self.pool: ProcessPoolExecutor | None = None
        if procs > 1:
            self.pool = ProcessPoolExecutor(procs, mp_context=get_context("spawn"))
            # Start (and import in) every child now, not in the first timed run.
            pids = {f.result() for f in [self.pool.submit(_warm, 1.0) for _ in range(procs)]}
            if len(pids) != procs:
                say(f"   NOTE: only {len(pids)} of {procs} client processes started")

    @property
    def where(self) -> str:
        if self.pool is None:
            return "threads of the bench process"
        return f"threads spread over {self.procs} client processes"

    def run(
        self,
        kind: str,
        port: int,
        threads: int,
        server_pid: int,
        window: float,
        warmup: float,
        **extra: object,
    ) -> tuple[LoadResult, float]:
        """The load's result and the server's CPU seconds in its window."""
        start_at = time.monotonic() + (1.0 if self.pool else 0.5) + warmup
        end_at = start_at + window
        procs = self.procs if self.pool else 1
        loads = []
        first = 0
        for i in range(procs):
            n = threads // procs + (i < threads % procs)
            if n:
                loads.append(Load(kind, port, n, start_at, end_at, first=first, **extra))  # type: ignore[arg-type]
                first += n
        server: dict[str, float] = {}

        def sample() -> None:
            time.sleep(max(0.0, start_at - time.monotonic()))
            begin = cpu_seconds(server_pid)
            time.sleep(max(0.0, end_at - time.monotonic()))
            server["cpu"] = cpu_seconds(server_pid) - begin

        sampler = threading.Thread(target=sample)
        sampler.start()
        if self.pool is not None:
            results = [f.result() for f in [self.pool.submit(run_load, ld) for ld in loads]]
        else:
            results = [run_load(loads[0])]
        sampler.join()
        total = LoadResult()
        for r in results:
            total.add(r)
        return total, server["cpu"]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


# -- seeding ---------------------------------------------------------------------------------


def migrate(url: str) -> Engine:
    """A bench-side engine on ``url``, the queue's schema migrated."""
    engine = db.make_engine(url, setting="bench")
    migrations.upgrade(engine, MIGRATIONS, "queue_alembic_version", "bench")
    return engine


def insert_items(engine: Engine, start: int, count: int) -> float:
    """``count`` WAITING items (numbers ``start``.., FIFO in that order, any worker type)
    written straight into the table with the store's own column mapping; seconds taken."""
    base = datetime.now(UTC) - timedelta(hours=1)
    template = _columns(
        Item(
            job_id="",
            generation=1,
            spec=SPEC_BYTES,
            state=ItemState.WAITING,
            priority=0,
            run_at=base,
            seq=0,
            max_attempts=3,
            created_at=base,
            updated_at=base,
        )
    )
    began = time.monotonic()
    with engine.connect() as connection:
        for first in range(start, start + count, INSERT_BATCH):
            last = min(start + count, first + INSERT_BATCH)
            rows = [{**template, "job_id": f"pre-{i:09d}", "seq": i} for i in range(first, last)]
            with connection.begin():
                connection.execute(insert(ITEMS), rows)
        if engine.dialect.name == "postgresql":
            with connection.begin():
                connection.execute(text("ANALYZE items"))
    return time.monotonic() - began


def waiting_items(engine: Engine) -> int:
    query = select(func.count()).select_from(ITEMS).where(ITEMS.c.state == "WAITING")
    with engine.connect() as connection:
        return int(connection.scalar(query) or 0)


def outbox_stats(engine: Engine) -> tuple[int, int]:
    """Rows in the outbox, and the delivery attempts the relay made on them."""
    query = select(func.count(), func.coalesce(func.sum(OutboxRow.attempts), 0))
    with engine.connect() as connection:
        rows, attempts = connection.execute(query).one()
    return int(rows), int(attempts)


# -- runs ------------------------------------------------------------------------------------


@dataclass
class Rate:
    """One throughput run, and the echo run made right before it at the same concurrency."""

    what: str  # echo, health, enqueue, claim
    backend: str
    workers: int
    max_items: int
    result: LoadResult
    seconds: float
    server_cpu: float
    echo: Rate | None = None

    @property
    def per_second(self) -> float:
        return self.result.ops / self.seconds

    @property
    def calls_per_second(self) -> float:
        return self.result.calls / self.seconds

    @property
    def echo_rate(self) -> float:
        return self.echo.per_second if self.echo else float("nan")

    @property
    def echo_ratio(self) -> float:
        return ratio(self.per_second, self.echo_rate)

    @property
    def server_pct(self) -> float:
        return 100 * self.server_cpu / self.seconds

    @property
    def client_pct(self) -> float:
        return 100 * self.result.cpu / self.seconds

    def note(self) -> str:
        notes = []
        if self.result.errors:
            notes.append("errors " + ", ".join(f"{k}={v}" for k, v in self.result.errors.items()))
        if self.result.empty:
            notes.append(f"RAN DRY ({self.result.empty} empty claims)")
        elif self.what == "claim" and self.result.short:
            notes.append(f"{self.result.short} short claims")
        return "; ".join(notes)


@dataclass(frozen=True)
class Plan:
    window: float
    warmup: float
    echo_window: float  # of the echo run right before each enqueue and claim run
    echo_warmup: float


class Runner:
    """Runs loads, each enqueue and claim run right after an echo run at the same concurrency
    (this machine is shared: a ratio of two runs made far apart would measure the drift)."""

    def __init__(self, clients: Clients, plan: Plan, echo_at: tuple[int, int]) -> None:
        self.clients = clients
        self.plan = plan
        self.echo_at = echo_at

    def measure(
        self,
        what: str,
        backend: str,
        port: int,
        pid: int,
        workers: int,
        max_items: int = 1,
        tag: str = "",
        *,
        window: float | None = None,
        warmup: float | None = None,
    ) -> Rate:
        window = window or self.plan.window
        warmup = self.plan.warmup if warmup is None else warmup
        result, server_cpu = self.clients.run(
            what, port, workers, pid, window, warmup, max_items=max_items, tag=tag
        )
        rate = Rate(what, backend, workers, max_items, result, window, server_cpu)
        first, second = Summary.of(result.first), Summary.of(result.second)
        unit = "items/s" if what == "claim" else "calls/s"
        shape = f" max_items {max_items:>2}" if what == "claim" else ""
        extra = f", complete p50 {second.p50:.2f} ms" if result.second else ""
        note = f"  [{rate.note()}]" if rate.note() else ""
        say(
            f"   {what:<7} {backend:<10} workers {workers:>2}{shape}: {rate.per_second:>9,.0f} "
            f"{unit} (p50 {first.p50:.2f} ms{extra}; server CPU {rate.server_pct:.0f}%, "
            f"client CPU {rate.client_pct:.0f}%){note}"
        )
        return rate

    def echo(self, workers: int, *, adjacent: bool = True) -> Rate:
        port, pid = self.echo_at
        if not adjacent:
            return self.measure("echo", "-", port, pid, workers)
        return self.measure(
            "echo",
            "-",
            port,
            pid,
            workers,
            window=self.plan.echo_window,
            warmup=self.plan.echo_warmup,
        )

    def paired(
        self,
        what: str,
        backend: str,
        service: Served,
        workers: int,
        max_items: int = 1,
        tag: str = "",
    ) -> Rate:
        echo = self.echo(workers)
        rate = self.measure(what, backend, service.port, service.pid, workers, max_items, tag)
        rate.echo = echo
        return rate


class Served(Protocol):
    """A server the runs call: a queue service, or the no-work edge."""

    @property
    def port(self) -> int: ...

    @property
    def pid(self) -> int: ...


class ClaimQueue:
    """A queue service on one database, kept stocked with waiting items for the next run."""

    def __init__(self, backend: str, url: str, log_path: Path, jobs_address: str) -> None:
        self.backend = backend
        self.engine = migrate(url)
        self.service = QueueService(url, log_path, jobs_address)
        self.inserted = 0

    def stock(self, need: int) -> None:
        """At least ``need`` waiting items, and the service running (restarted when items
        were inserted: it loads them into its cache at start-up)."""
        waiting = waiting_items(self.engine)
        if waiting >= need and self.service.process is not None:
            return
        self.service.stop()
        add = max(0, need - waiting)
        took = insert_items(self.engine, self.inserted, add) if add else 0.0
        self.inserted += add
        startup = self.service.start()
        say(
            f"   {self.backend}: {waiting + add:,} waiting items ({add:,} inserted in "
            f"{took:.1f} s); service start-up {startup:.1f} s"
        )

    def close(self) -> tuple[int, int]:
        self.service.stop()
        stats = outbox_stats(self.engine)
        self.engine.dispose()
        return stats


@dataclass
class Latency:
    backend: str
    workers: int
    returned: Summary  # from the Enqueue's answer to the Claim's
    sent: Summary  # from the Enqueue being sent to the Claim's answer
    negative: int
    missing: int
    errors: dict[str, int]


def claim_latency(
    backend: str, port: int, workers: int, items: int, interval: float, wait: float
) -> Latency:
    """Workers wait in Claim(wait); a producer enqueues one item every ``interval``. The
    latency of an item: from its Enqueue returning (and being sent) to a Claim returning it."""
    stop = threading.Event()
    got: dict[str, float] = {}
    errors: Counter[str] = Counter()
    target = f"127.0.0.1:{port}"

    def worker(n: int) -> None:
        with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.QueueServiceStub(channel)
            request = pb.ClaimRequest(
                worker_id=f"latency-worker-{n}",
                worker_type=WORKER_TYPE,
                max_items=1,
                lease_duration=duration_pb2.Duration(seconds=LEASE_SECONDS),
                wait=duration_pb2.Duration(seconds=int(wait)),
            )
            while not stop.is_set():
                try:
                    leases = stub.Claim(request, timeout=wait + 10).leases
                except grpc.RpcError as exc:
                    if not stop.is_set():
                        errors[f"Claim {exc.code().name}"] += 1  # type: ignore[attr-defined]
                    time.sleep(0.05)
                    continue
                now = time.monotonic()
                for lease in leases:
                    got[lease.item.job_id] = now
                for lease in leases:
                    done = pb.CompleteRequest(
                        lease_token=lease.lease_token, outcome=job_spec_pb2.OUTCOME_SUCCEEDED
                    )
                    try:
                        stub.Complete(done, timeout=CALL_TIMEOUT)
                    except grpc.RpcError as exc:
                        errors[f"Complete {exc.code().name}"] += 1  # type: ignore[attr-defined]

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(workers)]
    for t in threads:
        t.start()
    time.sleep(1.5)  # every worker is in its long poll
    sent: dict[str, tuple[float, float]] = {}
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.QueueServiceStub(channel)
        began = time.monotonic()
        for i in range(items):
            job_id = f"latency-{i:06d}"
            request = pb.EnqueueRequest(job_id=job_id, generation=1, spec=SPEC)
            t0 = time.monotonic()
            stub.Enqueue(request, timeout=CALL_TIMEOUT)
            sent[job_id] = (t0, time.monotonic())
            time.sleep(max(0.0, began + (i + 1) * interval - time.monotonic()))
    deadline = time.monotonic() + wait + 5
    while len(got) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()  # the workers end when their Claim returns (the service stops next)
    after_return = [got[j] - t1 for j, (_, t1) in sent.items() if j in got]
    after_send = [got[j] - t0 for j, (t0, _) in sent.items() if j in got]
    return Latency(
        backend,
        workers,
        Summary.of(after_return),
        Summary.of(after_send),
        sum(x < 0 for x in after_return),
        len(sent) - len(after_return),
        dict(errors),
    )


@dataclass
class Memory:
    label: str
    items: int
    insert_seconds: float
    startup: float
    rss_kib: int
    hwm_kib: int
    db_bytes: int


def memory_run(label: str, path: Path, items: int, log_path: Path) -> Memory:
    """A SQLite queue of ``items`` waiting items (inserted directly), then the service started
    on it: its start-up time (cache load) and its memory once serving."""
    url = f"sqlite:///{path}"
    engine = migrate(url)
    took = insert_items(engine, 0, items) if items else 0.0
    engine.dispose()
    service = QueueService(url, log_path)
    try:
        startup = service.start()
        time.sleep(1.0)  # let start-up settle
        mem = memory_kib(service.pid)
    finally:
        service.stop()
    size = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    result = Memory(label, items, took, startup, mem["VmRSS"], mem["VmHWM"], size)
    say(
        f"   {label}: {items:,} items (inserted in {took:.1f} s), start-up {startup:.1f} s, "
        f"RSS {mem['VmRSS'] / 1024:,.0f} MiB (peak {mem['VmHWM'] / 1024:,.0f} MiB)"
    )
    return result


# -- report ----------------------------------------------------------------------------------


@dataclass
class IndexRun:
    case: str
    others: int  # claimable items in the index besides the pick
    label_sets: int  # distinct label sets among them
    per_claim: Summary


INDEX_CASES = (
    ("only the pick", 0, 0, False),
    ("items it may take, behind the pick", 100_000, 0, False),
    ("items requiring a label it lacks, ahead", 100_000, 1, True),
    ("the same over 10 label sets", 100_000, 10, True),
    ("the same over 1,000 label sets", 100_000, 1_000, True),
)


def index_run(case: str, others: int, label_sets: int, ahead: bool, claims: int) -> IndexRun:
    """One claim's time (stage, then roll back) by a worker with no labels."""
    cache = ItemCache()

    def entry(job_id: str, priority: int, seq: int, labels: tuple[tuple[str, str], ...]) -> Entry:
        return Entry(job_id, 1, ItemState.WAITING, priority, seq, 0.0, (), labels)

    sets = [(("zone", f"z{n}"),) for n in range(label_sets)] or [()]
    cache.load_entries(
        [
            entry(f"other-{n:07d}", 1 if ahead else 0, n + 1, sets[n % len(sets)])
            for n in range(others)
        ]
        + [entry("pick", 0, 0, ())],
        time.time(),
    )
    seconds = []
    for _ in range(claims):
        t0 = time.perf_counter()
        staged = cache.stage_claim(WORKER_TYPE, {}, 1, time.time())
        seconds.append(time.perf_counter() - t0)
        if [e.job_id for e in staged] != ["pick"]:
            raise RuntimeError(f"claim index ({case}): took {staged} instead of the pick")
        cache.rollback(staged[0])
    return IndexRun(case, others, label_sets, Summary.of(seconds))


FLEET = 100


@dataclass
class FleetRun:
    case: str
    polls: int
    idle_cpu: float  # the server's CPU share while the fleet only waits
    enqueues: float  # per second, one client
    cpu_per_enqueue: float  # server CPU seconds per enqueue (the fleet's claims included)
    taken: int  # items the fleet claimed and completed in the window


def fleet_run(
    case: str, service: QueueService, polls: int, fleet_type: str, seconds: float
) -> FleetRun:
    """Enqueue items for "process" workers while ``polls`` workers of ``fleet_type`` wait."""
    target = f"127.0.0.1:{service.port}"
    stop = threading.Event()
    taken = [0] * polls

    def worker(n: int) -> None:
        with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.QueueServiceStub(channel)
            request = pb.ClaimRequest(
                worker_id=f"idle-{n}",
                worker_type=fleet_type,
                lease_duration=duration_pb2.Duration(seconds=LEASE_SECONDS),
                wait=duration_pb2.Duration(seconds=10),
            )
            while not stop.is_set():
                try:
                    for lease in stub.Claim(request, timeout=CALL_TIMEOUT).leases:
                        complete = pb.CompleteRequest(
                            lease_token=lease.lease_token, outcome=job_spec_pb2.OUTCOME_SUCCEEDED
                        )
                        stub.Complete(complete, timeout=CALL_TIMEOUT)
                        taken[n] += 1
                except grpc.RpcError:
                    stop.wait(0.1)

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(polls)]
    for t in threads:
        t.start()
    try:
        time.sleep(2.0 if polls else 0.2)  # every worker registered and waiting
        cpu, start = cpu_seconds(service.pid), time.monotonic()
        time.sleep(2.0)
        idle_cpu = (cpu_seconds(service.pid) - cpu) / (time.monotonic() - start)
        spec = job_spec_pb2.JobSpec(
            command=["true"], requirements=job_spec_pb2.JobRequirements(worker_types=[WORKER_TYPE])
        )
        before = sum(taken)
        count, cpu, start = 0, cpu_seconds(service.pid), time.monotonic()
        with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.QueueServiceStub(channel)
            while time.monotonic() - start < seconds:
                request = pb.EnqueueRequest(job_id=f"fleet-{count:08d}", generation=1, spec=spec)
                stub.Enqueue(request, timeout=CALL_TIMEOUT)
                count += 1
        elapsed = time.monotonic() - start
        used = cpu_seconds(service.pid) - cpu
        return FleetRun(
            case, polls, idle_cpu, count / elapsed, used / max(count, 1), sum(taken) - before
        )
    finally:
        stop.set()
        service.stop()  # ends the long polls
        for t in threads:
            t.join(CALL_TIMEOUT)


def fleet_table(runs: list[FleetRun]) -> str:
    base = runs[0].enqueues if runs else math.nan
    rows = [
        [
            r.case,
            r.polls,
            f"{r.idle_cpu:.0%}",
            r.enqueues,
            ratio(r.enqueues, base),
            r.cpu_per_enqueue * 1000,
            r.taken,
        ]
        for r in runs
    ]
    return table(
        ["idle fleet", "polls", "server CPU idle", "enqueues/s", "x none", "ms CPU/enq", "taken"],
        rows,
        "Enqueue (1 client) while idle workers wait in long polls (SQLite)",
    )


def index_table(runs: list[IndexRun]) -> str:
    base = runs[0].per_claim.p50
    rows = [
        [
            r.case,
            r.others,
            r.label_sets,
            r.per_claim.p50 * 1000,
            r.per_claim.p99 * 1000,
            ratio(r.per_claim.p50, base),
        ]
        for r in runs
    ]
    return table(
        ["index holds, besides the pick", "items", "label sets", "p50 us", "p99 us", "x only"],
        rows,
        "Claim index: one claim (stage + rollback) by a worker with no labels",
    )


def log_summary(paths: list[Path]) -> str:
    """Warnings and errors the service processes logged (they log at WARNING and above)."""
    counts: Counter[str] = Counter()
    first: list[str] = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            for level in ("WARNING", "ERROR", "CRITICAL", "Traceback"):
                if level in line:
                    counts[level] += 1
                    if len(first) < 3:
                        first.append("   " + line[:200])
                    break
    if not counts:
        return "service logs: no warnings or errors"
    listed = ", ".join(f"{n} {level}" for level, n in sorted(counts.items()))
    return "service logs: " + listed + "; the first:\n" + "\n".join(first)


def baseline_table(baseline: dict[int, Rate], health: dict[int, Rate], runs: list[Rate]) -> str:
    rows = []
    for n, e in sorted(baseline.items()):
        adjacent = [r.echo_rate for r in runs if r.workers == n and r.echo]
        s = Summary.of(e.result.first)
        h = health.get(n)
        rows.append(
            [
                n,
                e.per_second,
                s.p50,
                s.p99,
                e.server_pct,
                e.client_pct,
                min(adjacent) if adjacent else math.nan,
                max(adjacent) if adjacent else math.nan,
                h.per_second if h else math.nan,
                ratio(h.per_second, e.per_second) if h else math.nan,
            ]
        )
    headers = [
        "concurrency",
        "echo calls/s",
        "p50 ms",
        "p99 ms",
        "server CPU %",
        "client CPU %",
        "adjacent min",
        "adjacent max",
        "health calls/s",
        "health / echo",
    ]
    title = (
        "Baselines: raw gRPC echo (a bare server in its own process) and the queue server's "
        "health Check (all its interceptors); 'adjacent' = the short echo runs made right "
        "before each enqueue and claim run below"
    )
    return table(headers, rows, title)


def enqueue_table(runs: list[Rate]) -> str:
    rows = []
    for r in runs:
        s = Summary.of(r.result.first)
        rows.append(
            [
                r.backend,
                r.workers,
                r.per_second,
                r.echo_rate,
                r.echo_ratio,
                s.p50,
                s.p99,
                r.server_pct,
                r.client_pct,
                r.note(),
            ]
        )
    headers = [
        "backend",
        "clients",
        "enqueues/s",
        "echo calls/s",
        "/ echo",
        "p50 ms",
        "p99 ms",
        "server CPU %",
        "client CPU %",
        "note",
    ]
    return table(headers, rows, "Enqueue throughput (one item per call)")


def claim_table(runs: list[Rate]) -> str:
    rows = []
    for r in runs:
        c, d = Summary.of(r.result.first), Summary.of(r.result.second)
        rows.append(
            [
                r.backend,
                r.workers,
                r.max_items,
                r.per_second,
                r.calls_per_second,
                r.echo_rate,
                r.echo_ratio,
                c.p50,
                c.p99,
                d.p50,
                d.p99,
                r.server_pct,
                r.client_pct,
                r.note(),
            ]
        )
    headers = [
        "backend",
        "workers",
        "max_items",
        "items/s",
        "RPCs/s",
        "echo calls/s",
        "items / echo",
        "claim p50",
        "claim p99",
        "compl. p50",
        "compl. p99",
        "server CPU %",
        "client CPU %",
        "note",
    ]
    title = (
        "Claim + Complete (max_items 1) or Claim + BatchComplete (max_items 32) throughput; "
        "latencies in ms; 'items / echo' = items/s / echo calls/s at the same concurrency"
    )
    return table(headers, rows, title)


def latency_table(runs: list[Latency], interval: float, wait: float) -> str:
    rows = [
        [
            x.backend,
            x.workers,
            x.returned.count,
            x.returned.p50,
            x.returned.p99,
            x.returned.max,
            x.sent.p50,
            x.sent.p99,
            x.negative,
            x.missing,
            ", ".join(f"{k}={v}" for k, v in x.errors.items()),
        ]
        for x in runs
    ]
    headers = [
        "backend",
        "workers",
        "items",
        "p50 ms",
        "p99 ms",
        "max ms",
        "p50 (sent)",
        "p99 (sent)",
        "negative",
        "missing",
        "errors",
    ]
    title = (
        f"Claim latency with the long poll (Claim wait {wait:g} s on an idle queue, one Enqueue "
        f"every {interval * 1000:g} ms): from the Enqueue's answer to the Claim's answer "
        "holding the item ('sent': from the Enqueue being sent). Negative = the Claim answered "
        "first"
    )
    return table(headers, rows, title)


def memory_table(runs: list[Memory]) -> str:
    rows = [
        [
            m.label,
            m.items,
            m.startup,
            m.rss_kib / 1024,
            m.hwm_kib / 1024,
            m.db_bytes / 2**20,
            m.insert_seconds,
        ]
        for m in runs
    ]
    headers = [
        "queue",
        "waiting items",
        "start-up s",
        "VmRSS MiB",
        "VmHWM MiB",
        "db MiB",
        "insert s",
    ]
    title = "Queue service memory once serving (SQLite; it loads its cache at start-up)"
    return table(headers, rows, title)


def aims_table(claims: list[Rate]) -> str:
    aims = []
    ceilings = {(r.workers, r.max_items): r for r in claims if r.backend == NO_WORK}
    batched = [r for r in claims if r.backend == "sqlite" and r.max_items == 32]
    if batched:
        top = max(batched, key=lambda r: r.per_second)
        edges = [r for r in ceilings.values() if r.max_items == 32]
        best_edge = max(edges, key=lambda r: r.per_second) if edges else None
        aims.append(
            [
                f"batched claim+complete on SQLite >= {AIM_BATCHED:,.0f} items/s",
                f"best {top.per_second:,.0f} items/s ({top.workers} workers)",
                "MET" if top.per_second >= AIM_BATCHED else "MISSED",
                f"best {best_edge.per_second:,.0f} items/s ({best_edge.workers} workers)"
                if best_edge
                else "-",
            ]
        )
    for r in claims:
        if r.backend == "sqlite" and r.max_items == 1:
            one = ceilings.get((r.workers, 1))
            aims.append(
                [
                    f"single-item on SQLite >= {AIM_SINGLE_RATIO:.0%} of echo, {r.workers} workers",
                    f"{r.echo_ratio:.1%} ({r.per_second:,.0f} items/s; echo "
                    f"{r.echo_rate:,.0f} calls/s)",
                    "MET" if r.echo_ratio >= AIM_SINGLE_RATIO else "MISSED",
                    f"{one.echo_ratio:.1%} ({one.per_second:,.0f} items/s)" if one else "-",
                ]
            )
    title = (
        "Aims; 'with no queue work' = the same runs against the queue's servicer and "
        "interceptors over a manager that does no work (the most this gRPC edge allows here)"
    )
    return table(["aim", "measured", "verdict", "with no queue work"], aims, title)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.queue_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="fewer runs, 1.5 s windows, 10^5 RSS")
    parser.add_argument("--backends", default="sqlite,postgresql", help="comma-separated")
    parser.add_argument("--seconds", type=float, help="the counted window of each run")
    parser.add_argument("--samples", type=int, help="items of the long-poll latency run")
    parser.add_argument("--rss-items", type=int, help="waiting items for the RSS run")
    parser.add_argument(
        "--client-procs",
        type=int,
        default=1,
        help="spread the client threads over this many processes (default: threads here)",
    )
    parser.add_argument(
        "--no-reports",
        action="store_true",
        help="deliver no status reports (the queue's jobs address is an unused port)",
    )
    args = parser.parse_args(argv)

    window = args.seconds or (1.5 if args.quick else 5.0)
    warmup = 0.5 if args.quick else 1.0
    plan = Plan(window, warmup, min(window, 1.0 if args.quick else 2.0), 0.5)
    worker_counts = (1, 16) if args.quick else (1, 4, 16)
    batch_sizes = (1, 32)
    enqueue_clients = (1, 8)
    latency_items = args.samples or (100 if args.quick else 300)
    latency_workers = 4
    interval, wait = 0.02, 5.0
    rss_items = args.rss_items or (100_000 if args.quick else 1_000_000)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in ("sqlite", "postgresql"):
            parser.error(f"--backends: unknown backend {b!r} (sqlite, postgresql)")

    say("Blixard queue service benchmark" + (" (--quick)" if args.quick else ""))
    say(table(["fact", "value"], machine_facts()))
    say(
        f"runs: {warmup:g} s warm-up, then a {window:g} s counted window (adjacent echo runs: "
        f"{plan.echo_window:g} s); workers {', '.join(map(str, worker_counts))} x max_items "
        f"{', '.join(map(str, batch_sizes))}; lease {LEASE_SECONDS} s; enqueue with "
        f"{' and '.join(map(str, enqueue_clients))} client(s); long-poll latency over "
        f"{latency_items} items; RSS with {rss_items:,} items"
    )
    if args.no_reports:
        say(
            "NOTE (--no-reports): the queue service's jobs address is an unused port: status "
            "reports are NOT delivered (they stay in the outbox; the relay retries)."
        )
    else:
        say(
            "status reports go to a report sink (a stand-in jobs service in its own process "
            "that accepts each at once); its CPU is not in the server CPU"
        )

    phases = Phases()
    total = time.monotonic()
    pool = Backends(phases)
    logs: list[Path] = []
    clients = Clients(args.client_procs)
    say(f"clients: {clients.where}; one channel (and connection) per worker")
    baseline: dict[int, Rate] = {}
    health: dict[int, Rate] = {}
    enqueues: list[Rate] = []
    claims: list[Rate] = []
    latencies: list[Latency] = []
    relay: dict[str, tuple[int, int]] = {}
    delivered: int | None = None
    memory: list[Memory] = []
    index: list[IndexRun] = []
    fleet: list[FleetRun] = []
    sink_cm = nullcontext(None) if args.no_reports else report_sink()
    try:
        with echo_server() as echo_at, sink_cm as sink:
            jobs_address = sink.address if sink else ""
            runner = Runner(clients, plan, echo_at)
            with phases.phase("baseline: raw gRPC echo"):
                for n in sorted({*worker_counts, *enqueue_clients}):
                    baseline[n] = runner.echo(n, adjacent=False)
            with phases.phase("baseline: health Check of an idle queue service"):
                logs.append(pool.tmp / "queue-idle.log")
                idle = QueueService(f"sqlite:///{pool.tmp / 'idle.sqlite3'}", logs[-1])
                idle.start()
                try:
                    for n in (min(worker_counts), max(worker_counts)):
                        health[n] = runner.measure("health", "sqlite", idle.port, idle.pid, n)
                finally:
                    idle.stop()

            with (
                phases.phase("ceiling: the queue's gRPC edge over no work"),
                no_work_server() as edge,
            ):
                for workers in worker_counts:
                    for k in batch_sizes:
                        claims.append(runner.paired("claim", NO_WORK, edge, workers, k))

            for backend in backends:
                if not pool.available(backend):
                    continue
                logs.append(pool.tmp / f"queue-{backend}.log")
                queue = ClaimQueue(backend, pool.new_url(backend), logs[-1], jobs_address)
                span = warmup + window + 1.5  # the longest a run's clients claim
                try:
                    with phases.phase(f"{backend}: stock the queue, start the service"):
                        queue.stock(int(sum(FIRST_GUESS[k] for k in batch_sizes) * span))
                    with phases.phase(f"{backend}: enqueue"):
                        for n in enqueue_clients:
                            enqueues.append(
                                runner.paired("enqueue", backend, queue.service, n, tag=f"e{n}")
                            )
                    best: dict[int, float] = {}
                    for workers in worker_counts:
                        for k in batch_sizes:
                            guess = max(FIRST_GUESS[k], 2 * best.get(k, 0.0))
                            name = f"{backend}: claim, {workers} workers, max_items {k}"
                            with phases.phase(name):
                                queue.stock(int(guess * span) + k * workers)
                                rate = runner.paired("claim", backend, queue.service, workers, k)
                            claims.append(rate)
                            best[k] = max(best.get(k, 0.0), rate.per_second)
                finally:
                    relay[backend] = queue.close()

                with phases.phase(f"{backend}: long-poll claim latency"):
                    logs.append(pool.tmp / f"queue-{backend}-latency.log")
                    service = QueueService(pool.new_url(backend), logs[-1], jobs_address)
                    service.start()
                    try:
                        x = claim_latency(
                            backend, service.port, latency_workers, latency_items, interval, wait
                        )
                    finally:
                        service.stop()
                    latencies.append(x)
                    say(
                        f"   {backend}: p50 {x.returned.p50:.2f} ms, p99 {x.returned.p99:.2f} ms "
                        f"after the Enqueue returned ({x.sent.p50:.2f} / {x.sent.p99:.2f} ms "
                        f"after it was sent); {x.missing} missing"
                    )
            with phases.phase("idle fleet (SQLite)"):
                for case, polls, fleet_type in (
                    ("none", 0, WORKER_TYPE),
                    ("another type", FLEET, "vm"),
                    ("the items' type", FLEET, WORKER_TYPE),
                ):
                    logs.append(pool.tmp / f"queue-fleet-{len(fleet)}.log")
                    database = pool.tmp / f"fleet-{len(fleet)}.sqlite3"
                    service = QueueService(f"sqlite:///{database}", logs[-1], jobs_address)
                    service.start()
                    fleet.append(fleet_run(case, service, polls, fleet_type, window))
            if sink is not None:
                delivered = int(sink.received.value)

        with phases.phase("RSS: an empty queue and a full one (SQLite)"):
            for label, n in (("empty queue", 0), ("full queue", rss_items)):
                logs.append(pool.tmp / f"queue-rss-{n}.log")
                memory.append(memory_run(label, pool.tmp / f"rss-{n}.sqlite3", n, logs[-1]))
        with phases.phase("claim index (in-process)"):
            for case, others, label_sets, ahead in INDEX_CASES:
                index.append(
                    index_run(case, others, label_sets, ahead, 200 if args.quick else 1000)
                )
    finally:
        clients.close()
        service_logs = log_summary(logs)
        pool.close()

    say("")
    say("=" * 100)
    say(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    say(baseline_table(baseline, health, enqueues + claims))
    if enqueues:
        say("")
        say(enqueue_table(enqueues))
    if claims:
        say("")
        say(claim_table(claims))
        for backend, (rows, attempts) in relay.items():
            say(
                f"   {backend}: {rows:,} status reports left in the outbox at the end; "
                f"{attempts:,} failed delivery attempts"
                + (" (none can succeed with --no-reports)" if args.no_reports else "")
            )
        if delivered is not None:
            say(f"   the report sink received {delivered:,} status reports in all")
    if latencies:
        say("")
        say(latency_table(latencies, interval, wait))
    if memory:
        say("")
        say(memory_table(memory))
        if len(memory) == 2 and memory[1].items:
            empty, full = memory
            say(
                f"   per waiting item: {(full.rss_kib - empty.rss_kib) * 1024 / full.items:,.0f} "
                f"bytes of RSS, {(full.startup - empty.startup) * 1e6 / full.items:,.1f} us of "
                "start-up (cache load)"
            )
    if fleet:
        say("")
        say(fleet_table(fleet))
    if index:
        say("")
        say(index_table(index))
    if claims:
        say("")
        say(aims_table(claims))
    if pool.pg_missing:
        say(f"\nNOTE: PostgreSQL skipped: {pool.pg_missing}")
    say("")
    say(table(["phase", "seconds"], [[name, s] for name, s in phases.done], "Phases"))
    say(f"total: {time.monotonic() - total:.1f} s; clients: {clients.where}")
    say(service_logs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
