"""Worker benchmark.

1. End-to-end no-op jobs/s, submit -> SUCCEEDED, through the whole suite: the jobs, queue and
   VM services and 1, 2 and 4 workers as real processes (``tests/deployment.py``, SQLite in a
   temp directory, a fresh suite per worker count). Jobs are submitted by 8 client threads;
   the clock runs from the first submit to the moment every job is SUCCEEDED.
2. Submit-to-start latency p50/p99 with an idle worker: jobs submitted one at a time, each
   after the previous one ended; start_time - create_time as the services recorded them.
3. Worker RSS with 10,000 and 100,000 tracked executions: a fresh interpreter (the worker's
   imports) holding an ``ExecutionTracker`` of that many ended executions; VmRSS from
   /proc/self/status before and after.

    python -m bench.worker_bench                      # mock workers (no-op), 400 jobs per run
    python -m bench.worker_bench --worker-type process  # each job is the process `true`
    python -m bench.worker_bench --quick              # 150 jobs per run, 40 latency samples

It prints; it does not assert.
"""

from __future__ import annotations

import argparse
import gc
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from blixard.common.v1 import job_spec_pb2
from blixard.jobs.v1 import jobs_service_pb2 as pb
from blixard.jobs.v1 import jobs_service_pb2_grpc as pb_grpc
from blixard.queue.v1 import queue_service_pb2 as qpb
from blixard.queue.v1 import queue_service_pb2_grpc as qpb_grpc

from bench.common import Phases, Summary, machine_facts, say, table
from tests.conftest import free_port
from tests.deployment import ROOT, Deployment

TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}
CALL_TIMEOUT = 30.0
SUBMIT_CLIENTS = 8
SLOTS = 2


@dataclass(frozen=True)
class Run:
    workers: int
    jobs: int
    seconds: float
    failed: int
    worker_rss_kib: list[int]

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds


# ---- the suite ----------------------------------------------------------------------------


@contextmanager
def suite(workers: int, worker_type: str) -> Iterator[Deployment]:
    with tempfile.TemporaryDirectory(prefix="worker-bench-") as workdir:
        ports = (free_port(), free_port(), free_port())
        deployment = Deployment.start(
            Path(workdir),
            ports=ports,
            workers=workers,
            extra_env={
                "WORKER_TYPE": worker_type,
                "WORKER_SLOTS": str(SLOTS),
                "WORKER_JOBS_ADDRESS": f"127.0.0.1:{ports[0]}",
                "WORKER_LEASE_SECONDS": "30",
                "WORKER_POLL_WAIT": "2",  # a long poll; short so the suite stops quickly
                "BLIXARD_LOG_LEVEL": "warning",
            },
        )
        try:
            wait_for_workers(deployment, workers)
            yield deployment
        finally:
            deployment.stop()


def wait_for_workers(deployment: Deployment, count: int) -> None:
    """Until every worker has registered (a worker process takes a second to import)."""
    with grpc.insecure_channel(deployment.queue) as channel:
        stub = qpb_grpc.QueueServiceStub(channel)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            workers = stub.ListWorkers(qpb.ListWorkersRequest(), timeout=5).workers
            if len(workers) >= count:
                return
            time.sleep(0.1)
    raise TimeoutError(f"{count} workers did not register within 30 s")


def noop_spec(label: str) -> job_spec_pb2.JobSpec:
    return job_spec_pb2.JobSpec(command=["true"], labels={"bench": label}, max_attempts=1)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# ---- 1. throughput ------------------------------------------------------------------------


def throughput(workers: int, jobs: int, worker_type: str) -> Run:
    with suite(workers, worker_type) as deployment:
        label = f"run-{workers}"
        with grpc.insecure_channel(deployment.jobs) as channel:
            stub = pb_grpc.JobServiceStub(channel)
            # Warm up the path (first connections, first SQLite pages) with a few jobs.
            warm = [submit(stub, "warm") for _ in range(4)]
            for job_id in warm:
                wait_end(stub, job_id)

            started = time.perf_counter()
            with ThreadPoolExecutor(SUBMIT_CLIENTS) as pool:
                ids = list(pool.map(lambda _: submit(stub, label), range(jobs)))
            failed = 0
            for job_id in ids:  # in submit order; most are done by the time they are asked
                failed += wait_end(stub, job_id) != pb.JOB_STATE_SUCCEEDED
            elapsed = time.perf_counter() - started
        rss = [
            rss_kib(p.pid)
            for name, p in deployment.processes.items()
            if name.startswith("worker-") and p.poll() is None
        ]
    return Run(workers, jobs, elapsed, failed, rss)


def submit(stub: pb_grpc.JobServiceStub, label: str) -> str:
    request = pb.SubmitJobRequest(request_id=str(uuid.uuid4()), spec=noop_spec(label))
    return stub.SubmitJob(request, timeout=CALL_TIMEOUT).job.job_id


def wait_end(stub: pb_grpc.JobServiceStub, job_id: str) -> int:
    """The job's final state (WatchJob ends with the job)."""
    last = pb.JOB_STATE_UNSPECIFIED
    for update in stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=120):
        last = update.job.state
    return last


