"""What a hostile client sends never reaches a database, never costs a gigabyte, and never
makes a service answer INTERNAL: malformed bodies, NULs, integers past a column's range,
huge lists, errors that would not fit in a status. On SQLite and on PostgreSQL."""

from __future__ import annotations

import logging
import time

import grpc
import pytest
from blixard.jobs.v1 import jobs_service_pb2 as jpb
from blixard.queue.v1 import queue_service_pb2 as qpb
from blixard.vms.v1 import vm_service_pb2 as vpb
from grpc_status import rpc_status

from services.common.errors import MAX_LISTED, RpcFailure, describe
from tests.grpc.conftest import (
    ADMIN_TOKEN,
    RPC_TIMEOUT,
    TOKENS,
    WORKER_TOKEN,
    Stack,
    spec,
)

GARBAGE = b"\xff\xff\xff\xff\x0f this is not a protobuf message"


def _fails(call, request, **kw) -> RpcFailure:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as caught:
        result = call(request, timeout=RPC_TIMEOUT, **kw)
        if hasattr(result, "__next__"):
            list(result)
    assert rpc_status.from_call(caught.value) is not None, "no readable google.rpc.Status"  # type: ignore[arg-type]
    return describe(caught.value)


def _raw(channel: grpc.Channel, method: str, streaming: bool = False):  # type: ignore[no-untyped-def]
    """A call that sends ``bytes`` as the body, whatever they are."""
    factory = channel.unary_stream if streaming else channel.unary_unary
    return factory(method, request_serializer=None, response_deserializer=None)


def _tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


@pytest.fixture
def secured(make_stack) -> Stack:  # type: ignore[no-untyped-def]
    return make_stack(TOKENS).start_pair()  # type: ignore[no-any-return]


@pytest.fixture
def on_database(make_stack, database: dict[str, str]) -> Stack:  # type: ignore[no-untyped-def]
    """A jobs + queue pair, with admin tokens, on SQLite or on PostgreSQL."""
    return make_stack(TOKENS, database).start_pair()  # type: ignore[no-any-return]


# ---- a body that does not parse -----------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "method", "streaming"),
    [
        ("jobs", "/blixard.jobs.v1.JobService/SubmitJob", False),
        ("jobs", "/blixard.jobs.v1.JobService/WatchJob", True),
        ("queue", "/blixard.queue.v1.QueueService/Complete", False),
    ],
)
def test_a_body_that_does_not_parse_is_refused_after_the_auth_check(
    secured: Stack, caplog: pytest.LogCaptureFixture, target: str, method: str, streaming: bool
) -> None:
    address = secured.jobs_target if target == "jobs" else secured.queue_target
    anonymous = _raw(secured.channel(address), method, streaming)
    admin = _raw(secured.channel(address, ADMIN_TOKEN), method, streaming)
    caplog.set_level(logging.INFO)

    assert _fails(anonymous, GARBAGE).code == grpc.StatusCode.UNAUTHENTICATED
    refused = _fails(admin, GARBAGE)

    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.field_violations == [
        ("request", "does not parse as the method's request message")
    ]
    assert _tracebacks(caplog) == []
    said = [r.getMessage() for r in caplog.records if "does not parse" in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0]


# ---- integers past a column's range ----------------------------------------------------------


def test_integers_past_a_columns_range_are_invalid_argument_naming_the_field(
    on_database: Stack,
) -> None:
    jobs = on_database.jobs_stub(ADMIN_TOKEN)
    queue = on_database.queue_stub(ADMIN_TOKEN)
    job = jobs.SubmitJob(
        jpb.SubmitJobRequest(request_id="big-ints", spec=spec("true")), timeout=RPC_TIMEOUT
    ).job

    update = jpb.UpdateJobStatusRequest(
        job_id=job.job_id, generation=1, sequence=2**63, state=jpb.JOB_STATE_RUNNING, attempt=1
    )
    assert _fails(jobs.UpdateJobStatus, update).field_violations == [
        ("sequence", f"at most {2**63 - 1}")
    ]
    output = jpb.AppendJobOutputRequest(
        job_id=job.job_id, generation=1, attempt=2**31, data=b"x", total_bytes=2**64 - 1
    )
    assert sorted(_fails(jobs.AppendJobOutput, output).field_violations) == [
        ("attempt", f"at most {2**31 - 1}"),
        ("total_bytes", f"at most {2**63 - 1}"),
    ]
    enqueue = qpb.EnqueueRequest(job_id="big-generation", generation=2**31, spec=spec("true"))
    assert _fails(queue.Enqueue, enqueue).field_violations == [
        ("generation", f"at most {2**31 - 1}")
    ]


