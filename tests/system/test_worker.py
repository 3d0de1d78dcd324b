"""Workers as real processes with real jobs: retries to the last attempt, cancellation that
leaves no process behind, SIGKILL and SIGTERM of a worker in the middle of a job, and output
followed while the job runs.

The suite runs once for the module with no worker; each test starts the workers it needs
(leases of 3 s, so a heartbeat every second) and stops them at its end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from blixard.common.v1 import job_spec_pb2
from blixard.jobs.v1 import jobs_service_pb2 as pb
from blixard.jobs.v1 import jobs_service_pb2_grpc as pb_grpc
from blixard.queue.v1 import queue_service_pb2 as qpb
from blixard.queue.v1 import queue_service_pb2_grpc as qpb_grpc

from tests.conftest import free_port
from tests.deployment import ROOT, Deployment, stop_process

TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}
HEARTBEAT = 1.0  # WORKER_LEASE_SECONDS=3 (tests/deployment.py) / 3


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    if Deployment.from_environment() is not None:
        pytest.skip("these tests start and signal their own workers: they need a local suite")
    ports = (free_port(), free_port(), free_port())
    running = Deployment.start(
        tmp_path_factory.mktemp("workers"),
        ports=ports,
        workers=0,
        extra_env={
            "WORKER_JOBS_ADDRESS": f"127.0.0.1:{ports[0]}",
            "WORKER_KILL_GRACE": "2",
            "QUEUE_RETRY_BASE_SECONDS": "0.2",
        },
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def jobs(suite: Deployment) -> Iterator[pb_grpc.JobServiceStub]:
    with grpc.insecure_channel(suite.jobs) as channel:
        yield pb_grpc.JobServiceStub(channel)


@pytest.fixture(scope="module")
def queue(suite: Deployment) -> Iterator[qpb_grpc.QueueServiceStub]:
    with grpc.insecure_channel(suite.queue) as channel:
        yield qpb_grpc.QueueServiceStub(channel)


WorkerStarter = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def start_worker(suite: Deployment, queue: qpb_grpc.QueueServiceStub) -> Iterator[WorkerStarter]:
    """Start a worker process and wait until the queue knows it; stopped after the test."""
    started: list[subprocess.Popen[bytes]] = []

    def start(worker_id: str, **env: str) -> subprocess.Popen[bytes]:
        process = suite.start_worker(worker_id, **env)
        started.append(process)
        until(lambda: registered(queue, worker_id), 20, f"{worker_id} to register")
        return process

    yield start
    for process in started:
        stop_process(process)


def registered(queue: qpb_grpc.QueueServiceStub, worker_id: str) -> bool:
    workers = queue.ListWorkers(qpb.ListWorkersRequest(), timeout=5).workers
    return any(w.worker_id == worker_id and w.state == qpb.WORKER_STATE_ONLINE for w in workers)


def until(probe: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def submit(jobs: pb_grpc.JobServiceStub, script: str, **spec: object) -> str:
    request = pb.SubmitJobRequest(
        request_id=str(uuid.uuid4()),
        spec=job_spec_pb2.JobSpec(command=["sh", "-c", script], **spec),  # type: ignore[arg-type]
    )
    return jobs.SubmitJob(request, timeout=10).job.job_id


def get(jobs: pb_grpc.JobServiceStub, job_id: str) -> pb.Job:
    return jobs.GetJob(pb.GetJobRequest(job_id=job_id), timeout=5).job


def wait_for(jobs: pb_grpc.JobServiceStub, job_id: str, states: set[int], timeout: float) -> pb.Job:
    job = until(
        lambda: (j := get(jobs, job_id)).state in states and j,
        timeout,
        f"job {job_id} to reach {[pb.JobState.Name(s) for s in states]}",  # type: ignore[arg-type]
    )
    return job  # type: ignore[return-value]


def running_on(jobs: pb_grpc.JobServiceStub, job_id: str, timeout: float = 20) -> str:
    return wait_for(jobs, job_id, {pb.JOB_STATE_RUNNING}, timeout).worker_id


def events(jobs: pb_grpc.JobServiceStub, job_id: str) -> list[pb.JobEvent]:
    return list(jobs.ListJobEvents(pb.ListJobEventsRequest(job_id=job_id), timeout=5).events)


def processes_with(marker: str) -> list[int]:
    """Live processes whose environment carries ``marker`` (a job and all its children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() not in (entry / "environ").read_bytes():
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(int(entry.name))
    return found


# ---- the tests ----------------------------------------------------------------------------


def test_a_job_that_exits_3_fails_with_exit_code_3_after_its_attempts(
    jobs: pb_grpc.JobServiceStub, start_worker: WorkerStarter
) -> None:
    start_worker("exit3-worker")
    job_id = submit(jobs, "echo trying; exit 3", max_attempts=2)

    done = wait_for(jobs, job_id, TERMINAL, 30)

    assert done.state == pb.JOB_STATE_FAILED
    assert (done.exit_code, done.attempts) == (3, 2)
    assert done.output_tail == "trying\n"
    assert done.error == "exited with 3"
    running = [e for e in events(jobs, job_id) if e.state == pb.JOB_STATE_RUNNING]
    assert len(running) == 2


def test_a_cancelled_job_stops_within_a_heartbeat_and_leaves_no_process(
    jobs: pb_grpc.JobServiceStub,
    queue: qpb_grpc.QueueServiceStub,
    start_worker: WorkerStarter,
) -> None:
    start_worker("cancel-worker")
    marker = f"BLIXARD_TEST_MARKER=cancel-{uuid.uuid4()}"
    name, _, value = marker.partition("=")
    job_id = submit(jobs, "sleep 300; echo never", env={name: value})
    running_on(jobs, job_id)
    until(lambda: len(processes_with(marker)) == 2, 10, "the job's sh and sleep to run")

    cancelled_at = time.monotonic()
    jobs.CancelJob(pb.CancelJobRequest(job_id=job_id, reason="not needed"), timeout=5)
    until(lambda: not processes_with(marker), 10, "every process of the job to end")
    stopped_after = time.monotonic() - cancelled_at

    # The worker learns it at its next heartbeat (within 1 s), then stops the group.
    assert stopped_after < HEARTBEAT + 1.0, f"stopped {stopped_after:.2f}s after the cancel"
    job = get(jobs, job_id)
    assert job.state == pb.JOB_STATE_CANCELLED
    item = until(
        lambda: (
            (i := queue.GetItem(qpb.GetItemRequest(job_id=job_id), timeout=5).item).state
            == qpb.ITEM_STATE_CANCELLED
            and i
        ),
        5,
        "the worker to report the cancel",
    )
    assert item.cancel_requested  # type: ignore[attr-defined]


def test_after_sigkill_of_its_worker_another_worker_finishes_the_job(
    suite: Deployment, jobs: pb_grpc.JobServiceStub, start_worker: WorkerStarter
) -> None:
    doomed = start_worker("doomed-worker")
    job_id = submit(jobs, "sleep 5; echo finished")
    assert running_on(jobs, job_id) == "doomed-worker"
    start_worker("rescue-worker")

    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=10)

    done = wait_for(jobs, job_id, TERMINAL, 30)
    assert done.state == pb.JOB_STATE_SUCCEEDED
    assert done.worker_id == "rescue-worker"
    assert done.attempts == 2, "the killed worker's attempt expired and counts"
    assert done.output_tail == "finished\n"


