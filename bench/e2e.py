"""End-to-end benchmark: Blixard measured the way ``../shared/peers/`` measures Celery, PgQueuer,
procrastinate and RQ, so that one table can hold them all (``bench/e2e_report.py``).

The suite runs as real processes on free loopback ports: ``python -m services.jobs``,
``python -m services.queue`` and ``python -m services.worker`` (no VM service: no job here needs
one), on SQLite files in a temp directory and on PostgreSQL (a throwaway cluster with initdb's
defaults, fsync and synchronous_commit on, as the peers' cluster). Every run gets a fresh suite
and fresh databases. The definitions are the peers' (``../shared/peers/common.py``):

* single enqueue = N sequential ``SubmitJob`` calls from one producer, no worker running;
* bulk enqueue = the fastest batch path Blixard has: ``BatchSubmitJobs`` when the contract has
  it, else (today) N ``SubmitJob`` calls from BULK_CLIENTS concurrent client threads;
* drain = N jobs waiting in the queue (the outbox relay has delivered every one), then the
  workers start: (N-1) / (last job started - first job started);
* latency = one job at a time on an idle, warm worker: submit -> done (``WatchJob`` returns the
  terminal state to the client: the system's own wait mechanism) and submit -> job started.

When a job started: mock jobs have no process and the jobs service does not know when a
``true`` process was forked, so "started" is the job's ``start_time`` as the jobs service
reports it (ListJobs / WatchJob): the time the queue leased the job to a worker, read from the
queue's wall clock (same machine as the bench's ``time.time()``). For mock jobs that is the
start; for ``true`` commands the fork follows it by the worker's spawn time.

CPU: utime + stime from /proc/<pid>/stat of each service process, before the enqueue, after the
relay delivered every job, and when every job is SUCCEEDED in the jobs service; per job =
delta / N. A worker's CPU counts from the sample (every 10 ms) taken just before its first
job started, so its start-up (imports, registration) is left out. The driver's own calls in a
run (GetStats every 0.2 s, a few ListJobs) are included; they are tiny against the jobs.

Knobs (env, as the peers'): BENCH_N (5000), BENCH_REPS (3), BENCH_LAT_N (200), BENCH_LAT_WARMUP
(20), BENCH_RESULTS (JSON goes there as blixard-<backend>.json; default the peers' directory),
BENCH_SETTINGS (no-op drains, default mock-1x2,mock-2x16: WORKERSxSLOTS of mock workers),
BENCH_TRUE_SETTINGS (``true`` drains, default true-2x16: process workers),
BENCH_LAT_SETTING (mock-1x2), BENCH_CANCEL_N (cancel -> process gone samples, 5).

    python -m bench.e2e                      # SQLite and PostgreSQL, the knobs above
    python -m bench.e2e --quick              # N=1000, 1 rep, 50 latency samples, SQLite only
    python -m bench.e2e --backends sqlite --report-only   # print the table from saved results

It prints; it does not assert (the issue's targets are reported as met or not met).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from blixard.common.v1 import job_spec_pb2
from blixard.jobs.v1 import jobs_service_pb2 as pb
from blixard.jobs.v1 import jobs_service_pb2_grpc as pb_grpc
from blixard.queue.v1 import queue_service_pb2 as qpb
from blixard.queue.v1 import queue_service_pb2_grpc as qpb_grpc

from bench import e2e_report
from bench.common import cpu_seconds, machine_facts, say, table
from tests.conftest import free_port
from tests.deployment import ROOT, stop_process, wait_healthy

CALL_TIMEOUT = 30.0
WAIT_TIMEOUT = 900.0  # a drain at today's ~50 jobs/s of 5000 jobs takes 100 s; room for load
BULK_CLIENTS = 8
BULK_CHUNK = 500  # specs per BatchSubmitJobs call, when there is one (PgQueuer's bench: 500)
POLL = 0.2  # GetStats while waiting
CPU_SAMPLE = 0.01  # worker CPU sampling (a /proc read, no RPC)
TERMINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)
NOT_DONE = (pb.JOB_STATE_PENDING, pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
ENV_PREFIXES = ("JOBS_", "QUEUE_", "WORKER_", "VMS_", "BLIXARD_", "TARGET_")
LAT_SETTING = "mock-1x2"  # one worker process with 2 slots, as the peers' Celery prefork -c 2
PG_SETTINGS = ("fsync", "synchronous_commit", "shared_buffers", "max_connections")


@dataclass(frozen=True)
class Knobs:
    n: int
    reps: int
    lat_n: int
    lat_warmup: int
    cancel_n: int

    @classmethod
    def from_env(cls, quick: bool) -> Knobs:
        def knob(name: str, default: int, quick_default: int) -> int:
            return int(os.environ.get(name, str(quick_default if quick else default)))

        return cls(
            n=knob("BENCH_N", 5000, 1000),
            reps=knob("BENCH_REPS", 3, 1),
            lat_n=knob("BENCH_LAT_N", 200, 50),
            lat_warmup=knob("BENCH_LAT_WARMUP", 20, 10),
            cancel_n=knob("BENCH_CANCEL_N", 5, 3),
        )


@dataclass(frozen=True)
class Setting:
    """WORKERSxSLOTS of one worker type: ``mock-2x16`` (no-op jobs), ``true-2x16`` (process
    workers running the command ``true``)."""

    name: str
    worker_type: str
    workers: int
    slots: int

    @classmethod
    def parse(cls, name: str) -> Setting:
        kind, _, shape = name.partition("-")
        workers, _, slots = shape.partition("x")
        types = {"mock": "mock", "true": "process"}
        if kind not in types or not workers.isdigit() or not slots.isdigit():
            raise ValueError(f"{name!r}: a setting is mock-WxS or true-WxS, e.g. mock-2x16")
        return cls(name, types[kind], int(workers), int(slots))

    @property
    def description(self) -> str:
        what = "mock workers (no-op)" if self.worker_type == "mock" else "process workers (`true`)"
        return f"{self.workers} x {what}, {self.slots} slots each"


# -- PostgreSQL ------------------------------------------------------------------------------


class Cluster:
    """A throwaway PostgreSQL cluster with initdb's defaults (fsync on, synchronous_commit on),
    as ``../shared/peers/run.sh`` starts for PgQueuer: tests/postgres.py turns fsync off, which
    would flatter Blixard against the peers."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="blixard-e2e-pg-"))
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            import pwd

            user = "postgres"
            try:
                pw = pwd.getpwnam(user)
            except KeyError:
                user, pw = "nobody", pwd.getpwnam("nobody")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", user, "--"]
        self.started = False

    @property
    def data(self) -> Path:
        return self.root / "data"

    def start(self) -> None:
        subprocess.run(
            [
                *self.as_user,
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "blixard",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
            check=True,
            capture_output=True,
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self.root}"
        )
        subprocess.run(
            [
                *self.as_user,
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.root / "log"),
                "-w",
                "-s",
                "-o",
                options,
                "start",
            ],
            check=True,
            capture_output=True,
        )
        self.started = True

    @property
    def pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def admin(self, sql: str) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(
            f"postgresql://blixard@127.0.0.1:{self.port}/postgres", autocommit=True
        ) as connection:
            cursor = connection.execute(sql)
            return cursor.fetchall() if cursor.description else []

    def new_database(self) -> str:
        name = f"e2e_{uuid.uuid4().hex[:12]}"
        self.admin(f'CREATE DATABASE "{name}"')
        return f"postgresql://blixard@127.0.0.1:{self.port}/{name}"

    def settings(self) -> str:
        names = ", ".join(f"'{n}'" for n in PG_SETTINGS)
        rows = self.admin(f"SELECT name, setting FROM pg_settings WHERE name IN ({names})")
        return " ".join(f"{n}={s}" for n, s in sorted(rows))

    def cpu(self) -> float:
        """CPU of the postmaster, of every backend alive now and of those already ended."""
        total = cpu_seconds(self.pid, children=True)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == self.pid:
                total += (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def stop(self) -> None:
        if self.started:
            subprocess.run(
                [
                    *self.as_user,
                    str(self.bindir / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-m",
                    "fast",
                    "-w",
                    "stop",
                ],
                capture_output=True,
            )
            self.started = False
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)


def find_pg_bindir() -> Path | None:
    from tests.postgres import find_bindir

    return find_bindir()


# -- the suite -------------------------------------------------------------------------------


class Suite:
    """jobs and queue services (and workers when asked) as real processes on one backend."""

    def __init__(self, backend: str, workdir: Path, cluster: Cluster | None) -> None:
        self.backend = backend
        self.workdir = workdir
        self.cluster = cluster
        self.jobs_port, self.queue_port = free_port(), free_port()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        if backend == "sqlite":
            urls = (f"sqlite:///{workdir}/jobs.sqlite3", f"sqlite:///{workdir}/queue.sqlite3")
        else:
            assert cluster is not None
            urls = (cluster.new_database(), cluster.new_database())
        base = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIXES)}
        self.env = {
            **base,
            "JOBS_GRPC_PORT": str(self.jobs_port),
            "QUEUE_GRPC_PORT": str(self.queue_port),
            "JOBS_DATABASE_URL": urls[0],
            "QUEUE_DATABASE_URL": urls[1],
            "JOBS_QUEUE_ADDRESS": f"127.0.0.1:{self.queue_port}",
            "QUEUE_JOBS_ADDRESS": f"127.0.0.1:{self.jobs_port}",
            "WORKER_QUEUE_ADDRESS": f"127.0.0.1:{self.queue_port}",
            "WORKER_JOBS_ADDRESS": f"127.0.0.1:{self.jobs_port}",
            "WORKER_POLL_WAIT": "2",  # an idle long poll; an enqueue wakes it at once
            "BLIXARD_LOG_LEVEL": "warning",
        }

    @property
    def jobs(self) -> str:
        return f"127.0.0.1:{self.jobs_port}"

    @property
    def queue(self) -> str:
        return f"127.0.0.1:{self.queue_port}"

    def start(self) -> None:
        try:
            for name, module, address in (
                ("jobs", "services.jobs", self.jobs),
                ("queue", "services.queue", self.queue),
            ):
                process = start_service(module, self.env, self.workdir / f"{name}.log")
                self.processes[name] = process
                wait_healthy(address, timeout=120, process=process)
        except BaseException:
            self.stop()
            raise

    def start_workers(self, setting: Setting, prefix: str = "w") -> None:
        for i in range(setting.workers):
            worker_id = f"bench-{prefix}-{i}"
            env = {
                **self.env,
                "WORKER_ID": worker_id,
                "WORKER_TYPE": setting.worker_type,
                "WORKER_SLOTS": str(setting.slots),
                "WORKER_MOCK_DELAY": "0",
            }
            log = self.workdir / f"{worker_id}.log"
            self.workers[worker_id] = start_service("services.worker", env, log)

    def stop_workers(self) -> None:
        for process in self.workers.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.workers.values():
            stop_process(process)
        self.workers.clear()

    def stop(self) -> None:
        self.stop_workers()
        for name in reversed(list(self.processes)):
            stop_process(self.processes.pop(name))

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each service process (and of PostgreSQL, on it)."""
        out = {name: cpu_seconds(p.pid) for name, p in self.processes.items()}
        if self.cluster is not None:
            out["postgres"] = self.cluster.cpu()
        return out

    def log_tail(self, lines: int = 12) -> str:
        parts = []
        for path in sorted(self.workdir.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            if tail:
                parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)


def start_service(module: str, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """``python -m module`` with exactly ``env`` (tests.deployment's adds os.environ, and with it
    any JOBS_/QUEUE_/WORKER_ setting of the caller's shell)."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", module],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


class Clients:
    """One channel to each service (a client process's worth)."""

    def __init__(self, suite: Suite) -> None:
        self.jobs_channel = grpc.insecure_channel(suite.jobs)
        self.queue_channel = grpc.insecure_channel(suite.queue)
        self.jobs = pb_grpc.JobServiceStub(self.jobs_channel)
        self.queue = qpb_grpc.QueueServiceStub(self.queue_channel)

    def close(self) -> None:
        self.jobs_channel.close()
        self.queue_channel.close()

    def stats(self) -> dict[str, int]:
        reply = self.queue.GetStats(qpb.GetStatsRequest(), timeout=CALL_TIMEOUT)
        return {k.removeprefix("ITEM_STATE_"): int(v) for k, v in reply.items_by_state.items()}

    def wait_stats(self, done: Callable[[dict[str, int]], bool], what: str) -> dict[str, int]:
        deadline = time.monotonic() + WAIT_TIMEOUT
        while True:
            stats = self.stats()
            if done(stats):
                return stats
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {WAIT_TIMEOUT:g} s (queue: {stats})")
            time.sleep(POLL)

    def wait_jobs_done(self) -> None:
        """Until the jobs service holds no job that is not yet terminal."""
        deadline = time.monotonic() + WAIT_TIMEOUT
        request = pb.ListJobsRequest(page_size=1, states=NOT_DONE)
        while self.jobs.ListJobs(request, timeout=CALL_TIMEOUT).jobs:
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs not terminal within {WAIT_TIMEOUT:g} s")
            time.sleep(POLL)

    def all_jobs(self) -> list[pb.Job]:
        jobs: list[pb.Job] = []
        token = ""
        while True:
            reply = self.jobs.ListJobs(
                pb.ListJobsRequest(page_size=1000, page_token=token), timeout=CALL_TIMEOUT
            )
            jobs.extend(reply.jobs)
            token = reply.next_page_token
            if not token:
                return jobs

    def wait_workers(self, ids: list[str], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            reply = self.queue.ListWorkers(qpb.ListWorkersRequest(), timeout=CALL_TIMEOUT)
            online = {w.worker_id for w in reply.workers if w.state == qpb.WORKER_STATE_ONLINE}
            if set(ids) <= online:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers {sorted(set(ids) - online)} did not register")
            time.sleep(0.05)


def noop_request() -> pb.SubmitJobRequest:
    return pb.SubmitJobRequest(
        request_id=str(uuid.uuid4()), spec=job_spec_pb2.JobSpec(command=["true"])
    )


def seconds(ts: Any) -> float:
    return float(ts.seconds) + ts.nanos / 1e9


# -- measurements ----------------------------------------------------------------------------


class WorkerCpu:
    """Each worker's CPU sampled every CPU_SAMPLE s in a thread of the driver (no RPC)."""

    def __init__(self, workers: dict[str, subprocess.Popen[bytes]]) -> None:
        self.workers = dict(workers)
        self.samples: dict[str, list[tuple[float, float, float]]] = {w: [] for w in workers}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WorkerCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        now = time.time()
        for worker_id, process in self.workers.items():
            try:
                own = cpu_seconds(process.pid)
                children = cpu_seconds(process.pid, children=True) - own
            except OSError:
                continue
            self.samples[worker_id].append((now, own, children))

    def _run(self) -> None:
        while not self._stop.wait(CPU_SAMPLE):
            self.sample()

    def used_since(self, first_start: dict[str, float]) -> tuple[float, float]:
        """(own CPU, children's CPU) of all workers from the sample before each worker's
        first job started to the last sample."""
        own = children = 0.0
        for worker_id, samples in self.samples.items():
            if worker_id not in first_start or not samples:
                continue
            before = [s for s in samples if s[0] <= first_start[worker_id]] or samples[:1]
            own += samples[-1][1] - before[-1][1]
            children += samples[-1][2] - before[-1][2]
        return own, children


def enqueue_single(clients: Clients, n: int) -> float:
    submit = clients.jobs.SubmitJob
    t0 = time.perf_counter()
    for _ in range(n):
        submit(noop_request(), timeout=CALL_TIMEOUT)
    return n / (time.perf_counter() - t0)


def batch_submit_api() -> tuple[str, str] | None:
    """(method name, repeated field) of a BatchSubmitJobs taking SubmitJobRequests, when the
    contract has one (issue 16 plans it); None today."""
    service = pb.DESCRIPTOR.services_by_name["JobService"]
    method = service.methods_by_name.get("BatchSubmitJobs")
    if method is None:
        return None
    for f in method.input_type.fields:
        if f.message_type is not None and f.message_type.name == "SubmitJobRequest":
            return method.name, f.name
    return None


def enqueue_bulk(suite: Suite, clients: Clients, n: int) -> tuple[float, str]:
    """The fastest batch submit path: (jobs/s, how)."""
    api = batch_submit_api()
    if api is not None:
        method, field_name = api
        request_type = getattr(pb, f"{method}Request")
        call = getattr(clients.jobs, method)
        t0 = time.perf_counter()
        for start in range(0, n, BULK_CHUNK):
            items = [noop_request() for _ in range(min(BULK_CHUNK, n - start))]
            call(request_type(**{field_name: items}), timeout=CALL_TIMEOUT)
        return n / (time.perf_counter() - t0), f"{method}, {BULK_CHUNK} specs per call"
    # No batch RPC: concurrent single submits, each client thread with its own channel.
    channels = [
        grpc.insecure_channel(suite.jobs, [("grpc.use_local_subchannel_pool", 1)])
        for _ in range(BULK_CLIENTS)
    ]
    stubs = [pb_grpc.JobServiceStub(c) for c in channels]
    for channel in channels:  # connected before the clock starts
        grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT)
    share = [n // BULK_CLIENTS + (i < n % BULK_CLIENTS) for i in range(BULK_CLIENTS)]

    def client(i: int) -> None:
        for _ in range(share[i]):
            stubs[i].SubmitJob(noop_request(), timeout=CALL_TIMEOUT)

    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(BULK_CLIENTS) as pool:
            list(pool.map(client, range(BULK_CLIENTS)))
        rate = n / (time.perf_counter() - t0)
    finally:
        for channel in channels:
            channel.close()
    return rate, f"no batch RPC: {BULK_CLIENTS} concurrent SubmitJob clients (threads)"


def per_job_us(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    return {k: (after[k] - before[k]) / n * 1e6 for k in after if k in before}


@dataclass
class Env:
    knobs: Knobs
    cluster: Cluster | None
    tmp: Path
    log: list[str] = field(default_factory=list)

    @contextmanager
    def suite(self, backend: str) -> Iterator[tuple[Suite, Clients]]:
        workdir = Path(tempfile.mkdtemp(prefix="suite-", dir=self.tmp))
        suite = Suite(backend, workdir, self.cluster if backend == "postgresql" else None)
        try:
            suite.start()
        except BaseException:
            say("   the suite did not start; its logs, last lines:\n" + suite.log_tail())
            raise
        clients = Clients(suite)
        try:
            yield suite, clients
        except BaseException:
            say("   the suite's logs, last lines:\n" + suite.log_tail())
            raise
        finally:
            clients.close()
            suite.stop()


def drain_run(env: Env, backend: str, setting: Setting) -> dict[str, Any]:
    """One peers-style throughput run: single enqueue of N, then the workers drain them."""
    n = env.knobs.n
    with env.suite(backend) as (suite, clients):
        cpu0 = suite.cpu()
        rate = enqueue_single(clients, n)
        t_enqueued = time.perf_counter()
        clients.wait_stats(lambda s: s.get("WAITING", 0) >= n, "relay to the queue")
        relay_s = time.perf_counter() - t_enqueued
        cpu1 = suite.cpu()
        t_launch = time.time()
        suite.start_workers(setting)
        with WorkerCpu(suite.workers) as wcpu:
            stats = clients.wait_stats(
                lambda s: sum(s.get(k, 0) for k in ("SUCCEEDED", "FAILED", "DEAD_LETTERED")) >= n,
                "drain",
            )
            clients.wait_jobs_done()
            cpu2 = suite.cpu()
            wcpu.sample()
        jobs = clients.all_jobs()
        suite.stop_workers()
    starts = [seconds(j.start_time) for j in jobs if j.HasField("start_time")]
    ends = [seconds(j.end_time) for j in jobs if j.HasField("end_time")]
    first_start: dict[str, float] = {}
    for j in jobs:
        if j.HasField("start_time") and j.worker_id:
            t = seconds(j.start_time)
            first_start[j.worker_id] = min(t, first_start.get(j.worker_id, t))
    w_own, w_children = wcpu.used_since(first_start)
    first, last = min(starts), max(starts)
    cpu_enqueue = per_job_us(cpu0, cpu1, n)
    cpu_drain = per_job_us(cpu1, cpu2, n)
    cpu_drain["workers"] = w_own / n * 1e6
    if setting.worker_type == "process":
        cpu_drain["worker children"] = w_children / n * 1e6
    succeeded = sum(1 for j in jobs if j.state == pb.JOB_STATE_SUCCEEDED)
    return {
        "ran": len(starts),
        "first_to_last_s": last - first,
        "startup_s": first - t_launch,
        "drain_rate": (n - 1) / (last - first) if last > first else float("nan"),
        "done_rate": (n - 1) / (max(ends) - first) if ends and max(ends) > first else None,
        "enqueue_rate": rate,
        "relay_s": relay_s,
        "succeeded": succeeded,
        "queue_stats_after": stats,
        "cpu_us_per_job": {"enqueue": cpu_enqueue, "drain": cpu_drain},
    }


def bulk_runs(env: Env, backend: str) -> dict[str, Any]:
    rates, how = [], ""
    for _ in range(env.knobs.reps):
        with env.suite(backend) as (suite, clients):
            cpu0 = suite.cpu()
            rate, how = enqueue_bulk(suite, clients, env.knobs.n)
            cpu1 = suite.cpu()
        rates.append(rate)
        say(f"   bulk enqueue: {rate:,.0f} jobs/s ({how})")
    return {"api": how, "rates": rates, "cpu_us_per_job": per_job_us(cpu0, cpu1, env.knobs.n)}


def latency_run(env: Env, backend: str, setting: Setting) -> dict[str, Any]:
    knobs = env.knobs
    with env.suite(backend) as (suite, clients):
        suite.start_workers(setting, prefix="lat")
        clients.wait_workers(list(suite.workers))

        def one() -> tuple[float, float, float]:
            t0 = time.time()
            job_id = clients.jobs.SubmitJob(noop_request(), timeout=CALL_TIMEOUT).job.job_id
            job = None
            for update in clients.jobs.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=60):
                job = update.job
            t1 = time.time()
            if job is None or job.state != pb.JOB_STATE_SUCCEEDED:
                raise RuntimeError(f"latency job {job_id} ended {job and job.state}")
            if not job.HasField("start_time"):
                job = clients.jobs.GetJob(pb.GetJobRequest(job_id=job_id), timeout=30).job
            return t0, t1, seconds(job.start_time)

        for _ in range(knobs.lat_warmup):
            one()
        samples = [one() for _ in range(knobs.lat_n)]
    return {
        "done_ms": [(t1 - t0) * 1e3 for t0, t1, _ in samples],
        "ran_ms": [(ts - t0) * 1e3 for t0, _, ts in samples],
    }


def fork_exec_baseline(n: int, concurrency: int) -> dict[str, Any]:
    """A bare loop: `concurrency` threads of this process running `true` (subprocess.run),
    n in all; the peers' drain definition over the moments each spawn began."""
    stamps: list[float] = []
    lock = threading.Lock()
    share = [n // concurrency + (i < n % concurrency) for i in range(concurrency)]

    def loop(i: int) -> None:
        for _ in range(share[i]):
            t = time.time()
            subprocess.run(["true"], check=True)
            with lock:
                stamps.append(t)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(loop, range(concurrency)))
    span = max(stamps) - min(stamps)
    return {"concurrency": concurrency, "n": n, "drain_rate": (n - 1) / span}


def cancel_runs(env: Env, backend: str) -> dict[str, Any]:
    """CancelJob of a running process job (`sleep`) -> its process gone (dead or reaped)."""
    setting = Setting.parse("true-1x2")
    gone_ms: list[float] = []
    with env.suite(backend) as (suite, clients):
        suite.start_workers(setting, prefix="cancel")
        clients.wait_workers(list(suite.workers))
        for i in range(env.knobs.cancel_n):
            marker = f"{600 + i}.{uuid.uuid4().int % 10**6:06d}"
            request = pb.SubmitJobRequest(
                request_id=str(uuid.uuid4()),
                spec=job_spec_pb2.JobSpec(command=["sleep", marker], max_attempts=1),
            )
            job_id = clients.jobs.SubmitJob(request, timeout=CALL_TIMEOUT).job.job_id
            pid = wait_process(["sleep", marker], timeout=60)
            time.sleep(0.2)  # running for a moment, as a real job would be
            t0 = time.perf_counter()
            clients.jobs.CancelJob(
                pb.CancelJobRequest(job_id=job_id, reason="bench"), timeout=CALL_TIMEOUT
            )
            deadline = t0 + 120
            while process_alive(pid) and time.perf_counter() < deadline:
                time.sleep(0.002)
            gone_ms.append((time.perf_counter() - t0) * 1e3)
            say(f"   cancel -> process gone: {gone_ms[-1]:,.0f} ms")
    return {"setting": setting.name, "gone_ms": gone_ms}


def wait_process(argv: list[str], timeout: float) -> int:
    want = ("\0".join(argv) + "\0").encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if (entry / "cmdline").read_bytes() == want:
                        return int(entry.name)
                except OSError:
                    continue
        time.sleep(0.01)
    raise TimeoutError(f"no process {argv} within {timeout:g} s")


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# -- one backend -----------------------------------------------------------------------------


def run_backend(
    env: Env, backend: str, settings: list[Setting], true_settings: list[Setting]
) -> dict[str, Any]:
    knobs = env.knobs
    out: dict[str, Any] = {"backend": backend, "settings": {}, "true_commands": {}}
    for kind, group in (("settings", settings), ("true_commands", true_settings)):
        for setting in group:
            runs = []
            for rep in range(knobs.reps):
                res = drain_run(env, backend, setting)
                cpu = res["cpu_us_per_job"]
                total = sum(cpu["enqueue"].values()) + sum(
                    v for k, v in cpu["drain"].items() if k != "worker children"
                )
                say(
                    f"   {backend} {setting.name} rep{rep}: enqueue {res['enqueue_rate']:,.0f}/s, "
                    f"drain {res['drain_rate']:,.0f}/s, startup {res['startup_s']:.2f} s, "
                    f"relay lag {res['relay_s']:.2f} s, ran {res['ran']}, "
                    f"succeeded {res['succeeded']}, CPU {total:,.0f} us/job"
                )
                runs.append(res)
            out[kind][setting.name] = {
                "workers": setting.workers,
                "slots": setting.slots,
                "worker_type": setting.worker_type,
                "description": setting.description,
                "runs": runs,
            }
            if kind == "true_commands":
                base = fork_exec_baseline(knobs.n, setting.workers * setting.slots)
                say(
                    f"   bare fork/exec loop, {base['concurrency']} threads: "
                    f"{base['drain_rate']:,.0f}/s"
                )
                out[kind][setting.name]["fork_exec_baseline"] = base
    out["bulk_enqueue"] = bulk_runs(env, backend)
    lat_setting = Setting.parse(os.environ.get("BENCH_LAT_SETTING", LAT_SETTING))
    out["latency"] = {"setting": f"{lat_setting.description}; WatchJob to the end", "runs": []}
    for rep in range(knobs.reps):
        lat = latency_run(env, backend, lat_setting)
        say(
            f"   {backend} latency rep{rep}: done p50 {e2e_report.pct(lat['done_ms'], 0.5):.1f} "
            f"ms p99 {e2e_report.pct(lat['done_ms'], 0.99):.1f} ms; started p50 "
            f"{e2e_report.pct(lat['ran_ms'], 0.5):.1f} ms"
        )
        out["latency"]["runs"].append(lat)
    if knobs.cancel_n:
        out["cancel"] = cancel_runs(env, backend)
    return out


# -- py-spy ----------------------------------------------------------------------------------


def profile(env: Env, backend: str, setting: Setting, out_dir: Path) -> None:
    """An enqueue and drain run (not reported) with py-spy recording the jobs and queue services
    and the first worker; prints the busiest functions of each (own time). ``--gil``: only
    the thread holding the GIL is sampled, so threads waiting in grpc's completion queues or
    on a lock are not counted as busy (py-spy's idle detection misses those); work done
    without the GIL (SQLite's own C code, grpc core threads) is not seen."""
    py_spy = Path(sys.executable).parent / "py-spy"
    out_dir.mkdir(parents=True, exist_ok=True)
    n = env.knobs.n
    with env.suite(backend) as (suite, clients):
        recorders = {}
        for name, p in suite.processes.items():
            recorders[name] = spy(py_spy, p.pid, out_dir / f"{backend}-{name}.txt")
        enqueue_single(clients, n)
        clients.wait_stats(lambda s: s.get("WAITING", 0) >= n, "relay to the queue")
        for r in recorders.values():
            r.send_signal(signal.SIGINT)
        for r in recorders.values():
            r.wait(timeout=60)
        phase1 = {k: out_dir / f"{backend}-{k}.txt" for k in recorders}
        for name, path in phase1.items():
            path.rename(path.with_name(f"{backend}-{name}-enqueue.txt"))
        suite.start_workers(setting)
        clients.wait_workers(list(suite.workers))  # their imports are not the jobs' cost
        procs = dict(suite.processes)
        first_worker = next(iter(suite.workers))
        procs["worker"] = suite.workers[first_worker]
        recorders = {
            name: spy(py_spy, p.pid, out_dir / f"{backend}-{name}-drain.txt")
            for name, p in procs.items()
        }
        clients.wait_stats(lambda s: s.get("SUCCEEDED", 0) >= n, "drain")
        clients.wait_jobs_done()
        for r in recorders.values():
            r.send_signal(signal.SIGINT)
        for r in recorders.values():
            r.wait(timeout=60)
    for path in sorted(out_dir.glob(f"{backend}-*-*.txt")):
        say(e2e_report.top_frames(path))


def spy(py_spy: Path, pid: int, path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            str(py_spy),
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--rate",
            "200",
            "--nonblocking",
            "--output",
            str(path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.e2e",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small knobs, SQLite only")
    parser.add_argument("--backends", help="comma list of sqlite,postgresql")
    parser.add_argument("--results", type=Path, help="where the JSON goes (BENCH_RESULTS)")
    parser.add_argument("--report-only", action="store_true", help="print the saved results")
    parser.add_argument(
        "--profile",
        type=Path,
        help="instead of the measured runs: one enqueue and drain (the last no-op setting) "
        "under py-spy, raw stacks into this directory, the busiest functions printed",
    )
    args = parser.parse_args(argv)

    default_results = Path(tempfile.gettempdir()) / "blixard-peers-results"
    results = args.results or Path(os.environ.get("BENCH_RESULTS", str(default_results)))
    backends = (args.backends or ("sqlite" if args.quick else "sqlite,postgresql")).split(",")
    for b in backends:
        if b not in ("sqlite", "postgresql"):
            parser.error(f"--backends: {b!r} is not sqlite or postgresql")
    if args.report_only:
        say(e2e_report.render(results, backends))
        return 0

    knobs = Knobs.from_env(args.quick)
    mock_default = "mock-2x16" if args.quick else "mock-1x2,mock-2x16"
    settings = [Setting.parse(s) for s in os.environ.get("BENCH_SETTINGS", mock_default).split(",")]
    true_names = os.environ.get("BENCH_TRUE_SETTINGS", "true-2x16")
    true_settings = [Setting.parse(s) for s in true_names.split(",") if s]
    started = time.time()
    say("Blixard end-to-end benchmark (the peers' method)" + (" --quick" if args.quick else ""))
    say(table(["fact", "value"], machine_facts()))
    say(
        f"N={knobs.n}, {knobs.reps} rep(s), {knobs.lat_n} latency samples "
        f"(+{knobs.lat_warmup} warm-up), backends {', '.join(backends)}; no-op drains "
        f"{', '.join(s.name for s in settings)}; `true` drains "
        f"{', '.join(s.name for s in true_settings) or 'none'}"
    )
    for backend in backends if not args.profile else []:  # no stale figures if one fails
        (results / f"blixard-{backend}.json").unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="blixard-e2e-"))
    cluster: Cluster | None = None
    code = 0
    try:
        for backend in backends:
            if backend == "postgresql":
                bindir = find_pg_bindir()
                if bindir is None:
                    say("NOTE: PostgreSQL skipped: no server binaries (initdb) found")
                    continue
                cluster = Cluster(bindir)
                cluster.start()
            env = Env(knobs, cluster, tmp)
            say(f"== {backend}" + (f" ({cluster.settings()})" if cluster else ""))
            if args.profile:
                profile(env, backend, settings[-1], args.profile)
                if cluster is not None:
                    cluster.stop()
                    cluster = None
                continue
            try:
                data = run_backend(env, backend, settings, true_settings)
            except Exception as exc:  # one backend failing still reports the other
                say(f"   {backend}: FAILED: {exc}")
                code = 1
                continue
            data["versions"] = dict(machine_facts())
            if cluster is not None:
                data["pg_settings"] = cluster.settings()
            path = e2e_report.write_result(results, f"blixard-{backend}", data, knobs)
            say(f"   results: {path}")
            if cluster is not None:
                cluster.stop()
                cluster = None
    finally:
        if cluster is not None:
            cluster.stop()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    say(f"total {time.time() - started:.0f} s")
    if args.profile:
        return code
    say("")
    say(e2e_report.render(results, backends, since=started))
    return code


if __name__ == "__main__":
    sys.exit(main())
