"""Against the docker compose stack: the cross-service suite, and the faults users meet
(a queue killed during 500 jobs, PostgreSQL restarted mid-run, a worker container
killed mid-job)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable

import grpc
from blixard.common.v1 import job_spec_pb2
from blixard.jobs.v1 import jobs_service_pb2 as pb
from blixard.jobs.v1 import jobs_service_pb2_grpc as pb_grpc

from tests.compose.conftest import Stack
from tests.deployment import ROOT


def jobs_stub(stack: Stack) -> pb_grpc.JobServiceStub:
    return pb_grpc.JobServiceStub(stack.deployment.channel(stack.deployment.jobs))


def submit(stub: pb_grpc.JobServiceStub, command: list[str], deadline: float = 60) -> str:
    """Submit, retrying while the stack is briefly unavailable (same request_id)."""
    request = pb.SubmitJobRequest(
        request_id=str(uuid.uuid4()), spec=job_spec_pb2.JobSpec(command=command)
    )
    end = time.monotonic() + deadline
    while True:
        try:
            return stub.SubmitJob(request, timeout=10).job.job_id
        except grpc.RpcError as exc:
            if (
                exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                or time.monotonic() > end
            ):
                raise
            time.sleep(0.5)


def wait_all_succeeded(
    stub: pb_grpc.JobServiceStub, job_ids: Iterable[str], timeout: float = 300
) -> dict[str, pb.Job]:
    pending = set(job_ids)
    done: dict[str, pb.Job] = {}
    end = time.monotonic() + timeout
    while pending and time.monotonic() < end:
        for job_id in list(pending):
            try:
                job = stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=10).job
            except grpc.RpcError:
                time.sleep(0.5)
                break
            if job.state in (pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED):
                raise AssertionError(f"job {job_id} ended {pb.JobState.Name(job.state)}: {job}")
            if job.state == pb.JOB_STATE_SUCCEEDED:
                done[job_id] = job
                pending.discard(job_id)
        time.sleep(0.2)
    assert not pending, f"{len(pending)} jobs did not succeed in {timeout}s"
    return done


def succeeded_once(stub: pb_grpc.JobServiceStub, job_id: str) -> bool:
    events = stub.ListJobEvents(pb.ListJobEventsRequest(job_id=job_id), timeout=10).events
    return sum(1 for e in events if e.state == pb.JOB_STATE_SUCCEEDED) == 1


def test_the_cross_service_suite_passes_against_compose(stack: Stack) -> None:
    """The same test code as against `make run` processes, given the stack's addresses."""
    env = {
        **os.environ,
        "TARGET_JOBS_ADDRESS": stack.deployment.jobs,
        "TARGET_QUEUE_ADDRESS": stack.deployment.queue,
        "TARGET_VMS_ADDRESS": stack.deployment.vms,
        "TARGET_CLIENT_TOKEN": stack.deployment.client_token or "",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/system/test_end_to_end.py",
            "tests/system/test_blixctl.py",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout


def test_killing_the_queue_during_500_jobs_loses_and_repeats_nothing(stack: Stack) -> None:
    stub = jobs_stub(stack)
    submitted: list[str] = []
    errors: list[BaseException] = []

    def submit_all() -> None:
        try:
            for _ in range(500):
                submitted.append(submit(stub, ["true"]))
        except BaseException as exc:
            errors.append(exc)

    submitter = threading.Thread(target=submit_all)
    submitter.start()
    while len(submitted) < 100 and submitter.is_alive():
        time.sleep(0.05)
    stack.compose("kill", "queue")
    time.sleep(2)
    stack.compose("start", "queue")
    submitter.join(timeout=600)
    assert not errors, errors
    assert len(submitted) == 500

    done = wait_all_succeeded(stub, submitted)

    assert len(done) == 500
    assert all(succeeded_once(stub, job_id) for job_id in submitted)


def test_restarting_postgres_mid_run_loses_nothing(stack: Stack) -> None:
    stub = jobs_stub(stack)
    before = [submit(stub, ["sh", "-c", "sleep 0.2"]) for _ in range(30)]
    stack.compose("restart", "postgres", timeout=120)
    after = [submit(stub, ["true"]) for _ in range(30)]  # the services reconnect

    done = wait_all_succeeded(stub, before + after)

    assert len(done) == 60
    assert all(succeeded_once(stub, job_id) for job_id in before + after)


def test_a_killed_worker_containers_job_finishes_on_the_other_worker(stack: Stack) -> None:
    stub = jobs_stub(stack)
    job_id = submit(stub, ["sh", "-c", "sleep 4; echo finished"])
    end = time.monotonic() + 60
    while True:
        job = stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=10).job
        if job.state == pb.JOB_STATE_RUNNING and job.worker_id:
            break
        assert time.monotonic() < end, job
        time.sleep(0.1)
    first_worker = job.worker_id
    victim = [c for c in stack.container_ids("worker") if first_worker.startswith(c[:12])]
    assert victim, (first_worker, stack.container_ids("worker"))
    subprocess.run(["docker", "kill", victim[0]], check=True, capture_output=True)

    done = wait_all_succeeded(stub, [job_id], timeout=120)[job_id]

    events = stub.ListJobEvents(pb.ListJobEventsRequest(job_id=job_id), timeout=10).events
    history = "\n".join(f"{pb.JobState.Name(e.state)} {e.actor}: {e.reason}" for e in events)
    assert done.worker_id != first_worker, history
    assert done.attempts == 2, history
    assert "finished" in done.output_tail
    stack.compose("up", "-d", "--wait", "--scale", "worker=2", timeout=300)


def test_a_vm_job_runs_in_a_microvm_inside_the_stack(stack: Stack) -> None:
    from blixard.vms.v1 import vm_service_pb2 as vpb
    from blixard.vms.v1 import vm_service_pb2_grpc as vpb_grpc

    vms = vpb_grpc.VmServiceStub(stack.deployment.channel(stack.deployment.vms))
    info = vms.GetManagerInfo(vpb.GetManagerInfoRequest(), timeout=30)
    assert info.available, info.reason
    assert info.backend == "qemu"

    stub = jobs_stub(stack)
    spec = job_spec_pb2.JobSpec(command=["uname", "-r"])
    spec.requirements.isolation = job_spec_pb2.ISOLATION_LEVEL_VM
    job_id = stub.SubmitJob(
        pb.SubmitJobRequest(request_id=str(uuid.uuid4()), spec=spec), timeout=10
    ).job.job_id

    done = wait_all_succeeded(stub, [job_id], timeout=240)[job_id]

    assert done.output_tail.strip() and done.output_tail.strip() != os.uname().release
    assert done.worker_id  # the vm worker ran it
