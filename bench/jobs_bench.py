"""Jobs service benchmark.

1. O(1) commands: p50/p99 of GetJob, CancelJob and UpdateJobStatus over gRPC with a small and a
   large store (10^3 and 10^6 jobs, seeded straight into the ``jobs`` table, not through the
   API). Both stores run side by side and are called in turns, 50 calls at a time, so load
   from elsewhere on the machine falls on both alike. The p50 ratio large/small must stay
   under 1.5; the p99 ratio is printed for information only.
2. Submit throughput (jobs/s) over gRPC with 1 and 8 concurrent clients, on SQLite and on
   PostgreSQL (a throwaway cluster, skipped with a note when the server binaries are missing).

The service runs in this process (``bootstrap.build``) with a queue port that does nothing, so
the outbox relay still drains its table but makes no network calls. The submit load runs in a
separate process by default, so client and server do not share one GIL.

    python -m bench.jobs_bench            # 10^3 vs 10^6 jobs, 5 s submit runs
    python -m bench.jobs_bench --quick    # 10^3 vs 10^5 jobs, 2 s submit runs (under a minute)

Exit status: 1 when a p50 ratio is over the limit, else 0 (p99 is too noisy to gate on).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing import get_context
from pathlib import Path

import grpc
from blixard.common.v1 import job_spec_pb2
from blixard.jobs.v1 import jobs_service_pb2 as pb
from blixard.jobs.v1 import jobs_service_pb2_grpc as pb_grpc
from sqlalchemy import Engine, insert, text, update

from bench.common import (
    FirstLogs,
    Phases,
    Summary,
    check_fits,
    machine_facts,
    ratio,
    say,
    table,
)
from services.common import db
from services.common.server import Running
from services.jobs import bootstrap, config
from services.jobs.domain import Job, JobState
from services.jobs.models import JobRow
from services.jobs.relay import QueuePort
from services.jobs.store import _values
from tests.conftest import free_port

RATIO_LIMIT = 1.5
CALL_TIMEOUT = 30.0
SEED_BATCH = 20_000
SPEC_JSON = '{"command": ["true"]}'  # the canonical form convert.spec_json gives
SPEC_HASH = hashlib.sha256(SPEC_JSON.encode()).hexdigest()
COMMANDS = ("GetJob", "CancelJob", "UpdateJobStatus")


class NoopQueue:
    """The queue port, doing nothing: the relay delivers and deletes outbox rows, quietly.
    ``main`` checks that it still fits ``QueuePort`` before anything is measured."""

    def enqueue(self, job: Job) -> None:
        pass

    def enqueue_many(self, jobs: list[Job]) -> list[Exception | None]:
        return [None] * len(jobs)

    def cancel(self, job_id: str, generation: int, timeout: float = 0.0) -> None:
        pass


# -- the service -----------------------------------------------------------------------------


@contextmanager
def jobs_service(url: str) -> Iterator[Running]:
    """The jobs service built on ``url`` (schema migrated), not yet started."""
    cfg = config.load(
        {
            "JOBS_GRPC_PORT": "0",
            "JOBS_DATABASE_URL": url,
            "JOBS_QUEUE_ADDRESS": f"127.0.0.1:{free_port()}",
        }
    )
    running = bootstrap.build(cfg, queue=NoopQueue())
    try:
        yield running
    finally:
        running.stop(1)


def open_stub(port: int) -> tuple[grpc.Channel, pb_grpc.JobServiceStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=10)
    return channel, pb_grpc.JobServiceStub(channel)


# -- seeding ---------------------------------------------------------------------------------


def job_id(i: int) -> str:
    """The id of seeded job ``i``: a version-4 UUID spread over the key space like uuid4(), but
    recomputable, so samples need not keep 10^6 ids in memory."""
    digest = hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16, person=b"blixard").digest()
    return str(uuid.UUID(bytes=digest, version=4))


def _template(base: datetime) -> dict[str, object]:
    """One RUNNING job's column values, as the store itself writes them (``store._values``),
    so the seed follows the schema when columns are added."""
    job = Job(
        job_id="",
        request_id=None,
        spec_json=SPEC_JSON,
        spec_hash=SPEC_HASH,
        state=JobState.RUNNING,
        created_at=base,
        updated_at=base,
        generation=1,
        attempts=1,
        worker_id="bench-worker",
        started_at=base,
        last_sequence=1,
    )
    values = {**_values(job), "worker_types": ""}
    missing = [
        c.name
        for c in JobRow.__table__.columns
        if not c.nullable and c.name not in values and c.server_default is None
    ]
    if missing:
        raise SystemExit(f"cannot seed: no value for NOT NULL column(s) {', '.join(missing)}")
    return values


def _rows(start: int, stop: int, base: datetime, template: dict[str, object]) -> list[dict]:
    rows = []
    for i in range(start, stop):
        at = base + timedelta(milliseconds=i)
        row = dict(template)
        row.update(
            job_id=job_id(i),
            request_id=f"bench-{i:09d}",
            created_at=at,
            updated_at=at,
            started_at=at,
        )
        rows.append(row)
    return rows


def seed(engine: Engine, n: int) -> None:
    """n RUNNING jobs (generation 1, last sequence 1), in transactions of SEED_BATCH rows."""
    base = datetime.now(UTC) - timedelta(milliseconds=n)
    template = _template(base)
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            connection.exec_driver_sql("PRAGMA cache_size=-262144")  # 256 MiB, this connection
            connection.commit()
        for start in range(0, n, SEED_BATCH):
            rows = _rows(start, min(n, start + SEED_BATCH), base, template)
            with connection.begin():
                connection.execute(insert(JobRow), rows)
        if engine.dialect.name == "postgresql":
            with connection.begin():
                connection.execute(text("ANALYZE jobs"))  # what autovacuum would do soon


def reset_running(engine: Engine, indices: list[int]) -> None:
    """Put cancelled seeded jobs back to RUNNING (untimed), so a small store can be reused."""
    ids = [job_id(i) for i in indices]
    with engine.begin() as connection:
        for k in range(0, len(ids), 500):
            connection.execute(
                update(JobRow)
                .where(JobRow.job_id.in_(ids[k : k + 500]))
                .values(state="RUNNING", ended_at=None, error="")
            )


# -- O(1) commands ---------------------------------------------------------------------------


@dataclass
class Timed:
    warmup: int
    seconds: list[float] = field(default_factory=list)
    problems: Counter[str] = field(default_factory=Counter)

    def summary(self) -> Summary:
        return Summary.of(self.seconds[self.warmup :])


@dataclass
class Store:
    """One seeded store behind its own running jobs service, and what its calls need to know:
    which jobs were moved (updates) and which were cancelled (to put back when the pool of
    RUNNING jobs is used up, as it is in small stores)."""

    backend: str
    n: int
    seed_seconds: float
    engine: Engine
    stub: pb_grpc.JobServiceStub
    rng: random.Random
    states: dict[int, int] = field(default_factory=dict)
    sequence: int = 1
    to_cancel: list[int] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)

    def get(self) -> tuple[Callable[..., object], object, Callable[[object], str]]:
        request = pb.GetJobRequest(job_id=job_id(self.rng.randrange(self.n)))

        def check(response: object) -> str:
            return "" if response.job.state == pb.JOB_STATE_RUNNING else "not RUNNING"  # type: ignore[attr-defined]

        return self.stub.GetJob, request, check

    def cancel(self) -> tuple[Callable[..., object], object, Callable[[object], str]]:
        """A distinct RUNNING job of the lower half; when the half is used up, the cancelled
        jobs are put back to RUNNING directly in the table (untimed)."""
        if not self.to_cancel:
            if self.cancelled:
                reset_running(self.engine, self.cancelled)
                self.cancelled = []
            pool = self.n // 2
            self.to_cancel = self.rng.sample(range(pool), min(pool, 10_000))
        i = self.to_cancel.pop()
        self.cancelled.append(i)
        request = pb.CancelJobRequest(job_id=job_id(i), reason="bench")

        def check(response: object) -> str:
            return "" if response.job.state == pb.JOB_STATE_CANCELLED else "not CANCELLED"  # type: ignore[attr-defined]

        return self.stub.CancelJob, request, check

    def update(self) -> tuple[Callable[..., object], object, Callable[[object], str]]:
        """A queue report on a job of the upper half: RUNNING -> QUEUED -> RUNNING ..., each
        one applied (a new event, a saved row), with a sequence that only grows."""
        i = self.rng.randrange(self.n // 2, self.n)
        current = self.states.get(i, pb.JOB_STATE_RUNNING)
        target = pb.JOB_STATE_QUEUED if current == pb.JOB_STATE_RUNNING else pb.JOB_STATE_RUNNING
        self.sequence += 1
        request = pb.UpdateJobStatusRequest(
            job_id=job_id(i),
            generation=1,
            sequence=self.sequence,
            state=target,
            worker_id="bench-worker",
            reason="bench",
        )

        def check(response: object) -> str:
            if not response.applied:  # type: ignore[attr-defined]
                return "not applied"
            self.states[i] = target
            return ""

        return self.stub.UpdateJobStatus, request, check


def time_calls(store: Store, command: str, calls: int, timed: Timed) -> None:
    make = {"GetJob": store.get, "CancelJob": store.cancel, "UpdateJobStatus": store.update}
    for _ in range(calls):
        method, request, check = make[command]()
        start = time.perf_counter()
        try:
            response = method(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            timed.problems[exc.code().name] += 1  # type: ignore[attr-defined]
            continue
        timed.seconds.append(time.perf_counter() - start)
        problem = check(response)
        if problem:
            timed.problems[problem] += 1


@contextmanager
def seeded_store(backend: str, url: str, n: int) -> Iterator[Store]:
    """A store of n RUNNING jobs behind a started jobs service."""
    with jobs_service(url) as running:
        engine = db.make_engine(url, setting="bench")
        try:
            start = time.perf_counter()
            seed(engine, n)
            seeded = time.perf_counter() - start
            say(f"   seeded {n:,} jobs on {backend} in {seeded:.1f} s ({n / seeded:,.0f} rows/s)")
            running.server.start()
            channel, stub = open_stub(running.port)
            try:
                yield Store(backend, n, seeded, engine, stub, random.Random(n))
            finally:
                channel.close()
        finally:
            engine.dispose()


@dataclass
class StoreRun:
    backend: str
    n: int
    seed_seconds: float
    results: dict[str, Timed]


def run_commands(
    backend: str, stores: list[Store], samples: int, warmup: int, block: int = 50
) -> list[StoreRun]:
    """Each command on every store in turn, ``block`` calls at a time, so that load from
    elsewhere on the machine falls on the small and the large store alike."""
    runs = [StoreRun(backend, s.n, s.seed_seconds, {}) for s in stores]
    for command in COMMANDS:
        timings = [Timed(warmup) for _ in stores]
        left = samples + warmup
        while left:
            calls = min(block, left)
            for store, timed in zip(stores, timings, strict=True):
                time_calls(store, command, calls, timed)
            left -= calls
        for run, timed in zip(runs, timings, strict=True):
            run.results[command] = timed
            s = timed.summary()
            noted = f"  problems: {dict(timed.problems)}" if timed.problems else ""
            say(f"   {command:<16} n={run.n:>9,}  p50 {s.p50:6.2f} ms  p99 {s.p99:6.2f} ms{noted}")
    return runs


# -- submit throughput -----------------------------------------------------------------------


def submit_load(port: int, clients: int, seconds: float, warmup: int) -> dict[str, object]:
    """``clients`` threads, each with its own channel, submitting as fast as they can for
    ``seconds`` after ``warmup`` calls each. Runs in a child process by default."""
    spec = job_spec_pb2.JobSpec(command=["true"])
    started: list[float] = []
    barrier = threading.Barrier(clients, action=lambda: started.append(time.perf_counter()))
    latencies: list[list[float]] = [[] for _ in range(clients)]
    ended = [0.0] * clients
    errors: Counter[str] = Counter()
    lock = threading.Lock()

    def client(k: int) -> None:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.JobServiceStub(channel)

        def submit() -> float | None:
            request = pb.SubmitJobRequest(request_id=str(uuid.uuid4()), spec=spec)
            t0 = time.perf_counter()
            try:
                stub.SubmitJob(request, timeout=CALL_TIMEOUT)
            except grpc.RpcError as exc:
                with lock:
                    errors[exc.code().name] += 1  # type: ignore[attr-defined]
                return None
            return time.perf_counter() - t0

        try:
            for _ in range(warmup):
                submit()
            barrier.wait()
            deadline = started[0] + seconds
            while time.perf_counter() < deadline:
                took = submit()
                if took is not None:
                    latencies[k].append(took)
            ended[k] = time.perf_counter()
        finally:
            channel.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "elapsed": max(ended) - started[0],
        "latencies": [x for per in latencies for x in per],
        "errors": dict(errors),
    }


@dataclass
class SubmitRun:
    backend: str
    clients: int
    jobs: int
    elapsed: float
    latency: Summary
    errors: dict[str, int]


def run_submit(
    backend: str, url: str, clients: int, seconds: float, warmup: int, in_process: bool
) -> SubmitRun:
    with jobs_service(url) as running:
        running.server.start()
        args = (running.port, clients, seconds, warmup)
        if in_process:
            out = submit_load(*args)
        else:
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                out = pool.submit(submit_load, *args).result()
    latencies: list[float] = out["latencies"]  # type: ignore[assignment]
    run = SubmitRun(
        backend,
        clients,
        len(latencies),
        out["elapsed"],  # type: ignore[arg-type]
        Summary.of(latencies),
        out["errors"],  # type: ignore[arg-type]
    )
    noted = f"  errors: {run.errors}" if run.errors else ""
    say(
        f"   {backend:<10} {clients} client(s): {run.jobs:,} jobs in {run.elapsed:.1f} s = "
        f"{run.jobs / run.elapsed:,.0f} jobs/s (p50 {run.latency.p50:.2f} ms, "
        f"p99 {run.latency.p99:.2f} ms){noted}"
    )
    return run


# -- backends --------------------------------------------------------------------------------


class Backends:
    """Fresh empty databases on demand: SQLite files in a temp dir, PostgreSQL databases in one
    throwaway cluster started on first use."""

    def __init__(self, phases: Phases) -> None:
        self.phases = phases
        self.tmp = Path(tempfile.mkdtemp(prefix="blixard-bench-"))
        self._cluster = None
        self._count = 0
        self.pg_missing = ""

    def available(self, backend: str) -> bool:
        if backend != "postgresql":
            return True
        if self._cluster is None and not self.pg_missing:
            from tests.postgres import Cluster, find_bindir

            bindir = find_bindir()
            if bindir is None:
                self.pg_missing = "no PostgreSQL server binaries (initdb) found"
            else:
                with self.phases.phase("start a throwaway PostgreSQL cluster"):
                    cluster = Cluster(bindir)
                    try:
                        cluster.start()
                    except Exception as exc:  # a machine problem, not a benchmark result
                        cluster.stop()
                        self.pg_missing = f"PostgreSQL did not start: {exc}".splitlines()[0]
                    else:
                        self._cluster = cluster
                if self.pg_missing:
                    say(f"   NOTE: PostgreSQL skipped: {self.pg_missing}")
        return self._cluster is not None

    def new_url(self, backend: str) -> str:
        self._count += 1
        if backend == "sqlite":
            return f"sqlite:///{self.tmp / f'jobs-{self._count}.sqlite3'}"
        assert self._cluster is not None
        return self._cluster.new_database()

    def drop(self, url: str) -> None:
        """Remove a database once used (large stores take disk)."""
        if url.startswith("sqlite:///"):
            path = Path(url.removeprefix("sqlite:///"))
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        elif self._cluster is not None:
            import psycopg

            name = url.rsplit("/", 1)[-1]
            with psycopg.connect(self._cluster.admin_dsn, autocommit=True) as connection:
                connection.execute(f'DROP DATABASE IF EXISTS "{name}"')

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


# -- report ----------------------------------------------------------------------------------


def command_table(runs: list[StoreRun], small: int, large: int) -> tuple[str, bool]:
    rows = []
    ok = True
    for backend in dict.fromkeys(r.backend for r in runs):
        by_n = {r.n: r for r in runs if r.backend == backend}
        if small not in by_n or large not in by_n:
            continue
        for name in COMMANDS:
            a, b = by_n[small].results[name].summary(), by_n[large].results[name].summary()
            r50, r99 = ratio(b.p50, a.p50), ratio(b.p99, a.p99)
            verdict = "PASS" if r50 < RATIO_LIMIT else "FAIL"
            ok = ok and verdict == "PASS"
            rows.append([backend, name, a.p50, a.p99, b.p50, b.p99, r50, r99, verdict])
    headers = [
        "backend",
        "command",
        f"p50 ms @{small:,}",
        f"p99 ms @{small:,}",
        f"p50 ms @{large:,}",
        f"p99 ms @{large:,}",
        "p50 ratio",
        "p99 ratio",
        f"p50 ratio < {RATIO_LIMIT}",
    ]
    title = (
        f"O(1) commands over gRPC, one client, {runs[0].results['GetJob'].summary().count:,} "
        f"timed calls each (after warm-up); ratio = large / small"
    )
    return table(headers, rows, title), ok


def submit_table(runs: list[SubmitRun], where: str) -> str:
    rows = [
        [
            r.backend,
            r.clients,
            r.jobs,
            r.elapsed,
            r.jobs / r.elapsed,
            r.latency.p50,
            r.latency.p99,
            sum(r.errors.values()),
        ]
        for r in runs
    ]
    headers = ["backend", "clients", "jobs", "seconds", "jobs/s", "p50 ms", "p99 ms", "errors"]
    return table(headers, rows, f"SubmitJob throughput over gRPC (clients {where})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.jobs_bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="10^3 vs 10^5 jobs, short runs")
    parser.add_argument("--backends", default="sqlite,postgresql", help="comma-separated")
    parser.add_argument("--samples", type=int, help="timed calls per command and store size")
    parser.add_argument("--seconds", type=float, help="duration of each submit run")
    parser.add_argument(
        "--in-process-clients",
        action="store_true",
        help="run the submit clients as threads of this process (sharing the server's GIL)",
    )
    args = parser.parse_args(argv)
    check_fits(NoopQueue(), QueuePort)

    small = 1_000
    large = 100_000 if args.quick else 1_000_000
    samples = args.samples or (400 if args.quick else 2000)
    warmup = 50 if args.quick else 200
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    submit_warmup = 20 if args.quick else 50
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in ("sqlite", "postgresql"):
            parser.error(f"--backends: unknown backend {b!r} (sqlite, postgresql)")

    say("Blixard jobs service benchmark" + (" (--quick)" if args.quick else ""))
    say(table(["fact", "value"], machine_facts()))
    say(
        f"store sizes {small:,} vs {large:,}; {samples} timed calls per command after {warmup} "
        f"warm-up calls; submit runs of {seconds:g} s with 1 and 8 clients"
    )

    logs = FirstLogs().install()
    phases = Phases()
    store_runs: list[StoreRun] = []
    submit_runs: list[SubmitRun] = []
    total = time.perf_counter()
    pool = Backends(phases)
    try:
        for backend in backends:
            if not pool.available(backend):
                continue
            urls = [pool.new_url(backend), pool.new_url(backend)]
            try:
                with ExitStack() as stack:
                    stores = []
                    for n, url in zip((small, large), urls, strict=True):
                        with phases.phase(f"seed {backend}, {n:,} jobs (and start its service)"):
                            stores.append(stack.enter_context(seeded_store(backend, url, n)))
                    with phases.phase(f"O(1) commands, {backend}, {small:,} and {large:,} jobs"):
                        store_runs.extend(run_commands(backend, stores, samples, warmup))
            finally:
                for url in urls:
                    pool.drop(url)
        for backend in backends:
            if not pool.available(backend):
                continue
            for clients in (1, 8):
                with phases.phase(f"submit, {backend}, {clients} client(s)"):
                    url = pool.new_url(backend)
                    submit_runs.append(
                        run_submit(
                            backend, url, clients, seconds, submit_warmup, args.in_process_clients
                        )
                    )
                    pool.drop(url)
    finally:
        pool.close()

    say("")
    say("=" * 100)
    ok = True
    if store_runs:
        text_, ok = command_table(store_runs, small, large)
        say(text_)
        seeds = [[r.backend, r.n, r.seed_seconds, r.n / r.seed_seconds] for r in store_runs]
        say("")
        say(table(["backend", "jobs", "seed s", "rows/s"], seeds, "Seeding (direct inserts)"))
    if submit_runs:
        say("")
        where = "as threads of this process" if args.in_process_clients else "in a child process"
        say(submit_table(submit_runs, where))
    if pool.pg_missing:
        say(f"\nNOTE: PostgreSQL skipped: {pool.pg_missing}")
    say("")
    say(table(["phase", "seconds"], [[name, s] for name, s in phases.done], "Phases"))
    say(f"total: {time.perf_counter() - total:.1f} s")
    say(logs.summary())
    say(f"verdict: p50 ratios {'all under' if ok else 'NOT all under'} {RATIO_LIMIT}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
