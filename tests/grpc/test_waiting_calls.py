"""Watch and follow streams hold a server thread each: past their share of the jobs
service's threads they are refused (and blixctl waits for a slot), so submits, status
reports and output appends always find a thread."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO

import grpc
import pytest
from blixard.jobs.v1 import jobs_service_pb2 as jpb
from blixard.jobs.v1 import jobs_service_pb2_grpc as jpb_grpc

from services.common.errors import describe
from tests.deployment import ROOT
from tests.grpc.conftest import Stack, eventually, spec

THREADS = {"JOBS_GRPC_THREADS": "8"}  # 4 may wait


def read_line(stream: IO[str], seconds: float = 30) -> str:
    """A line from a child's pipe; a TimeoutError after ``seconds`` rather than a hang."""
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(stream.readline).result(timeout=seconds)
    finally:
        pool.shutdown(wait=False)  # the child is killed on failure: its pipe then ends


def plain_stub(stack: Stack) -> jpb_grpc.JobServiceStub:
    """A stub on a plain channel: its streams can be cancelled (the traced ones cannot)."""
    channel = grpc.insecure_channel(stack.jobs_target)
    stack.channels.append(channel)
    return jpb_grpc.JobServiceStub(channel)


def open_watch(stub, job_id: str) -> Iterator[jpb.WatchJobResponse] | None:  # type: ignore[no-untyped-def]
    """A watch stream that sent its first message, or None when it was refused."""
    stream = stub.WatchJob(jpb.WatchJobRequest(job_id=job_id), timeout=120)
    try:
        next(stream)
    except grpc.RpcError as exc:
        assert describe(exc).reason == "TOO_MANY_WAITING_CALLS", exc
        return None
    return stream  # type: ignore[no-any-return]


def test_streams_past_their_slots_are_refused_naming_the_setting(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(THREADS).start_pair()  # no worker: the job stays queued
    stub = plain_stub(stack)
    job_id = stub.SubmitJob(jpb.SubmitJobRequest(spec=spec("true")), timeout=10).job.job_id
    streams = [open_watch(stub, job_id) for _ in range(4)]
    assert None not in streams

    with pytest.raises(grpc.RpcError) as refused:
        next(stub.WatchJob(jpb.WatchJobRequest(job_id=job_id), timeout=10))
    failure = describe(refused.value)
    assert failure.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert failure.reason == "TOO_MANY_WAITING_CALLS" and failure.retry_after == 1.0
    assert "all 4 slots for watch and follow streams are taken" in failure.message
    assert "JOBS_GRPC_THREADS=8" in failure.message
    follow = stub.GetJobOutput(jpb.GetJobOutputRequest(job_id=job_id, follow=True), timeout=10)
    with pytest.raises(grpc.RpcError) as also_refused:
        list(follow)
    assert describe(also_refused.value).reason == "TOO_MANY_WAITING_CALLS"

    # Calls that do not wait still find a thread.
    output = stub.GetJobOutput(jpb.GetJobOutputRequest(job_id=job_id), timeout=10)
    assert list(output) == []
    stub.SubmitJob(jpb.SubmitJobRequest(spec=spec("true")), timeout=10)

    streams[0].cancel()  # type: ignore[union-attr]
    again = eventually(lambda: open_watch(stub, job_id), 10, "the closed stream's slot")
    again.cancel()  # type: ignore[attr-defined]
    for stream in streams[1:]:
        stream.cancel()  # type: ignore[union-attr]


def test_blixctl_watch_waits_for_a_slot_then_follows_the_job(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(THREADS).start_pair()
    stub = plain_stub(stack)
    job_id = stub.SubmitJob(jpb.SubmitJobRequest(spec=spec("true")), timeout=10).job.job_id
    streams = [open_watch(stub, job_id) for _ in range(4)]
    watch = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "watch", "--address", stack.jobs_target, job_id],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watch.stderr is not None
        note = read_line(watch.stderr)  # once blixctl says it waits
        assert note.startswith("blixctl: all 4 slots for watch and follow streams are taken")
        assert note.rstrip().endswith("raise JOBS_GRPC_THREADS; waiting for one")

        streams[0].cancel()  # type: ignore[union-attr]
        assert watch.stdout is not None
        first = read_line(watch.stdout)  # blixctl took the freed slot: the job's state
        assert first.rstrip().endswith(("PENDING", "QUEUED")), first
        stub.CancelJob(jpb.CancelJobRequest(job_id=job_id, reason="test"), timeout=10)
        out, err = watch.communicate(timeout=30)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.communicate()
        for stream in streams[1:]:
            stream.cancel()  # type: ignore[union-attr]
    assert watch.returncode == 3, err  # CANCELLED
    assert "CANCELLED" in out and "waiting for one" not in err  # said once, on the first line