# ---- 2. submit-to-start latency ------------------------------------------------------------


def latency(samples: int, worker_type: str) -> tuple[Summary, Summary]:
    """(submit -> start, submit -> end) as the services recorded them, one job at a time."""
    to_start: list[float] = []
    to_end: list[float] = []
    with suite(1, worker_type) as deployment, grpc.insecure_channel(deployment.jobs) as channel:
        stub = pb_grpc.JobServiceStub(channel)
        for i in range(samples + 5):
            job_id = submit(stub, "latency")
            wait_end(stub, job_id)
            job = stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=CALL_TIMEOUT).job
            if i >= 5:  # the first few warm the path up
                created = job.create_time.ToNanoseconds()
                to_start.append((job.start_time.ToNanoseconds() - created) / 1e9)
                to_end.append((job.end_time.ToNanoseconds() - created) / 1e9)
            time.sleep(0.05)  # the worker is idle again: back in its long poll
    return Summary.of(to_start), Summary.of(to_end)


# ---- 3. RSS of a tracker ------------------------------------------------------------------


def tracker_rss(entries: int) -> tuple[int, int]:
    """(VmRSS before, after) in KiB, measured in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.worker_bench", "--tracker-child", str(entries)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    before, after = result.stdout.split()
    return int(before), int(after)


def tracker_child(entries: int) -> None:
    # The worker's own imports first, so "before" is a worker with an empty tracker.
    from services.worker import bootstrap  # noqa: F401
    from services.worker.tracker import ExecutionTracker, Outcome, TrackerLimits

    tracker = ExecutionTracker(TrackerLimits(max_entries=entries))
    gc.collect()
    before = rss_kib(os.getpid())
    outcomes = [Outcome.SUCCEEDED] * 8 + [Outcome.FAILED, Outcome.CANCELLED]
    for i in range(entries):
        execution = secrets.token_hex(8)
        tracker.start(execution, str(uuid.uuid4()), 1, 1)
        outcome = outcomes[i % len(outcomes)]
        tracker.finish(
            execution,
            outcome,
            exit_code=0 if outcome is Outcome.SUCCEEDED else 1,
            error="" if outcome is Outcome.SUCCEEDED else "exited with 1",
            output_bytes=i,
        )
    gc.collect()
    assert len(tracker) == entries
    print(before, rss_kib(os.getpid()))


# ---- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker_bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer jobs and samples")
    parser.add_argument("--jobs", type=int, help="jobs per throughput run")
    parser.add_argument("--samples", type=int, help="jobs timed one at a time for latency")
    parser.add_argument("--worker-type", choices=("mock", "process"), default="mock")
    parser.add_argument("--tracker-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tracker_child:
        tracker_child(args.tracker_child)
        return 0

    jobs = args.jobs or (150 if args.quick else 400)
    samples = args.samples or (40 if args.quick else 100)
    say("Blixard worker benchmark" + (" (--quick)" if args.quick else ""))
    say(table(["fact", "value"], machine_facts()))
    what = "`true` jobs" if args.worker_type == "process" else "no-op jobs"
    say(
        f"workers of type {args.worker_type!r} ({what}), {SLOTS} slots each; SQLite; "
        f"{SUBMIT_CLIENTS} submit clients; {jobs} jobs per run; {samples} latency samples"
    )
    phases = Phases()
    total = time.perf_counter()

    runs: list[Run] = []
    for workers in (1, 2, 4):
        with phases.phase(f"throughput with {workers} worker(s)"):
            runs.append(throughput(workers, jobs, args.worker_type))
    with phases.phase("submit-to-start latency, one idle worker"):
        start, end = latency(samples, args.worker_type)
    sizes = (10_000, 100_000)
    rss: dict[int, tuple[int, int]] = {}
    for size in sizes:
        with phases.phase(f"tracker RSS with {size:,} executions"):
            rss[size] = tracker_rss(size)

    say("")
    say(
        table(
            ["workers", "jobs", "seconds", "jobs/s", "not SUCCEEDED", "worker RSS (MiB)"],
            [
                [
                    r.workers,
                    r.jobs,
                    r.seconds,
                    r.rate,
                    r.failed,
                    ", ".join(f"{k / 1024:.0f}" for k in r.worker_rss_kib),
                ]
                for r in runs
            ],
            title="End-to-end no-op jobs/s (submit -> SUCCEEDED, whole suite)",
        )
    )
    say("")
    say(
        table(
            ["from submit to", "samples", "p50 ms", "p99 ms", "mean ms", "max ms"],
            [
                ["start (leased)", start.count, start.p50, start.p99, start.mean, start.max],
                ["end (SUCCEEDED)", end.count, end.p50, end.p99, end.mean, end.max],
            ],
            title="Latency with an idle worker (service timestamps)",
        )
    )
    say("")
    say(
        table(
            ["tracked executions", "RSS before (MiB)", "RSS after (MiB)", "bytes per entry"],
            [
                [
                    size,
                    before / 1024,
                    after / 1024,
                    (after - before) * 1024 / size,
                ]
                for size, (before, after) in rss.items()
            ],
            title="Worker RSS holding the execution tracker",
        )
    )
    say("")
    say(f"total {time.perf_counter() - total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