def test_in_a_batch_only_the_item_past_a_columns_range_fails(on_database: Stack) -> None:
    jobs = on_database.jobs_stub(ADMIN_TOKEN)
    queue = on_database.queue_stub(ADMIN_TOKEN)
    job = jobs.SubmitJob(
        jpb.SubmitJobRequest(request_id="batch-ints", spec=spec("true")), timeout=RPC_TIMEOUT
    ).job

    def update(sequence: int) -> jpb.UpdateJobStatusRequest:
        return jpb.UpdateJobStatusRequest(
            job_id=job.job_id,
            generation=1,
            sequence=sequence,
            state=jpb.JOB_STATE_RUNNING,
            attempt=1,
        )

    statuses = jobs.BatchUpdateJobStatus(
        jpb.BatchUpdateJobStatusRequest(requests=[update(2**63), update(5)]),
        timeout=RPC_TIMEOUT,
    ).results
    assert statuses[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "sequence" in statuses[0].error.message
    assert statuses[1].response.applied
    assert jobs.GetJob(jpb.GetJobRequest(job_id=job.job_id)).job.state == jpb.JOB_STATE_RUNNING

    enqueues = queue.BatchEnqueue(
        qpb.BatchEnqueueRequest(
            requests=[
                qpb.EnqueueRequest(job_id="huge-gen", generation=2**32 - 1, spec=spec("true")),
                qpb.EnqueueRequest(job_id="fine-gen", generation=1, spec=spec("true")),
            ]
        ),
        timeout=RPC_TIMEOUT,
    ).results
    assert enqueues[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "generation" in enqueues[0].error.message
    assert enqueues[1].response.created


# ---- NUL in text ---------------------------------------------------------------------------


def test_a_nul_in_any_text_is_invalid_argument_naming_the_field(on_database: Stack) -> None:
    jobs = on_database.jobs_stub(ADMIN_TOKEN)
    queue = on_database.queue_stub(ADMIN_TOKEN)
    cases = [
        (jobs.GetJob, jpb.GetJobRequest(job_id="j\x00"), "job_id"),
        (jobs.SubmitJob, jpb.SubmitJobRequest(request_id="r\x00", spec=spec("true")), "request_id"),
        (
            jobs.SubmitJob,
            jpb.SubmitJobRequest(spec=spec("true", labels={"team": "a\x00b"})),
            "spec.labels[team]",
        ),
        (jobs.ListJobs, jpb.ListJobsRequest(labels={"team": "\x00"}), "labels[team]"),
        (jobs.CancelJob, jpb.CancelJobRequest(job_id="j-1", reason="\x00"), "reason"),
        (
            jobs.AppendJobOutput,
            jpb.AppendJobOutputRequest(job_id="j-1", generation=1, attempt=1, execution_id="\x00"),
            "execution_id",
        ),
        (queue.Heartbeat, qpb.HeartbeatRequest(lease_token="t\x00"), "lease_token"),
        (queue.Release, qpb.ReleaseRequest(lease_token="t", reason="\x00"), "reason"),
        (
            queue.Enqueue,
            qpb.EnqueueRequest(
                job_id="nul-label", generation=1, trace_context={"traceparent": "\x00"}
            ),
            "trace_context[traceparent]",
        ),
    ]
    for call, request, field in cases:
        failure = _fails(call, request)
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT, (field, failure)
        assert (field, "must not contain NUL (\\0) characters") in failure.field_violations


def test_a_nul_in_a_jobs_output_or_error_is_not_refused(on_database: Stack) -> None:
    """Output and error are data a job produced: the edge lets them through (another
    change stores them losslessly); only a column's limits may refuse them."""
    jobs = on_database.jobs_stub(ADMIN_TOKEN)
    job = jobs.SubmitJob(
        jpb.SubmitJobRequest(request_id="nul-out", spec=spec("true")), timeout=RPC_TIMEOUT
    ).job
    update = jpb.UpdateJobStatusRequest(
        job_id=job.job_id,
        generation=1,
        sequence=3,
        state=jpb.JOB_STATE_FAILED,
        attempt=1,
        output_tail="a\x00b",
        error="c\x00d",
    )
    try:
        jobs.UpdateJobStatus(update, timeout=RPC_TIMEOUT)
    except grpc.RpcError as exc:
        failure = describe(exc)
        assert failure.code != grpc.StatusCode.INVALID_ARGUMENT or not any(
            "NUL" in d for _, d in failure.field_violations
        ), failure


# ---- a million entries -------------------------------------------------------------------


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.parametrize("valid", [True, False], ids=["valid-states", "invalid-states"])
def test_a_million_states_are_refused_at_once_and_cheaply(
    make_stack,  # type: ignore[no-untyped-def]
    valid: bool,
) -> None:
    stack = make_stack().start_pair().start_vms({"VMS_MANAGER": "none"})
    jobs, queue = stack.jobs_stub(), stack.queue_stub()
    vms = stack.vms_stub()
    value = 1 if valid else 99
    before = _rss_mib()
    started = time.monotonic()

    failures = [
        _fails(jobs.ListJobs, jpb.ListJobsRequest(states=[value] * 1_000_000)),
        _fails(queue.ListItems, qpb.ListItemsRequest(states=[value] * 1_000_000)),
        _fails(vms.ListVms, vpb.ListVmsRequest(states=[value] * 1_000_000)),
    ]

    elapsed = time.monotonic() - started
    for failure in failures:
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT, failure
        assert failure.field_violations == [("states", "at most 64 entries")]
    assert elapsed < 10, f"{elapsed:.1f}s to refuse three requests"
    assert _rss_mib() - before < 150, f"RSS grew from {before:.0f} to {_rss_mib():.0f} MiB"


# ---- errors that would not fit in a status ------------------------------------------------


def test_an_error_echoing_a_huge_value_stays_readable(stack: Stack) -> None:
    jobs = stack.jobs_stub()
    key = "K" * 65_000
    failure = _fails(
        jobs.SubmitJob, jpb.SubmitJobRequest(spec=spec("true", labels={key: "v", "ok": "x" * 9999}))
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(failure.message.encode()) <= 512
    assert failure.field_violations, "the problems are listed"
    assert all(len(f) <= 200 and len(d) <= 200 for f, d in failure.field_violations)


def test_many_problems_list_the_first_and_count_the_rest(stack: Stack) -> None:
    jobs = stack.jobs_stub()
    labels = {f"BAD{i}": "v" for i in range(30)}  # 30 keys that break the key rule
    failure = _fails(
        jobs.SubmitJob,
        jpb.SubmitJobRequest(
            spec=spec("true", labels=labels, env={f"{i}x": "" for i in range(200)})
        ),
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(failure.field_violations) == MAX_LISTED
    total = int(failure.metadata["problems"])
    assert total > MAX_LISTED
    assert failure.message.startswith(f"the request has {total} problems:")


# ---- the worker's role -------------------------------------------------------------------


def test_garbage_from_a_worker_to_a_client_call_is_permission_denied(secured: Stack) -> None:
    call = _raw(
        secured.channel(secured.jobs_target, WORKER_TOKEN), "/blixard.jobs.v1.JobService/GetJob"
    )
    assert _fails(call, GARBAGE).code == grpc.StatusCode.PERMISSION_DENIED
