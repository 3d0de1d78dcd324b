"""What an acknowledged cancel guarantees, in-process: jobs service, queue and a real
process worker. A job whose cancel CancelJob confirmed before a worker was leased it never
starts its process; a new generation of a job never runs beside its still-leased old one."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from blixard.common.v1 import job_spec_pb2
from blixard.jobs.v1 import jobs_service_pb2 as jpb
from blixard.queue.v1 import queue_service_pb2 as qpb

from services.common import pbtime
from services.jobs import bootstrap as jobs_bootstrap
from services.jobs import config as jobs_config
from services.jobs.domain import Job
from services.jobs.queue_client import CALL_TIMEOUT, GrpcQueue
from services.queue import bootstrap as queue_bootstrap
from services.queue import config as queue_config
from services.worker import bootstrap as worker_bootstrap
from services.worker import config as worker_config
from tests.conftest import free_port
from tests.grpc.conftest import (
    RPC_TIMEOUT,
    Stack,
    eventually,
    jobs_env,
    queue_env,
    spec,
    start,
    wait_for_state,
)


class SlowCancels:
    """The jobs service's queue port, each cancel taking ``delay`` seconds more to reach
    the queue (a loaded network, a busy relay): the window in which the queue still
    hands out a job the user has cancelled."""

    def __init__(self, queue: GrpcQueue, delay: float) -> None:
        self.queue = queue
        self.delay = delay

    def enqueue(self, job: Job) -> None:
        self.queue.enqueue(job)

    def enqueue_many(self, jobs: list[Job]) -> list[Exception | None]:
        return self.queue.enqueue_many(jobs)

    def cancel(self, job_id: str, generation: int, timeout: float = CALL_TIMEOUT) -> None:
        time.sleep(self.delay)
        self.queue.cancel(job_id, generation, timeout)


class ClaimLog(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Records, for each job a worker was leased, when the Claim that brought it was
    sent: a lease granted to a claim sent at t was granted after t."""

    def __init__(self) -> None:
        self.sent_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        sent = time.time()
        outcome = continuation(details, request)
        if details.method.endswith("/Claim"):
            try:
                response = outcome.result()
            except grpc.RpcError:
                return outcome
            with self._lock:
                for lease in response.leases:
                    self.sent_at.setdefault(lease.item.job_id, sent)
        return outcome


def start_suite(stack: Stack, cancel_delay: float, claims: ClaimLog) -> None:
    jobs_port = free_port()
    stack.queue = start(queue_bootstrap.build(queue_config.load(queue_env(stack.tmp, jobs_port))))
    port = SlowCancels(GrpcQueue(stack.channel(stack.queue_target)), cancel_delay)
    # A generous deadline for the queue's confirmation: this machine may be loaded.
    env = jobs_env(stack.tmp, jobs_port, stack.queue.port, {"JOBS_CANCEL_TIMEOUT": "10"})
    stack.jobs = start(jobs_bootstrap.build(jobs_config.load(env), queue=port))
    config = worker_config.load(
        {
            "WORKER_ID": "cancel-test-worker",
            "WORKER_TYPE": "process",
            "WORKER_SLOTS": "2",
            "WORKER_QUEUE_ADDRESS": stack.queue_target,
            "WORKER_LEASE_SECONDS": "6",
            "WORKER_POLL_WAIT": "1",
            "WORKER_DRAIN_GRACE": "2",
            "WORKER_KILL_GRACE": "1",
            "WORKER_DEFAULT_TIMEOUT": "30",
        }
    )
    channel = grpc.intercept_channel(stack.channel(stack.queue_target), claims)
    stack.worker = worker_bootstrap.build(config, channel)
    stack.worker_thread = threading.Thread(target=stack.worker.run, daemon=True)
    stack.worker_thread.start()