def test_sigterm_lets_a_short_job_finish_then_the_worker_exits_0(
    jobs: pb_grpc.JobServiceStub, start_worker: WorkerStarter
) -> None:
    worker = start_worker("polite-worker")
    marker = f"BLIXARD_TEST_MARKER=short-{uuid.uuid4()}"
    name, _, value = marker.partition("=")
    job_id = submit(jobs, "sleep 2; echo done", env={name: value})
    # Running on the worker (the queue may report RUNNING to jobs a little later).
    until(lambda: processes_with(marker), 20, "the job to start")

    worker.send_signal(signal.SIGTERM)

    assert worker.wait(timeout=20) == 0
    # It was completed before the worker exited; the status takes one more hop to jobs.
    done = wait_for(jobs, job_id, TERMINAL, 5)
    assert done.state == pb.JOB_STATE_SUCCEEDED
    assert (done.worker_id, done.attempts, done.output_tail) == ("polite-worker", 1, "done\n")


def test_sigterm_of_an_idle_worker_in_a_long_poll_drains_and_exits_at_once(
    suite: Deployment, start_worker: WorkerStarter
) -> None:
    """Its claim waits up to WORKER_POLL_WAIT for work: the stop does not wait for it."""
    worker = start_worker("idle-worker", WORKER_POLL_WAIT="20")
    time.sleep(1)  # registered, and now in its long poll

    worker.send_signal(signal.SIGTERM)
    signalled = time.monotonic()

    until(lambda: "draining" in suite.log("idle-worker"), 2, "the worker to say it drains")
    assert time.monotonic() - signalled < 1.5
    assert worker.wait(timeout=5) == 0
    assert time.monotonic() - signalled < 3
    assert "Traceback" not in suite.log("idle-worker")


