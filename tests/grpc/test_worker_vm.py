"""A vm worker against the real VM service.

With no VM manager (it answers UNAVAILABLE) the job is given back to the queue, not failed,
its attempts are not counted, the worker backs off instead of spinning, and a worker of
another type the job allows runs it. With a VM backend (the process one, which runs on any
machine) a job runs in a VM end to end, and a cancelled one takes its VM with it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from blixard.jobs.v1 import jobs_service_pb2 as jpb
from blixard.queue.v1 import queue_service_pb2 as qpb
from blixard.vms.v1 import vm_service_pb2 as vpb

from services.worker import bootstrap, config
from services.worker.runner import Worker
from services.worker.tracker import Outcome
from tests.grpc.conftest import RPC_TIMEOUT, Stack, eventually, spec, wait_for_state


@pytest.fixture
def suite(make_stack) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    """Jobs, queue, and a VM service with no VM manager."""
    stack: Stack = make_stack()
    stack.start_pair().start_vms({"VMS_MANAGER": "none"})
    yield stack


@pytest.fixture
def vm_suite(make_stack, tmp_path) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    """Jobs, queue, and a VM service whose VMs are local processes."""
    stack: Stack = make_stack()
    stack.start_pair()
    stack.start_vms(  # the process backend needs nothing the machine may lack
        {
            "VMS_MANAGER": "process",
            "VMS_STATE_DIR": str(tmp_path / "vms"),
            "VMS_DATABASE_URL": f"sqlite:///{tmp_path}/vms.sqlite3",
            "VMS_PRE_WARM_COUNT": "0",
        }
    )
    yield stack


def start_vm_worker(suite: Stack) -> tuple[Worker, threading.Thread]:
    settings = config.load(
        {
            "WORKER_ID": "grpc-vm-worker",
            "WORKER_TYPE": "vm",
            "WORKER_SLOTS": "2",
            "WORKER_LEASE_SECONDS": "6",
            "WORKER_POLL_WAIT": "1",
        }
    )
    worker = bootstrap.build(
        settings,
        suite.channel(suite.queue_target),
        jobs_channel=suite.channel(suite.jobs_target),
        vms_channel=suite.channel(suite.vms_target),
    )
    thread = threading.Thread(target=worker.run, name="grpc-vm-worker", daemon=True)
    thread.start()
    return worker, thread


@pytest.fixture
def vm_worker(suite: Stack) -> Iterator[Worker]:
    worker, thread = start_vm_worker(suite)
    yield worker
    worker.stop()
    thread.join(timeout=15)
    assert not thread.is_alive()


@pytest.fixture
def real_vm_worker(vm_suite: Stack) -> Iterator[Worker]:
    worker, thread = start_vm_worker(vm_suite)
    yield worker
    worker.stop()
    thread.join(timeout=15)
    assert not thread.is_alive()


def events(suite: Stack, job_id: str) -> list[jpb.JobEvent]:
    request = jpb.ListJobEventsRequest(job_id=job_id)
    return list(suite.jobs_stub().ListJobEvents(request, timeout=RPC_TIMEOUT).events)


def releases(suite: Stack, job_id: str) -> list[jpb.JobEvent]:
    return [
        e
        for e in events(suite, job_id)
        if e.state == jpb.JOB_STATE_QUEUED and e.reason.startswith("released")
    ]


def submit(suite: Stack, *worker_types: str, script: str = "echo ran") -> str:
    job_spec = spec("sh", "-c", script, max_attempts=1)
    job_spec.requirements.worker_types.extend(worker_types)
    request = jpb.SubmitJobRequest(spec=job_spec)
    return suite.jobs_stub().SubmitJob(request, timeout=RPC_TIMEOUT).job.job_id


def test_a_vm_job_is_released_not_failed_when_no_vm_manager_exists(
    suite: Stack, vm_worker: Worker
) -> None:
    job_id = submit(suite, "vm")

    first = eventually(lambda: releases(suite, job_id), 15, "the vm worker to release the job")

    assert "VM_MANAGER_UNAVAILABLE" in first[0].reason or "VM manager" in first[0].reason
    assert first[0].actor == "worker:grpc-vm-worker"
    item = suite.queue_stub().GetItem(qpb.GetItemRequest(job_id=job_id), timeout=RPC_TIMEOUT)
    assert item.item.state in (qpb.ITEM_STATE_WAITING, qpb.ITEM_STATE_LEASED)
    assert item.item.attempt <= 1, "a release does not count an attempt"
    assert vm_worker.tracker.find(job_id)[0].outcome is Outcome.RELEASED

    # It backs off before claiming again: over four seconds, a few tries, not a spin.
    time.sleep(4)
    job = suite.jobs_stub().GetJob(jpb.GetJobRequest(job_id=job_id), timeout=RPC_TIMEOUT).job
    assert job.state in (jpb.JOB_STATE_QUEUED, jpb.JOB_STATE_RUNNING), "never FAILED"
    assert job.attempts <= 1
    assert 1 <= len(releases(suite, job_id)) <= 4
    assert all(e.state != jpb.JOB_STATE_FAILED for e in events(suite, job_id))


def test_a_released_job_is_run_by_a_worker_of_another_type_it_allows(
    suite: Stack, vm_worker: Worker
) -> None:
    job_id = submit(suite, "vm", "process")
    eventually(lambda: releases(suite, job_id), 15, "the vm worker to release the job")

    suite.start_worker("grpc-process-worker")

    done = wait_for_state(
        suite.jobs_stub(), job_id, {jpb.JOB_STATE_SUCCEEDED, jpb.JOB_STATE_FAILED}
    )
    assert done.state == jpb.JOB_STATE_SUCCEEDED
    assert done.worker_id == "grpc-process-worker"
    assert done.output_tail == "ran\n"
    assert done.attempts == 1, "the released attempts were not counted"


def test_a_job_runs_in_a_vm_and_its_output_comes_back(
    vm_suite: Stack, real_vm_worker: Worker
) -> None:
    job_id = submit(vm_suite, "vm", script="echo inside; echo oops >&2; exit 4")

    done = wait_for_state(
        vm_suite.jobs_stub(), job_id, {jpb.JOB_STATE_SUCCEEDED, jpb.JOB_STATE_FAILED}, 60
    )

    assert (done.state, done.exit_code) == (jpb.JOB_STATE_FAILED, 4)
    assert sorted(done.output_tail.splitlines()) == ["inside", "oops"]
    assert done.worker_id == "grpc-vm-worker"
    request = jpb.GetJobOutputRequest(job_id=job_id)
    streamed = b"".join(c.data for c in vm_suite.jobs_stub().GetJobOutput(request, timeout=5))
    assert sorted(streamed.splitlines()) == [b"inside", b"oops"]
    assert done.output_bytes == len(streamed)
    vms = vm_suite.vms_stub().ListVms(vpb.ListVmsRequest(), timeout=RPC_TIMEOUT).vms
    assert [v.state for v in vms] == [vpb.VM_STATE_TERMINATED], "its VM went with it"


def test_a_cancelled_vm_job_is_stopped_and_its_vm_destroyed(
    vm_suite: Stack, real_vm_worker: Worker
) -> None:
    job_id = submit(vm_suite, "vm", script="echo started; sleep 300")
    jobs = vm_suite.jobs_stub()
    wait_for_state(jobs, job_id, {jpb.JOB_STATE_RUNNING}, 60)
    vms = vm_suite.vms_stub()
    eventually(
        lambda: any(
            v.state == vpb.VM_STATE_BUSY
            for v in vms.ListVms(vpb.ListVmsRequest(), timeout=RPC_TIMEOUT).vms
        ),
        30,
        "the job to run in a VM",
    )

    jobs.CancelJob(jpb.CancelJobRequest(job_id=job_id), timeout=RPC_TIMEOUT)

    # The worker learns it at its next heartbeat (every 2 s) and destroys the VM.
    eventually(
        lambda: all(
            v.state == vpb.VM_STATE_TERMINATED
            for v in vms.ListVms(vpb.ListVmsRequest(), timeout=RPC_TIMEOUT).vms
        ),
        10,
        "the VM to be destroyed",
    )
    eventually(
        lambda: real_vm_worker.tracker.find(job_id)[0].outcome is Outcome.CANCELLED,
        10,
        "the worker to record the cancel",
    )
    item = vm_suite.queue_stub().GetItem(qpb.GetItemRequest(job_id=job_id), timeout=RPC_TIMEOUT)
    assert item.item.state == qpb.ITEM_STATE_CANCELLED
    assert "started" in item.item.output_tail
