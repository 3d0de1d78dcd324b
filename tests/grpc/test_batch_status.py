"""BatchUpdateJobStatus: the queue's relay sends its outbox in batches; each update is
applied, ignored or refused on its own, in order, in one transaction."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import grpc
import pytest
from blixard.jobs.v1 import jobs_service_pb2 as jpb

from tests.grpc.conftest import RPC_TIMEOUT, Stack, spec


@pytest.fixture(scope="module")
def jobs_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The jobs service alone: nothing else sends it updates."""
    running = Stack(tmp_path_factory.mktemp("batch-status"))
    try:
        running.start_jobs()
        yield running
    finally:
        running.stop()


def update(job_id: str, sequence: int, state: int, **fields: object) -> jpb.UpdateJobStatusRequest:
    return jpb.UpdateJobStatusRequest(
        job_id=job_id, generation=1, sequence=sequence, state=state, **fields
    )


def test_a_batch_applies_each_update_in_order_and_refuses_the_bad_ones_alone(
    jobs_only: Stack,
) -> None:
    jobs = jobs_only.jobs_stub()
    job = jobs.SubmitJob(jpb.SubmitJobRequest(spec=spec("true")), timeout=RPC_TIMEOUT).job
    unknown = str(uuid.uuid4())

    response = jobs.BatchUpdateJobStatus(
        jpb.BatchUpdateJobStatusRequest(
            requests=[
                update(job.job_id, 1, jpb.JOB_STATE_QUEUED),
                update(job.job_id, 2, jpb.JOB_STATE_RUNNING, attempt=1, worker_id="w-1"),
                update(unknown, 1, jpb.JOB_STATE_QUEUED),
                update(job.job_id, 0, jpb.JOB_STATE_RUNNING),  # invalid: sequence 0
                update(job.job_id, 3, jpb.JOB_STATE_SUCCEEDED, attempt=1, exit_code=0),
                update(job.job_id, 2, jpb.JOB_STATE_RUNNING, attempt=1),  # late: ignored
            ]
        ),
        timeout=RPC_TIMEOUT,
    )

    kinds = [r.WhichOneof("result") for r in response.results]
    assert kinds == ["response", "response", "error", "error", "response", "response"]
    assert [r.response.applied for r in response.results if r.HasField("response")] == [
        True,
        True,
        True,
        False,
    ]
    not_found, invalid = response.results[2].error, response.results[3].error
    assert (not_found.code, not_found.reason) == (grpc.StatusCode.NOT_FOUND.value[0], "NOT_FOUND")
    assert unknown in not_found.message
    assert (
        invalid.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "sequence" in invalid.message
    )
    done = jobs.GetJob(jpb.GetJobRequest(job_id=job.job_id), timeout=RPC_TIMEOUT).job
    assert done.state == jpb.JOB_STATE_SUCCEEDED and done.worker_id == "w-1"
    events = jobs.ListJobEvents(jpb.ListJobEventsRequest(job_id=job.job_id), timeout=RPC_TIMEOUT)
    assert [e.state for e in events.events] == [
        jpb.JOB_STATE_PENDING,
        jpb.JOB_STATE_QUEUED,
        jpb.JOB_STATE_RUNNING,
        jpb.JOB_STATE_SUCCEEDED,
    ]


@pytest.mark.parametrize("count", [0, 501])
def test_an_empty_or_oversized_batch_is_invalid_argument(jobs_only: Stack, count: int) -> None:
    request = jpb.BatchUpdateJobStatusRequest(
        requests=[update(str(uuid.uuid4()), 1, jpb.JOB_STATE_QUEUED) for _ in range(count)]
    )
    with pytest.raises(grpc.RpcError) as caught:
        jobs_only.jobs_stub().BatchUpdateJobStatus(request, timeout=RPC_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "requests" in (caught.value.details() or "")


def test_a_report_its_job_cannot_store_fails_alone(jobs_only: Stack) -> None:
    """A worker id longer than its column: that report is INVALID_ARGUMENT, never an
    INTERNAL for the whole call (nor, on SQLite, stored as it is); the others apply."""
    jobs = jobs_only.jobs_stub()
    first, bad = (
        jobs.SubmitJob(jpb.SubmitJobRequest(spec=spec("true")), timeout=RPC_TIMEOUT).job
        for _ in range(2)
    )
    response = jobs.BatchUpdateJobStatus(
        jpb.BatchUpdateJobStatusRequest(
            requests=[
                update(bad.job_id, 1, jpb.JOB_STATE_RUNNING, attempt=1, worker_id="w" * 300),
                update(first.job_id, 1, jpb.JOB_STATE_RUNNING, attempt=1, worker_id="w-1"),
            ]
        ),
        timeout=RPC_TIMEOUT,
    )
    refused, applied = response.results
    assert refused.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "worker_id" in refused.error.message
    assert applied.response.applied
    got = {
        job.job_id: jobs.GetJob(jpb.GetJobRequest(job_id=job.job_id), timeout=RPC_TIMEOUT).job
        for job in (first, bad)
    }
    assert got[first.job_id].state == jpb.JOB_STATE_RUNNING
    assert got[bad.job_id].state == jpb.JOB_STATE_PENDING and got[bad.job_id].worker_id == ""
