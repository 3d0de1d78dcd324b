"""Domain errors reach the client as status codes with google.rpc details (HOUSE_STYLE.md)."""

from __future__ import annotations

import uuid

import grpc
import pytest
from blixard.common.v1 import job_spec_pb2
from blixard.jobs.v1 import jobs_service_pb2 as jpb
from blixard.queue.v1 import queue_service_pb2 as qpb
from blixard.vms.v1 import vm_service_pb2 as vpb
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.common import paging, pbtime
from services.common.errors import RpcFailure, describe
from tests.grpc.conftest import RPC_TIMEOUT, Stack, spec

VM_MESSAGE = "VM manager is not available (SKIP_VM_MANAGER may be set)"


def _fails(call, request, **kw) -> tuple[RpcFailure, grpc.RpcError]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=RPC_TIMEOUT, **kw)
    return describe(caught.value), caught.value


def _details(error: grpc.RpcError, kind):  # type: ignore[no-untyped-def]
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status in the trailers"
    found = []
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            found.append(message)
    return found


# ---- validation ------------------------------------------------------------------------


def test_submit_with_several_problems_lists_every_one(stack: Stack) -> None:
    jobs = stack.jobs_stub()
    bad = job_spec_pb2.JobSpec(
        command=[],
        env={"1BAD": "x"},
        priority=5000,
        requirements=job_spec_pb2.JobRequirements(worker_types=["Not_A_Type"]),
    )

    failure, _ = _fails(jobs.SubmitJob, jpb.SubmitJobRequest(request_id="bad-1", spec=bad))

    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.reason == "INVALID_ARGUMENT"
    fields = [f for f, _ in failure.field_violations]
    assert sorted(fields) == sorted(
        [
            "spec.command",
            "spec.env[1BAD]",
            "spec.priority",
            "spec.requirements.worker_types[0]",
        ]
    )
    assert all(description for _, description in failure.field_violations)
    assert "4 problems" in failure.message


def test_submit_without_a_spec_is_invalid(stack: Stack) -> None:
    failure, _ = _fails(stack.jobs_stub().SubmitJob, jpb.SubmitJobRequest(request_id="no-spec"))

    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.field_violations == [("spec", "required")]


def test_an_invalid_submit_stores_nothing(make_stack) -> None:  # type: ignore[no-untyped-def]
    alone = make_stack().start_pair()
    jobs = alone.jobs_stub()

    _fails(jobs.SubmitJob, jpb.SubmitJobRequest(spec=spec(priority=5000)))

    listed = jobs.ListJobs(jpb.ListJobsRequest(page_size=10), timeout=RPC_TIMEOUT)
    assert list(listed.jobs) == []


INVALID_TIMES = {
    "after-year-9999": timestamp_pb2.Timestamp(seconds=10**13),
    "before-year-1": timestamp_pb2.Timestamp(seconds=-(10**12)),
    "negative-nanos": timestamp_pb2.Timestamp(seconds=1, nanos=-5),
}


def _is_invalid_field(failure: RpcFailure, field: str) -> None:
    # Whatever happens, no traceback reaches the client.
    assert "Traceback" not in failure.message
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT, f"{failure} (expected {field})"
    assert [f for f, _ in failure.field_violations] == [field]


@pytest.mark.parametrize("when", sorted(INVALID_TIMES))
def test_submit_with_an_invalid_run_at_is_invalid_argument(stack: Stack, when: str) -> None:
    request = jpb.SubmitJobRequest(spec=spec("true", run_at=INVALID_TIMES[when]))

    failure, _ = _fails(stack.jobs_stub().SubmitJob, request)

    _is_invalid_field(failure, "spec.run_at")


def test_submit_with_a_malformed_timeout_is_invalid_argument(stack: Stack) -> None:
    # Positive in total, but seconds and nanos disagree in sign: not a valid Duration.
    timeout = duration_pb2.Duration(seconds=2, nanos=-5)
    request = jpb.SubmitJobRequest(
        spec=spec("true", requirements=job_spec_pb2.JobRequirements(timeout=timeout))
    )

    failure, _ = _fails(stack.jobs_stub().SubmitJob, request)

    _is_invalid_field(failure, "spec.requirements.timeout")


