"""BatchSubmitJobs: many SubmitJob in one call and one transaction, each with its own result
in order, idempotent by each request_id, on SQLite and on PostgreSQL; the jobs it creates
run like submitted ones."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from blixard.common.v1 import job_spec_pb2
from blixard.jobs.v1 import jobs_service_pb2 as jpb
from opentelemetry import trace

from services.cli import main as cli
from services.common.errors import describe
from tests.grpc.conftest import RPC_TIMEOUT, Stack, spec, wait_for_state

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS.value[0]


@pytest.fixture(params=["sqlite", "postgresql"])
def pair(request: pytest.FixtureRequest, make_stack: Callable[..., Stack]) -> Iterator[Stack]:
    """A jobs service, its queue and a worker, on SQLite files or on PostgreSQL databases."""
    stack = make_stack()
    if request.param == "sqlite":
        stack.start_pair()
    else:
        cluster = request.getfixturevalue("postgres_cluster")
        stack.start_pair(
            queue_extra={"QUEUE_DATABASE_URL": cluster.new_database()},
            jobs_extra={"JOBS_DATABASE_URL": cluster.new_database()},
        )
    yield stack.start_worker("batch-submit-worker")


def one(request_id: str, job_spec: job_spec_pb2.JobSpec) -> jpb.SubmitJobRequest:
    return jpb.SubmitJobRequest(request_id=request_id, spec=job_spec)


def batch(stack: Stack, requests: list[jpb.SubmitJobRequest]) -> list[jpb.BatchSubmitJobsResult]:
    call = jpb.BatchSubmitJobsRequest(requests=requests)
    return list(stack.jobs_stub().BatchSubmitJobs(call, timeout=RPC_TIMEOUT).results)


def all_jobs(stack: Stack) -> list[jpb.Job]:
    request = jpb.ListJobsRequest(page_size=100)
    return list(stack.jobs_stub().ListJobs(request, timeout=RPC_TIMEOUT).jobs)


def test_a_mixed_batch_answers_each_request_in_order_and_runs_the_valid_jobs(pair: Stack) -> None:
    earlier = (
        pair.jobs_stub()
        .SubmitJob(one("r-earlier", spec("echo", "earlier")), timeout=RPC_TIMEOUT)
        .job
    )
    wait_for_state(pair.jobs_stub(), earlier.job_id, {jpb.JOB_STATE_SUCCEEDED})
    requests = [
        one("r-a", spec("echo", "a")),
        one("r-bad", spec()),  # no command
        one("r-a", spec("echo", "a")),  # the same request again: the same job
        one("r-a", spec("echo", "another")),  # its request_id, another spec
        one("r-b", spec("echo", "b", labels={"team": "x\x00y"})),  # PostgreSQL refuses NUL
        one("r-earlier", spec("echo", "earlier")),  # submitted before: that job
        one("r-earlier", spec("echo", "not earlier")),
        one("r-c", spec("echo", "c", labels={"team": "blue"})),
        jpb.SubmitJobRequest(request_id="r" * 257, spec=spec("true")),
    ]

    results = batch(pair, requests)

    assert [r.WhichOneof("result") for r in results] == [
        "response",
        "error",
        "response",
        "error",
        "error",
        "response",
        "error",
        "response",
        "error",
    ]
    a, c = results[0].response.job, results[7].response.job
    assert list(a.spec.command) == ["echo", "a"] and a.request_id == "r-a"
    assert a.state == jpb.JOB_STATE_PENDING
    assert results[2].response.job.job_id == a.job_id
    assert results[5].response.job.job_id == earlier.job_id
    assert results[5].response.job.state == jpb.JOB_STATE_SUCCEEDED
    assert dict(c.spec.labels) == {"team": "blue"}

    bad = results[1].error
    assert bad.code == INVALID_ARGUMENT
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("requests[1].spec.command", "required: the program and its arguments (argv)")
    ]
    assert "requests[1].spec.command" in bad.message
    reused = results[3].error
    assert (reused.code, reused.reason) == (ALREADY_EXISTS, "REQUEST_ID_REUSED")
    assert reused.metadata["job_id"] == a.job_id
    refused = results[4].error
    assert refused.code == INVALID_ARGUMENT
    assert "NUL" in refused.message
    reused_earlier = results[6].error
    assert (reused_earlier.code, reused_earlier.reason) == (ALREADY_EXISTS, "REQUEST_ID_REUSED")
    assert reused_earlier.metadata == {"job_id": earlier.job_id, "request_id": "r-earlier"}
    too_long = results[8].error
    assert [v.field for v in too_long.field_violations] == ["requests[8].request_id"]

    # The valid jobs run, like submitted ones.
    for job in (a, c):
        done = wait_for_state(pair.jobs_stub(), job.job_id, {jpb.JOB_STATE_SUCCEEDED})
        assert done.output_tail_bytes.strip() in (b"a", b"c")
    stored = {job.job_id for job in all_jobs(pair)}
    assert stored == {earlier.job_id, a.job_id, c.job_id}

    # The same batch again creates nothing new and answers the same.
    again = batch(pair, requests)

    assert [r.WhichOneof("result") for r in again] == [r.WhichOneof("result") for r in results]
    for before, after in zip(results, again, strict=True):
        if before.HasField("response"):
            assert after.response.job.job_id == before.response.job.job_id
        else:
            assert (after.error.code, after.error.reason) == (
                before.error.code,
                before.error.reason,
            )
    assert again[0].response.job.state == jpb.JOB_STATE_SUCCEEDED
    assert {job.job_id for job in all_jobs(pair)} == stored


def test_the_first_of_two_specs_under_one_request_id_wins_within_a_batch(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack().start_pair()

    results = batch(stack, [one("r-x", spec("echo", "1")), one("r-x", spec("echo", "2"))])

    first = results[0].response.job
    assert list(first.spec.command) == ["echo", "1"]
    assert results[1].error.code == ALREADY_EXISTS
    assert results[1].error.metadata["job_id"] == first.job_id
    assert [job.job_id for job in all_jobs(stack)] == [first.job_id]


def test_each_job_of_a_batch_carries_the_callers_trace(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack().start_pair()

    with trace.get_tracer("tests").start_as_current_span("test.batch") as root:
        results = batch(stack, [one("", spec("true")), one("", spec("echo", "x"))])
    trace_id = format(root.get_span_context().trace_id, "032x")

    assert [r.response.job.trace_id for r in results] == [trace_id, trace_id]
    assert results[0].response.job.job_id != results[1].response.job.job_id


def test_an_empty_batch_answers_empty_and_more_than_1000_is_refused_whole(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack().start_pair()

    assert batch(stack, []) == []
    with pytest.raises(grpc.RpcError) as caught:
        batch(stack, [one("", spec("true")) for _ in range(1001)])

    failure = describe(caught.value)
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.field_violations == [("requests", "at most 1000")]
    assert all_jobs(stack) == []


def test_blixctl_submit_many_submits_a_file_of_json_lines(
    make_stack: Callable[..., Stack],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stack = make_stack().start_pair()
    lines = tmp_path / "jobs.jsonl"
    lines.write_text(
        '{"request_id": "m-1", "spec": {"command": ["echo", "one"]}}\n'
        "\n"
        '{"request_id": "m-2", "spec": {}}\n'
        '{"request_id": "m-1", "spec": {"command": ["echo", "one"]}}\n'
    )

    def blixctl(*args: str) -> tuple[int, str, str]:
        code = cli.main([args[0], "--address", stack.jobs_target, *args[1:]])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = blixctl("submit-many", str(lines))

    first, refused, again = out.splitlines()
    assert code == cli.EXIT_RPC
    assert refused == "-" and again == first
    assert f"{lines}:3: the request has 1 problem: spec.command: required" in err
    assert "  spec.command: required" in err
    assert [job.job_id for job in all_jobs(stack)] == [first]

    code, out, _ = blixctl("submit-many", str(lines), "--json")
    answers = [json.loads(line) for line in out.splitlines()]
    assert [a.get("response", {}).get("job", {}).get("jobId") for a in answers] == [
        first,
        None,
        first,
    ]
    assert answers[1]["error"]["reason"] == "INVALID_ARGUMENT"

    lines.write_text('{"request_id": "m-3", "spec": {"comand": []}}\n')
    code, _, err = blixctl("submit-many", str(lines))
    assert code == cli.EXIT_USAGE and f"{lines}:1: not a SubmitJobRequest" in err


def test_a_batch_whose_answer_would_pass_the_message_limit_is_refused_whole(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack().start_pair()
    # About 4.1 MB: within the 4 MiB a message may carry, but each job comes back with its
    # spec and more, so the answer could not be sent.
    big = [one(f"big-{i}", spec("true", payload=b"x" * 4100)) for i in range(1000)]

    with pytest.raises(grpc.RpcError) as caught:
        batch(stack, big)

    failure = describe(caught.value)
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = failure.field_violations
    assert field == "requests" and "4 MiB" in description
    assert all_jobs(stack) == []
    # Half of it goes in one call.
    assert all(r.HasField("response") for r in batch(stack, big[:500]))
