"""One job through the real processes: submit, queue, worker, status back to jobs."""

from __future__ import annotations

import time
import uuid

import grpc
from blixard.common.v1 import job_spec_pb2
from blixard.jobs.v1 import jobs_service_pb2 as pb
from blixard.jobs.v1 import jobs_service_pb2_grpc as pb_grpc

from tests.deployment import RUN_ID, RUN_LABEL

TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}


def wait_for_end(stub: pb_grpc.JobServiceStub, job_id: str, timeout: float = 30.0) -> pb.Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=5).job
        if job.state in TERMINAL:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end within {timeout}s: {job}")


def submit(stub: pb_grpc.JobServiceStub, command: list[str], **spec: object) -> pb.Job:
    request = pb.SubmitJobRequest(
        request_id=f"{RUN_ID}-{uuid.uuid4()}",
        spec=job_spec_pb2.JobSpec(command=command, labels=dict([RUN_LABEL]), **spec),
    )
    return stub.SubmitJob(request, timeout=10).job


def test_a_job_runs_to_success_with_its_output(jobs_channel: grpc.Channel) -> None:
    stub = pb_grpc.JobServiceStub(jobs_channel)
    job = submit(stub, ["sh", "-c", "echo hello from blixard; echo to stderr >&2"])
    assert job.state == pb.JOB_STATE_PENDING
    assert len(job.job_id) == 36

    done = wait_for_end(stub, job.job_id)

    assert pb.JobState.Name(done.state) == "JOB_STATE_SUCCEEDED"
    assert done.HasField("exit_code") and done.exit_code == 0
    assert "hello from blixard" in done.output_tail
    assert "to stderr" in done.output_tail
    assert done.attempts == 1
    assert done.worker_id
    assert (
        done.start_time.seconds > 0 and done.end_time.ToDatetime() >= done.start_time.ToDatetime()
    )
    history = stub.ListJobEvents(pb.ListJobEventsRequest(job_id=job.job_id), timeout=5).events
    assert [pb.JobState.Name(e.state) for e in history] == [
        "JOB_STATE_PENDING",
        "JOB_STATE_QUEUED",
        "JOB_STATE_RUNNING",
        "JOB_STATE_SUCCEEDED",
    ]


def test_a_failing_job_ends_failed_with_its_exit_code(jobs_channel: grpc.Channel) -> None:
    stub = pb_grpc.JobServiceStub(jobs_channel)
    job = submit(stub, ["sh", "-c", "echo about to fail; exit 3"], max_attempts=1)

    done = wait_for_end(stub, job.job_id)

    assert done.state == pb.JOB_STATE_FAILED
    assert done.exit_code == 3
    assert "about to fail" in done.output_tail
    assert "3" in done.error


def test_a_missing_program_fails_with_a_clear_error(jobs_channel: grpc.Channel) -> None:
    stub = pb_grpc.JobServiceStub(jobs_channel)
    job = submit(stub, ["/no/such/program"], max_attempts=1)

    done = wait_for_end(stub, job.job_id)

    assert done.state == pb.JOB_STATE_FAILED
    assert "/no/such/program" in done.error
    assert not done.HasField("exit_code")


def test_the_command_is_argv_not_a_shell_line(jobs_channel: grpc.Channel, tmp_path) -> None:
    stub = pb_grpc.JobServiceStub(jobs_channel)
    marker = tmp_path / "should-not-exist"
    job = submit(stub, ["echo", f"$(touch {marker})", "a;b"])

    done = wait_for_end(stub, job.job_id)

    assert done.state == pb.JOB_STATE_SUCCEEDED
    assert done.output_tail.strip() == f"$(touch {marker}) a;b"
    assert not marker.exists()


def test_the_same_request_id_returns_the_same_job(jobs_channel: grpc.Channel) -> None:
    stub = pb_grpc.JobServiceStub(jobs_channel)
    # A label of this test's own: the deployment may hold any number of other jobs.
    mine = {"same-request": uuid.uuid4().hex}
    request = pb.SubmitJobRequest(
        request_id=f"{RUN_ID}-same-{uuid.uuid4()}",
        spec=job_spec_pb2.JobSpec(command=["true"], labels=dict([RUN_LABEL], **mine)),
    )
    first = stub.SubmitJob(request, timeout=10).job
    second = stub.SubmitJob(request, timeout=10).job
    assert second.job_id == first.job_id
    wait_for_end(stub, first.job_id)
    listed = stub.ListJobs(pb.ListJobsRequest(labels=mine), timeout=10).jobs
    assert [j.job_id for j in listed] == [first.job_id]


def test_env_and_working_directory_reach_the_process(jobs_channel: grpc.Channel) -> None:
    stub = pb_grpc.JobServiceStub(jobs_channel)
    # /tmp exists wherever the worker runs (a local process, or a container)
    job = submit(
        stub,
        ["sh", "-c", 'echo "$GREETING from $(pwd)"'],
        env={"GREETING": "hej"},
        working_directory="/tmp",
    )

    done = wait_for_end(stub, job.job_id)

    assert done.output_tail.strip() == "hej from /tmp"
