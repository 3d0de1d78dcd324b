"""A real worker against a real jobs service and queue: a job that ends before its output's
first send costs no AppendJobOutput call (its output travels with its completion), yet a
client reads that output exactly as it would have streamed; a longer job still streams."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from blixard.common.v1 import job_spec_pb2
from blixard.jobs.v1 import jobs_service_pb2 as jpb
from blixard.queue.v1 import queue_service_pb2 as qpb

from services.cli import main as blixctl
from services.common.errors import describe
from services.worker import bootstrap as worker_bootstrap
from services.worker import config as worker_config
from tests.grpc.conftest import RPC_TIMEOUT, Stack, eventually, spec, wait_for_state

TERMINAL = {jpb.JOB_STATE_SUCCEEDED, jpb.JOB_STATE_FAILED, jpb.JOB_STATE_CANCELLED}


class CallCounter(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Counts the calls made on a channel, by method name."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        self.calls[details.method.rsplit("/", 1)[-1]] += 1
        return continuation(details, request)


@pytest.fixture
def running(make_stack: Callable[..., Stack]) -> Iterator[tuple[Stack, CallCounter, list[Any]]]:
    """A jobs service and its queue; ``start(worker_type)`` starts a worker whose calls to
    the jobs service are counted."""
    stack = make_stack().start_pair()
    counter = CallCounter()
    workers: list[Any] = []
    yield stack, counter, workers
    for worker, thread in workers:
        worker.stop()
        thread.join(timeout=15)


def start_worker(stack: Stack, counter: CallCounter, workers: list[Any], kind: str) -> None:
    config = worker_config.load(
        {
            "WORKER_ID": f"inline-{kind}",
            "WORKER_TYPE": kind,
            "WORKER_SLOTS": "2",
            "WORKER_QUEUE_ADDRESS": stack.queue_target,
            "WORKER_JOBS_ADDRESS": stack.jobs_target,
            "WORKER_LEASE_SECONDS": "6",
            "WORKER_POLL_WAIT": "1",
            "WORKER_DRAIN_GRACE": "2",
            "WORKER_KILL_GRACE": "1",
            "WORKER_MOCK_DELAY": "0",
        }
    )
    jobs_channel = grpc.intercept_channel(stack.channel(stack.jobs_target), counter)
    worker = worker_bootstrap.build(
        config, stack.channel(stack.queue_target), jobs_channel=jobs_channel
    )
    thread = threading.Thread(target=worker.run, name=f"inline-{kind}", daemon=True)
    thread.start()
    workers.append((worker, thread))


def submit(stack: Stack, *command: str) -> str:
    request = jpb.SubmitJobRequest(spec=spec(*command, max_attempts=1))
    return stack.jobs_stub().SubmitJob(request, timeout=RPC_TIMEOUT).job.job_id


def output_of(stack: Stack, job_id: str, follow: bool = False) -> bytes:
    request = jpb.GetJobOutputRequest(job_id=job_id, follow=follow)
    return b"".join(c.data for c in stack.jobs_stub().GetJobOutput(request, timeout=RPC_TIMEOUT))


def test_a_short_job_makes_no_output_call_yet_its_output_is_there(
    running: tuple[Stack, CallCounter, list[Any]], capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    stack, counter, workers = running
    start_worker(stack, counter, workers, "process")
    job_id = submit(stack, "sh", "-c", "echo hi")

    done = wait_for_state(stack.jobs_stub(), job_id, TERMINAL)

    assert done.state == jpb.JOB_STATE_SUCCEEDED
    assert counter.calls["AppendJobOutput"] == 0, counter.calls
    assert done.output_bytes == 3
    assert output_of(stack, job_id) == b"hi\n"
    assert output_of(stack, job_id, follow=True) == b"hi\n"  # and the follow ends
    capsysbinary.readouterr()
    code = blixctl.main(["watch", job_id, "--follow", "--address", stack.jobs_target])
    assert (code, capsysbinary.readouterr().out) == (0, b"hi\n")


def test_mock_jobs_make_no_output_call(running: tuple[Stack, CallCounter, list[Any]]) -> None:
    stack, counter, workers = running
    start_worker(stack, counter, workers, "mock")
    job_ids = [submit(stack, "true") for _ in range(5)]

    for job_id in job_ids:
        done = wait_for_state(stack.jobs_stub(), job_id, TERMINAL)
        assert (done.state, done.output_bytes) == (jpb.JOB_STATE_SUCCEEDED, 13)
        assert output_of(stack, job_id) == b"mock success\n"
    assert counter.calls["AppendJobOutput"] == 0, counter.calls


def test_a_job_without_output_stores_none_and_counts_zero(
    running: tuple[Stack, CallCounter, list[Any]],
) -> None:
    stack, counter, workers = running
    start_worker(stack, counter, workers, "process")
    job_id = submit(stack, "true")

    done = wait_for_state(stack.jobs_stub(), job_id, TERMINAL)

    assert (done.state, done.output_bytes) == (jpb.JOB_STATE_SUCCEEDED, 0)
    assert output_of(stack, job_id) == b""
    assert counter.calls["AppendJobOutput"] == 0, counter.calls


def test_a_longer_job_still_streams_its_output_while_it_runs(
    running: tuple[Stack, CallCounter, list[Any]],
) -> None:
    stack, counter, workers = running
    start_worker(stack, counter, workers, "process")
    job_id = submit(stack, "sh", "-c", "echo first; sleep 2; echo second")
    received: list[tuple[bytes, int]] = []  # the data, and the job's state when it came
    ended = threading.Event()

    def follow() -> None:
        jobs = stack.jobs_stub()
        request = jpb.GetJobOutputRequest(job_id=job_id, follow=True)
        for chunk in jobs.GetJobOutput(request, timeout=30):
            state = jobs.GetJob(jpb.GetJobRequest(job_id=job_id), timeout=RPC_TIMEOUT).job.state
            received.append((chunk.data, state))
        ended.set()

    eventually(
        lambda: (
            stack.jobs_stub()
            .GetJob(jpb.GetJobRequest(job_id=job_id), timeout=RPC_TIMEOUT)
            .job.state
            == jpb.JOB_STATE_RUNNING
        ),
        10,
        "the job running",
    )
    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    started = time.monotonic()
    eventually(lambda: received, 5, "the first chunk")
    assert time.monotonic() - started < 1.8, "the first line came before the job ended"
    assert received[0] == (b"first\n", jpb.JOB_STATE_RUNNING)
    assert counter.calls["AppendJobOutput"] >= 1

    assert ended.wait(10), "the follow ends with the job"
    assert b"".join(data for data, _ in received) == b"first\nsecond\n"
    done = wait_for_state(stack.jobs_stub(), job_id, TERMINAL)
    assert (done.state, done.output_bytes) == (jpb.JOB_STATE_SUCCEEDED, 13)
    assert output_of(stack, job_id) == b"first\nsecond\n"


def test_a_total_below_the_tails_length_is_refused_by_both_services(
    running: tuple[Stack, CallCounter, list[Any]],
) -> None:
    stack, _, _ = running
    complete = qpb.CompleteRequest(
        lease_token="t",
        outcome=job_spec_pb2.OUTCOME_SUCCEEDED,
        output_tail_bytes=b"abc",
        total_output_bytes=2,
        execution_id="e" * 65,
    )
    with pytest.raises(grpc.RpcError) as caught:
        stack.queue_stub().Complete(complete, timeout=RPC_TIMEOUT)
    failure = describe(caught.value)
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {f for f, _ in failure.field_violations} == {"total_output_bytes", "execution_id"}

    update = jpb.UpdateJobStatusRequest(
        job_id=submit(stack, "true"),
        generation=1,
        sequence=1,
        state=jpb.JOB_STATE_SUCCEEDED,
        output_tail_bytes=b"abc",
        total_output_bytes=2,
        execution_id="e" * 65,
    )
    with pytest.raises(grpc.RpcError) as caught:
        stack.jobs_stub().UpdateJobStatus(update, timeout=RPC_TIMEOUT)
    failure = describe(caught.value)
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {f for f, _ in failure.field_violations} == {"total_output_bytes", "execution_id"}