def test_enqueue_with_an_invalid_run_at_is_invalid_argument(stack: Stack) -> None:
    request = qpb.EnqueueRequest(
        job_id=f"bad-run-at-{uuid.uuid4()}",
        generation=1,
        spec=spec("true", run_at=INVALID_TIMES["after-year-9999"]),
    )

    failure, _ = _fails(stack.queue_stub().Enqueue, request)

    _is_invalid_field(failure, "spec.run_at")


@pytest.mark.parametrize("bound", ["created_after", "created_before"])
def test_list_jobs_with_an_invalid_time_bound_is_invalid_argument(stack: Stack, bound: str) -> None:
    request = jpb.ListJobsRequest(page_size=5, **{bound: INVALID_TIMES["after-year-9999"]})

    failure, _ = _fails(stack.jobs_stub().ListJobs, request)

    _is_invalid_field(failure, bound)


def test_update_job_status_with_an_invalid_event_time_is_invalid_argument(stack: Stack) -> None:
    jobs = stack.jobs_stub()
    job = jobs.SubmitJob(jpb.SubmitJobRequest(spec=spec("sleep", "60")), timeout=RPC_TIMEOUT).job
    request = jpb.UpdateJobStatusRequest(
        job_id=job.job_id,
        generation=1,
        sequence=1000,
        state=jpb.JOB_STATE_RUNNING,
        event_time=INVALID_TIMES["after-year-9999"],
    )

    failure, _ = _fails(jobs.UpdateJobStatus, request)

    _is_invalid_field(failure, "event_time")


# ---- not found, idempotency, transitions -----------------------------------------------


def test_get_unknown_job_is_not_found(stack: Stack) -> None:
    job_id = str(uuid.uuid4())

    failure, error = _fails(stack.jobs_stub().GetJob, jpb.GetJobRequest(job_id=job_id))

    assert failure.code == grpc.StatusCode.NOT_FOUND
    assert failure.reason == "NOT_FOUND"
    assert job_id in failure.message
    [resource] = _details(error, error_details_pb2.ResourceInfo)
    assert (resource.resource_type, resource.resource_name) == ("job", job_id)


def test_get_without_id_is_invalid(stack: Stack) -> None:
    failure, _ = _fails(stack.jobs_stub().GetJob, jpb.GetJobRequest())

    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert ("job_id", "required") in failure.field_violations


def test_same_request_id_same_spec_returns_the_first_job(stack: Stack) -> None:
    jobs = stack.jobs_stub()
    request = jpb.SubmitJobRequest(request_id=f"same-{uuid.uuid4()}", spec=spec("true"))

    first = jobs.SubmitJob(request, timeout=RPC_TIMEOUT).job
    second = jobs.SubmitJob(request, timeout=RPC_TIMEOUT).job

    assert first.job_id
    assert second.job_id == first.job_id
    assert second.request_id == request.request_id


def test_same_request_id_other_spec_is_already_exists(stack: Stack) -> None:
    jobs = stack.jobs_stub()
    request_id = f"reuse-{uuid.uuid4()}"
    first = jobs.SubmitJob(
        jpb.SubmitJobRequest(request_id=request_id, spec=spec("true")), timeout=RPC_TIMEOUT
    ).job

    failure, _ = _fails(
        jobs.SubmitJob, jpb.SubmitJobRequest(request_id=request_id, spec=spec("false"))
    )

    assert failure.code == grpc.StatusCode.ALREADY_EXISTS
    assert failure.reason == "REQUEST_ID_REUSED"
    assert failure.metadata.get("job_id") == first.job_id
    # The first job is untouched.
    kept = jobs.GetJob(jpb.GetJobRequest(job_id=first.job_id), timeout=RPC_TIMEOUT).job
    assert list(kept.spec.command) == ["true"]


