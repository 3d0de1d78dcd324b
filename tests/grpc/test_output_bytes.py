"""A job's output is bytes, and its error any text: both round-trip exactly, on SQLite and
on PostgreSQL (which refuses NUL in text), from the worker through the queue to GetJob. One
job's odd bytes never cost another job of the same batch its completion."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from blixard.common.v1 import job_spec_pb2
from blixard.jobs.v1 import jobs_service_pb2 as jpb
from blixard.queue.v1 import queue_service_pb2 as qpb

from services.cli import main as blixctl
from services.common import pbtime
from tests.grpc.conftest import RPC_TIMEOUT, Stack, eventually, spec, wait_for_state

TERMINAL = {jpb.JOB_STATE_SUCCEEDED, jpb.JOB_STATE_FAILED, jpb.JOB_STATE_CANCELLED}
ODD = b"\x00\xff\xfe"  # a NUL, then bytes that are not UTF-8


@pytest.fixture(params=["sqlite", "postgresql"])
def pair(request: pytest.FixtureRequest, make_stack: Callable[..., Stack]) -> Iterator[Stack]:
    """A jobs service and its queue on SQLite files, or on two PostgreSQL databases."""
    stack = make_stack()
    if request.param == "sqlite":
        yield stack.start_pair()
        return
    cluster = request.getfixturevalue("postgres_cluster")
    yield stack.start_pair(
        queue_extra={"QUEUE_DATABASE_URL": cluster.new_database()},
        jobs_extra={"JOBS_DATABASE_URL": cluster.new_database()},
    )


def submit(stack: Stack, job_spec: job_spec_pb2.JobSpec) -> str:
    request = jpb.SubmitJobRequest(spec=job_spec)
    return stack.jobs_stub().SubmitJob(request, timeout=RPC_TIMEOUT).job.job_id


def claim_all(stack: Stack, n: int) -> dict[str, str]:
    """Lease tokens by job id of the n jobs submitted (the relay enqueues them shortly)."""
    queue = stack.queue_stub()
    leases: dict[str, str] = {}

    def probe() -> bool:
        request = qpb.ClaimRequest(
            worker_id="w-bytes",
            worker_type="process",
            max_items=n - len(leases),
            lease_duration=pbtime.duration(30),
        )
        for lease in queue.Claim(request, timeout=RPC_TIMEOUT).leases:
            leases[lease.item.job_id] = lease.lease_token
        return len(leases) == n

    eventually(probe, 10, f"{n} leases")
    return leases


def test_one_jobs_nul_in_a_batch_of_completions_costs_no_one_their_result(pair: Stack) -> None:
    raw, old_client, normal = (submit(pair, spec("true", max_attempts=1)) for _ in range(3))
    leases = claim_all(pair, 3)
    failed = job_spec_pb2.OUTCOME_FAILED
    requests = [
        # Bytes that are not text, and an error quoting them as far as text can.
        qpb.CompleteRequest(
            lease_token=leases[raw],
            outcome=failed,
            exit_code=3,
            output_tail_bytes=ODD,
            output_tail="\x00\ufffd\ufffd",
            error="stderr: \x00\ufffd and more",
        ),
        # A worker that predates output_tail_bytes: its text, NUL included, is stored.
        qpb.CompleteRequest(
            lease_token=leases[old_client],
            outcome=failed,
            exit_code=4,
            output_tail="a\x00b",
            error="\x00",
        ),
        qpb.CompleteRequest(
            lease_token=leases[normal],
            outcome=job_spec_pb2.OUTCOME_SUCCEEDED,
            exit_code=0,
            output_tail_bytes=b"fine\n",
            output_tail="fine\n",
        ),
    ]

    reply = pair.queue_stub().BatchComplete(
        qpb.BatchCompleteRequest(requests=requests), timeout=RPC_TIMEOUT
    )

    assert [r.WhichOneof("result") for r in reply.results] == ["item"] * 3, reply
    assert reply.results[0].item.output_tail_bytes == ODD
    jobs = pair.jobs_stub()
    first = wait_for_state(jobs, raw, TERMINAL)
    assert (first.state, first.exit_code) == (jpb.JOB_STATE_FAILED, 3)
    assert first.output_tail_bytes == ODD
    assert first.output_tail == "\x00\ufffd\ufffd"  # the text view, for older clients
    assert first.error == "stderr: \x00\ufffd and more"
    second = wait_for_state(jobs, old_client, TERMINAL)
    assert (second.state, second.exit_code) == (jpb.JOB_STATE_FAILED, 4)
    assert (second.output_tail_bytes, second.output_tail, second.error) == (
        b"a\x00b",
        "a\x00b",
        "\x00",
    )
    third = wait_for_state(jobs, normal, TERMINAL)
    assert third.state == jpb.JOB_STATE_SUCCEEDED
    assert (third.output_tail_bytes, third.output_tail, third.error) == (b"fine\n", "fine\n", "")
    # The queue keeps them too.
    item = pair.queue_stub().GetItem(qpb.GetItemRequest(job_id=raw), timeout=RPC_TIMEOUT).item
    assert (item.output_tail_bytes, item.error) == (ODD, "stderr: \x00\ufffd and more")


def test_a_status_batch_with_odd_bytes_applies_and_refuses_only_the_oversized(
    pair: Stack,
) -> None:
    """BatchUpdateJobStatus straight to the jobs service (as the queue's relay sends it)."""
    jobs = pair.jobs_stub()
    odd, too_big, normal = (submit(pair, spec("true")) for _ in range(3))
    for job_id in (odd, too_big, normal):
        wait_for_state(jobs, job_id, {jpb.JOB_STATE_QUEUED})

    def failed(job_id: str, **fields: object) -> jpb.UpdateJobStatusRequest:
        return jpb.UpdateJobStatusRequest(
            job_id=job_id,
            generation=1,
            sequence=100,
            state=jpb.JOB_STATE_FAILED,
            attempt=1,
            exit_code=1,
            **fields,  # type: ignore[arg-type]
        )

    reply = jobs.BatchUpdateJobStatus(
        jpb.BatchUpdateJobStatusRequest(
            requests=[
                failed(odd, output_tail_bytes=ODD, error="\x00 at the start", reason="r\x00"),
                failed(too_big, output_tail_bytes=b"x" * (64 * 1024 + 1)),
                failed(normal, output_tail="plain\n", error="plain"),
            ]
        ),
        timeout=RPC_TIMEOUT,
    )

    assert [r.WhichOneof("result") for r in reply.results] == ["response", "error", "response"]
    assert "output_tail_bytes" in reply.results[1].error.message
    first = jobs.GetJob(jpb.GetJobRequest(job_id=odd), timeout=RPC_TIMEOUT).job
    assert (first.state, first.output_tail_bytes, first.error) == (
        jpb.JOB_STATE_FAILED,
        ODD,
        "\x00 at the start",
    )
    events = jobs.ListJobEvents(jpb.ListJobEventsRequest(job_id=odd), timeout=RPC_TIMEOUT)
    assert events.events[-1].reason == "r\x00"
    last = jobs.GetJob(jpb.GetJobRequest(job_id=normal), timeout=RPC_TIMEOUT).job
    assert (last.state, last.output_tail_bytes, last.error) == (
        jpb.JOB_STATE_FAILED,
        b"plain\n",
        "plain",
    )


def test_a_cancelled_jobs_error_with_a_nul_reaches_its_history(pair: Stack) -> None:
    """An item cancelled in the queue while it runs (an operator's CancelItem) ends
    CANCELLED with a reason quoting the worker's error, NUL and all, in the job's history."""
    job_id = submit(pair, spec("true", max_attempts=1))
    token = claim_all(pair, 1)[job_id]
    jobs = pair.jobs_stub()
    wait_for_state(jobs, job_id, {jpb.JOB_STATE_RUNNING})
    queue = pair.queue_stub()
    queue.CancelItem(qpb.CancelItemRequest(job_id=job_id, generation=1), timeout=RPC_TIMEOUT)

    queue.Complete(
        qpb.CompleteRequest(
            lease_token=token,
            outcome=job_spec_pb2.OUTCOME_FAILED,
            exit_code=1,
            output_tail_bytes=ODD,
            error="killed\x00",
        ),
        timeout=RPC_TIMEOUT,
    )

    job = wait_for_state(jobs, job_id, TERMINAL)
    assert (job.state, job.output_tail_bytes) == (jpb.JOB_STATE_CANCELLED, ODD)
    events = jobs.ListJobEvents(jpb.ListJobEventsRequest(job_id=job_id), timeout=RPC_TIMEOUT)
    assert events.events[-1].reason == "cancelled; attempt 1: killed\x00"


def test_a_job_that_prints_any_bytes_gets_them_back_exactly(
    pair: Stack, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """A real worker runs the job: GetJob, and `blixctl get`, give back the very bytes."""
    pair.start_worker()
    script = r'printf "a\0b\377"; printf "\0\376" >&2; exit 3'
    printed = b"a\x00b\xff\x00\xfe"  # stderr goes to the same output
    job_id = submit(pair, spec("sh", "-c", script, max_attempts=1))
    fine = submit(pair, spec("sh", "-c", "echo plain text", max_attempts=1))
    jobs = pair.jobs_stub()

    done = wait_for_state(jobs, job_id, TERMINAL)

    assert (done.state, done.exit_code) == (jpb.JOB_STATE_FAILED, 3)
    assert done.output_tail_bytes == printed
    assert wait_for_state(jobs, fine, TERMINAL).output_tail_bytes == b"plain text\n"
    watched = next(iter(jobs.WatchJob(jpb.WatchJobRequest(job_id=job_id), timeout=RPC_TIMEOUT)))
    assert watched.job.output_tail_bytes == printed

    capsysbinary.readouterr()
    assert blixctl.main(["get", job_id, "--address", pair.jobs_target]) == 0
    out = capsysbinary.readouterr().out
    assert out.endswith(b"output:\n" + printed + b"\n"), out