def test_sigterm_past_the_drain_grace_releases_the_job_to_another_worker(
    suite: Deployment, jobs: pb_grpc.JobServiceStub, start_worker: WorkerStarter
) -> None:
    leaving = start_worker("leaving-worker", WORKER_DRAIN_GRACE="1")
    job_id = submit(jobs, "sleep 4; echo finished")
    assert running_on(jobs, job_id) == "leaving-worker"
    start_worker("staying-worker")

    leaving.send_signal(signal.SIGTERM)

    assert leaving.wait(timeout=20) == 0
    done = wait_for(jobs, job_id, TERMINAL, 30)
    assert done.state == pb.JOB_STATE_SUCCEEDED
    assert done.worker_id == "staying-worker"
    assert done.attempts == 1, "a released attempt is not counted"
    reasons = [e.reason for e in events(jobs, job_id) if e.state == pb.JOB_STATE_QUEUED]
    assert any("released" in r and "shutting down" in r for r in reasons), reasons
    assert "releasing its lease" in suite.log("leaving-worker")


def test_output_is_followed_live_while_the_job_runs(
    suite: Deployment, jobs: pb_grpc.JobServiceStub, start_worker: WorkerStarter
) -> None:
    start_worker("chatty-worker")
    # The first line waits a second: the followers below must be following before it is
    # written (a job now starts within milliseconds of its submit).
    # Lines 1.5 s apart: 3 s from the first to the last, twice what the checks below ask,
    # so a follower's half-second send interval under load cannot make it look batched.
    script = "sleep 1; for i in 1 2 3; do echo line $i; sleep 1.5; done; exit 3"
    job_id = submit(jobs, script, max_attempts=1)
    arrivals: list[tuple[float, bytes]] = []

    def follow() -> None:
        request = pb.GetJobOutputRequest(job_id=job_id, follow=True)
        for chunk in jobs.GetJobOutput(request, timeout=30):
            arrivals.append((time.monotonic(), chunk.data))

    reader = threading.Thread(target=follow)
    reader.start()
    # blixctl follows the same job from a shell: the output on stdout, then the exit code.
    blixctl = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "watch",
            "--follow",
            job_id,
            "--address",
            suite.jobs,
        ],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("BLIXCTL_")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert blixctl.stdout is not None
    first_line = blixctl.stdout.readline()
    first_line_at = time.monotonic()
    reader.join(timeout=30)
    rest, errors = blixctl.communicate(timeout=30)
    ended_at = time.monotonic()

    assert b"".join(d for _, d in arrivals) == b"line 1\nline 2\nline 3\n"
    line_times = {d: t for t, d in arrivals}
    first = next(t for t, d in arrivals if b"line 1" in d)
    last = next(t for t, d in arrivals if b"line 3" in d)
    assert last - first > 1.5, f"the lines came as they were written, not at the end: {line_times}"
    assert first_line == b"line 1\n"
    assert ended_at - first_line_at > 1.5, "blixctl printed line 1 while the job ran"
    assert first_line + rest == b"line 1\nline 2\nline 3\n"
    assert blixctl.returncode == 1, errors
    assert b"FAILED (exit code 3)" in errors
    job = get(jobs, job_id)
    assert (job.state, job.output_bytes) == (pb.JOB_STATE_FAILED, 21)