def test_cancel_twice_is_an_illegal_transition(stack: Stack) -> None:
    jobs = stack.jobs_stub()
    job = jobs.SubmitJob(jpb.SubmitJobRequest(spec=spec("sleep", "60")), timeout=RPC_TIMEOUT).job

    cancelled = jobs.CancelJob(
        jpb.CancelJobRequest(job_id=job.job_id, reason="changed my mind"), timeout=RPC_TIMEOUT
    ).job
    failure, error = _fails(jobs.CancelJob, jpb.CancelJobRequest(job_id=job.job_id))

    assert cancelled.state == jpb.JOB_STATE_CANCELLED
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "ILLEGAL_TRANSITION"
    assert failure.metadata.get("current_state") == "CANCELLED"
    [precondition] = _details(error, error_details_pb2.PreconditionFailure)
    assert precondition.violations[0].subject == f"jobs/{job.job_id}"
    # The refused cancel changed nothing.
    after = jobs.GetJob(jpb.GetJobRequest(job_id=job.job_id), timeout=RPC_TIMEOUT).job
    assert after.state == jpb.JOB_STATE_CANCELLED
    assert after.error == "changed my mind"


def test_retry_of_a_live_job_is_an_illegal_transition(stack: Stack) -> None:
    jobs = stack.jobs_stub()
    job = jobs.SubmitJob(jpb.SubmitJobRequest(spec=spec("sleep", "60")), timeout=RPC_TIMEOUT).job

    failure, _ = _fails(jobs.RetryJob, jpb.RetryJobRequest(job_id=job.job_id))

    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "ILLEGAL_TRANSITION"
    assert failure.metadata.get("current_state") in ("PENDING", "QUEUED")


def test_a_bad_page_token_is_invalid(stack: Stack) -> None:
    failure, _ = _fails(
        stack.jobs_stub().ListJobs, jpb.ListJobsRequest(page_size=2, page_token="not-a-token!")
    )

    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in failure.field_violations] == ["page_token"]


NOT_OUR_TOKENS = {
    "not-base64": "not-a-token!",
    "one-part": paging.encode("2024-01-01T00:00:00+00:00"),
    "not-a-time": paging.encode("yesterday", "job-1"),
}


@pytest.mark.parametrize("kind", sorted(NOT_OUR_TOKENS))
def test_a_bad_page_token_is_listed_with_the_other_problems(stack: Stack, kind: str) -> None:
    request = jpb.ListJobsRequest(page_size=5000, page_token=NOT_OUR_TOKENS[kind])

    failure, error = _fails(stack.jobs_stub().ListJobs, request)

    # One INVALID_ARGUMENT naming both, not the page size now and the token on the next call.
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    [bad_request] = _details(error, error_details_pb2.BadRequest)
    fields = [v.field for v in bad_request.field_violations]
    assert sorted(fields) == ["page_size", "page_token"]
    assert "2 problems" in failure.message


# ---- queue fencing ---------------------------------------------------------------------


def test_stale_lease_token_is_refused_and_changes_nothing(make_stack) -> None:  # type: ignore[no-untyped-def]
    # A queue of its own, so no other test's item can be claimed here.
    alone = make_stack().start_pair()
    queue = alone.queue_stub()
    job_id = f"fencing-{uuid.uuid4()}"
    queue.Enqueue(
        qpb.EnqueueRequest(job_id=job_id, generation=1, spec=spec("true")), timeout=RPC_TIMEOUT
    )
    [lease] = queue.Claim(
        qpb.ClaimRequest(
            worker_id="w-1", worker_type="process", max_items=1, lease_duration=pbtime.duration(30)
        ),
        timeout=RPC_TIMEOUT,
    ).leases
    assert lease.item.job_id == job_id
    queue.Complete(
        qpb.CompleteRequest(
            lease_token=lease.lease_token, outcome=job_spec_pb2.OUTCOME_SUCCEEDED, exit_code=0
        ),
        timeout=RPC_TIMEOUT,
    )
    before = queue.GetItem(qpb.GetItemRequest(job_id=job_id), timeout=RPC_TIMEOUT).item

    heartbeat, _ = _fails(queue.Heartbeat, qpb.HeartbeatRequest(lease_token=lease.lease_token))
    complete, _ = _fails(
        queue.Complete,
        qpb.CompleteRequest(
            lease_token=lease.lease_token, outcome=job_spec_pb2.OUTCOME_FAILED, exit_code=1
        ),
    )
    made_up, _ = _fails(queue.Heartbeat, qpb.HeartbeatRequest(lease_token="never-issued"))

    for failure in (heartbeat, complete, made_up):
        assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
        assert failure.reason == "LEASE_NOT_HELD"
    after = queue.GetItem(qpb.GetItemRequest(job_id=job_id), timeout=RPC_TIMEOUT).item
    assert after == before