def test_a_job_whose_cancel_was_confirmed_before_it_was_leased_never_starts(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    stack = make_stack()
    claims = ClaimLog()
    start_suite(stack, cancel_delay=0.15, claims=claims)
    jobs = stack.jobs_stub()
    started = tmp_path / "started"
    started.mkdir()
    # Each job marks that its process started; two slots, so most of them wait queued.
    submitted = [
        jobs.SubmitJob(
            jpb.SubmitJobRequest(
                request_id=f"r-{n}",
                spec=spec("sh", "-c", 'touch "$0"; sleep 0.2', str(started / f"job-{n}")),
            ),
            timeout=RPC_TIMEOUT,
        ).job.job_id
        for n in range(24)
    ]
    acknowledged: dict[str, float] = {}  # job id -> when its CancelJob answered
    # The latest first, while the worker claims the earliest: they meet in the middle.
    for job_id in reversed(submitted[4::2]):
        try:
            answer = jobs.CancelJob(jpb.CancelJobRequest(job_id=job_id), timeout=RPC_TIMEOUT)
        except grpc.RpcError as exc:  # it ran and ended before its turn came
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
            continue
        acknowledged[job_id] = time.time()
        assert answer.queue_confirmed, job_id
        assert answer.job.state == jpb.JOB_STATE_CANCELLED
    assert len(acknowledged) >= 3
    kept = [job_id for job_id in submitted if job_id not in acknowledged]
    for job_id in kept:
        wait_for_state(jobs, job_id, {jpb.JOB_STATE_SUCCEEDED}, timeout=30)
    assert stack.worker is not None
    eventually(lambda: stack.worker.active == 0, 10, "the worker to finish")

    # Leased to a claim sent after the cancel was confirmed: what must never happen.
    leased_after = sorted(
        job_id
        for job_id, at in acknowledged.items()
        if job_id in claims.sent_at and claims.sent_at[job_id] > at
    )
    assert leased_after == [], f"{len(leased_after)} of {len(acknowledged)}"
    ran = {submitted[int(path.name.removeprefix("job-"))] for path in started.iterdir()}
    assert set(kept) <= ran  # the test saw jobs start
    for job_id in ran & set(acknowledged):  # a cancelled job that ran had been leased first
        assert claims.sent_at[job_id] <= acknowledged[job_id]
    assert len(ran & set(acknowledged)) < len(acknowledged)  # most never started


def test_a_retried_job_never_runs_beside_its_still_leased_old_execution(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack().start_pair()
    jobs, queue = stack.jobs_stub(), stack.queue_stub()
    job = jobs.SubmitJob(
        jpb.SubmitJobRequest(request_id="r-retry", spec=spec("true")), timeout=RPC_TIMEOUT
    ).job

    def claim(worker_id: str, wait: float) -> list[qpb.Lease]:
        request = qpb.ClaimRequest(
            worker_id=worker_id,
            worker_type="process",
            max_items=1,
            lease_duration=pbtime.duration(30),
            wait=pbtime.duration(wait),
        )
        return list(queue.Claim(request, timeout=RPC_TIMEOUT + wait).leases)

    [old] = eventually(lambda: claim("w-old", 1), 10, "the job to be claimed")
    jobs.CancelJob(jpb.CancelJobRequest(job_id=job.job_id), timeout=RPC_TIMEOUT)
    retried = jobs.RetryJob(jpb.RetryJobRequest(job_id=job.job_id), timeout=RPC_TIMEOUT).job
    assert retried.generation == 2

    # Generation 1 still holds its lease: no worker is handed generation 2 meanwhile.
    assert claim("w-new", 2) == []
    beat = queue.Heartbeat(qpb.HeartbeatRequest(lease_token=old.lease_token), timeout=RPC_TIMEOUT)
    assert beat.cancel_requested
    assert claim("w-new", 0.5) == []
    assert wait_for_state(jobs, job.job_id, {jpb.JOB_STATE_PENDING}).generation == 2

    queue.Complete(
        qpb.CompleteRequest(lease_token=old.lease_token, outcome=job_spec_pb2.OUTCOME_CANCELLED),
        timeout=RPC_TIMEOUT,
    )

    [new] = claim("w-new", 5)
    assert (new.item.job_id, new.item.generation) == (job.job_id, 2)
    wait_for_state(jobs, job.job_id, {jpb.JOB_STATE_RUNNING})


def test_a_cancel_the_queue_cannot_confirm_is_answered_in_time_and_says_so(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack().start_jobs()  # its queue address: a port nobody listens on
    jobs = stack.jobs_stub()
    job = jobs.SubmitJob(
        jpb.SubmitJobRequest(request_id="r-down", spec=spec("true")), timeout=RPC_TIMEOUT
    ).job

    started = time.monotonic()
    answer = jobs.CancelJob(jpb.CancelJobRequest(job_id=job.job_id), timeout=RPC_TIMEOUT)

    assert time.monotonic() - started < 3  # JOBS_CANCEL_TIMEOUT (1 s), then the answer
    assert not answer.queue_confirmed
    assert answer.job.state == jpb.JOB_STATE_CANCELLED
