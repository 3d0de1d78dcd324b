"""The worker factory, both ways: built in-process from channels it is handed
(``bootstrap.build``), and from addresses in its settings (``bootstrap.from_environment``).
Either way it runs a job and streams its output to the jobs service."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from blixard.jobs.v1 import jobs_service_pb2 as jpb

from services.worker import bootstrap, config
from services.worker.runner import Worker
from services.worker.tracker import Outcome
from tests.grpc.conftest import (
    RPC_TIMEOUT,
    TOKENS,
    WORKER_TOKEN,
    Stack,
    spec,
    wait_for_state,
)

TERMINAL = {jpb.JOB_STATE_SUCCEEDED, jpb.JOB_STATE_FAILED, jpb.JOB_STATE_CANCELLED}
SCRIPT = "echo out; echo err >&2; exit 0"


def settings(worker_id: str, **extra: str) -> config.WorkerConfig:
    return config.load(
        {
            "WORKER_ID": worker_id,
            "WORKER_TYPE": "process",
            "WORKER_LEASE_SECONDS": "6",
            "WORKER_POLL_WAIT": "1",
            **extra,
        }
    )


@pytest.fixture
def run_worker() -> Iterator[list[Worker]]:
    workers: list[tuple[Worker, threading.Thread]] = []

    def run(worker: Worker) -> Worker:
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        workers.append((worker, thread))
        return worker

    yield run  # type: ignore[misc]
    for worker, thread in workers:
        worker.stop()
        thread.join(timeout=15)
        assert not thread.is_alive()


def run_one_job(stack: Stack, worker: Worker, token: str | None = None) -> jpb.Job:
    jobs = stack.jobs_stub(token)
    job = jobs.SubmitJob(
        jpb.SubmitJobRequest(spec=spec("sh", "-c", SCRIPT)), timeout=RPC_TIMEOUT
    ).job
    done = wait_for_state(jobs, job.job_id, TERMINAL)
    assert done.state == jpb.JOB_STATE_SUCCEEDED, done
    output = jobs.GetJobOutput(jpb.GetJobOutputRequest(job_id=job.job_id), timeout=RPC_TIMEOUT)
    streamed = b"".join(chunk.data for chunk in output)
    assert sorted(streamed.splitlines()) == [b"err", b"out"]
    assert done.output_bytes == len(streamed) == 8
    [entry] = worker.tracker.find(job.job_id)
    assert (entry.outcome, entry.exit_code, entry.output_bytes) == (Outcome.SUCCEEDED, 0, 8)
    return done


def test_built_from_channels_it_runs_a_job(make_stack, run_worker) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack().start_pair()
    worker = run_worker(
        bootstrap.build(
            settings("factory-channels"),
            stack.channel(stack.queue_target),
            jobs_channel=stack.channel(stack.jobs_target),
        )
    )

    done = run_one_job(stack, worker)

    assert done.worker_id == "factory-channels"


def test_built_from_the_environment_it_runs_a_job_with_its_token(make_stack, run_worker) -> None:  # type: ignore[no-untyped-def]
    # Every service checks tokens: the worker must send its own to the queue and to jobs.
    stack: Stack = make_stack(dict(TOKENS)).start_pair()
    environment = settings(
        "factory-environment",
        BLIXARD_WORKER_TOKEN=WORKER_TOKEN,
        WORKER_QUEUE_ADDRESS=stack.queue_target,
        WORKER_JOBS_ADDRESS=stack.jobs_target,
    )
    worker = run_worker(bootstrap.from_environment(environment))

    done = run_one_job(stack, worker, TOKENS["BLIXARD_CLIENT_TOKEN"])

    assert done.worker_id == "factory-environment"