def test_complete_without_outcome_or_token_lists_both(stack: Stack) -> None:
    failure, _ = _fails(stack.queue_stub().Complete, qpb.CompleteRequest())

    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(f for f, _ in failure.field_violations) == ["lease_token", "outcome"]


# ---- the VM service without a manager --------------------------------------------------


VM_CALLS = {
    "CreateVm": lambda vms: vms.CreateVm(
        vpb.CreateVmRequest(vcpus=1, memory_mb=256), timeout=RPC_TIMEOUT
    ),
    "GetVm": lambda vms: vms.GetVm(vpb.GetVmRequest(vm_id="vm-1"), timeout=RPC_TIMEOUT),
    "ListVms": lambda vms: vms.ListVms(vpb.ListVmsRequest(), timeout=RPC_TIMEOUT),
    "StopVm": lambda vms: vms.StopVm(vpb.StopVmRequest(vm_id="vm-1"), timeout=RPC_TIMEOUT),
    "DestroyVm": lambda vms: vms.DestroyVm(vpb.DestroyVmRequest(vm_id="vm-1"), timeout=RPC_TIMEOUT),
    "ExecInVm": lambda vms: list(
        vms.ExecInVm(vpb.ExecInVmRequest(vm_id="vm-1", command=["echo", "hi"]), timeout=RPC_TIMEOUT)
    ),
}


@pytest.mark.parametrize("method", sorted(VM_CALLS))
def test_every_vm_call_is_unavailable_without_a_manager(stack: Stack, method: str) -> None:
    vms = stack.vms_stub()

    with pytest.raises(grpc.RpcError) as caught:
        VM_CALLS[method](vms)

    failure = describe(caught.value)
    assert failure.code == grpc.StatusCode.UNAVAILABLE
    assert failure.reason == "VM_MANAGER_UNAVAILABLE"
    assert failure.message == VM_MESSAGE
    assert failure.retry_after is not None and failure.retry_after > 0


def test_manager_info_says_unavailable_and_why(stack: Stack) -> None:
    info = stack.vms_stub().GetManagerInfo(vpb.GetManagerInfoRequest(), timeout=RPC_TIMEOUT)

    assert info.available is False
    assert info.reason.strip()


def test_manager_info_names_skip_vm_manager_when_it_is_set(make_stack) -> None:  # type: ignore[no-untyped-def]
    alone = make_stack().start_vms({"SKIP_VM_MANAGER": "1"})
    vms = alone.vms_stub()

    info = vms.GetManagerInfo(vpb.GetManagerInfoRequest(), timeout=RPC_TIMEOUT)
    with pytest.raises(grpc.RpcError) as caught:
        vms.ListVms(vpb.ListVmsRequest(), timeout=RPC_TIMEOUT)

    assert info.available is False
    assert "SKIP_VM_MANAGER" in info.reason
    failure = describe(caught.value)
    assert (failure.code, failure.reason, failure.message) == (
        grpc.StatusCode.UNAVAILABLE,
        "VM_MANAGER_UNAVAILABLE",
        VM_MESSAGE,
    )
