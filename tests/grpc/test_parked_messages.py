"""Parked outbox messages through the services: a report the jobs service refuses is
parked by the queue's relay after a few tries, the later reports of that job go through,
and an operator (admin token) lists, counts, redrives and deletes it."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import pytest
from blixard.common.v1.outbox_pb2 import ParkedMessage
from blixard.jobs.v1 import jobs_service_pb2 as jpb
from blixard.queue.v1 import queue_service_pb2 as qpb
from sqlalchemy import Engine

from services.cli import main as cli
from services.common import db, paging
from services.common.clock import Clock
from services.common.outbox import SqlOutbox
from services.jobs.models import OutboxRow as JobsOutboxRow
from services.queue.domain import Report
from services.queue.models import OutboxRow
from services.queue.store import _payload
from tests.grpc.conftest import (
    ADMIN_TOKEN,
    CLIENT_TOKEN,
    RPC_TIMEOUT,
    TOKENS,
    Stack,
    eventually,
    spec,
    wait_for_state,
)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = Stack(tmp_path_factory.mktemp("parked"), dict(TOKENS))
    try:
        running.start_pair()
        yield running
    finally:
        running.stop()


def queue_outbox(stack: Stack) -> tuple[Engine, SqlOutbox]:
    engine = db.make_engine(f"sqlite:///{stack.tmp}/queue.sqlite3", setting="QUEUE_DATABASE_URL")
    return engine, SqlOutbox(engine, OutboxRow)


def report_from_the_queue(stack: Stack, reports: list[Report]) -> None:
    """Reports written to the queue's outbox as its transitions write them (one commit)."""
    engine, outbox = queue_outbox(stack)
    now = Clock().now()
    with engine.begin() as connection:
        outbox.add_many(connection, [("status", r.job_id, _payload(r), now) for r in reports])
    engine.dispose()


def test_a_poison_report_is_parked_and_a_later_report_of_its_job_gets_through(
    secured: Stack,
) -> None:
    """Issue 14's "Seen:": a report the jobs service can never apply (here sequence 0,
    which it refuses as INVALID_ARGUMENT, as it refuses a NUL byte or a worker id too
    long) no longer keeps the job's later reports from it: the job ends SUCCEEDED, and
    the poison report is kept, listed and counted."""
    jobs = secured.jobs_stub(CLIENT_TOKEN)
    queue = secured.queue_stub(ADMIN_TOKEN)
    job = jobs.SubmitJob(jpb.SubmitJobRequest(spec=spec("true")), timeout=RPC_TIMEOUT).job
    wait_for_state(jobs, job.job_id, {jpb.JOB_STATE_QUEUED})
    at = Clock().now()
    report_from_the_queue(
        secured,
        [
            Report(job.job_id, 1, 0, "RUNNING", at, 1, "w-poison"),  # refused, every time
            Report(job.job_id, 1, 90, "RUNNING", at, 1, "w-1"),
            Report(job.job_id, 1, 91, "SUCCEEDED", at, 1, "w-1", exit_code=0),
        ],
    )

    def parked_list() -> qpb.ListParkedMessagesResponse | None:
        found = queue.ListParkedMessages(qpb.ListParkedMessagesRequest(), timeout=RPC_TIMEOUT)
        return found if found.messages else None

    listed = eventually(parked_list, 20, "the poison report to be parked")
    done = wait_for_state(jobs, job.job_id, {jpb.JOB_STATE_SUCCEEDED})

    assert done.worker_id == "w-1"
    [parked] = listed.messages
    assert listed.total_parked == 1 and not listed.next_page_token
    assert (parked.topic, parked.key, parked.attempts) == ("status", job.job_id, 3)
    assert json.loads(parked.payload)["worker_id"] == "w-poison"
    assert "sequence" in parked.last_error and parked.park_time.seconds > 0
    stats = queue.GetStats(qpb.GetStatsRequest(), timeout=RPC_TIMEOUT)
    assert stats.parked_messages == 1

    # Redriven, it is refused again and parked again after as many tries.
    redriven = queue.RedriveParkedMessage(
        qpb.RedriveParkedMessageRequest(id=parked.id), timeout=RPC_TIMEOUT
    ).message
    assert redriven.id == parked.id

    def parked_again() -> qpb.ListParkedMessagesResponse | None:
        found = parked_list()
        return found if found and found.messages[0].park_time != parked.park_time else None

    again = eventually(parked_again, 20, "the redriven report to be parked again")
    assert [m.id for m in again.messages] == [parked.id] and again.messages[0].attempts == 3

    deleted = queue.DeleteParkedMessage(
        qpb.DeleteParkedMessageRequest(id=parked.id), timeout=RPC_TIMEOUT
    ).message
    assert deleted.id == parked.id
    assert queue.GetStats(qpb.GetStatsRequest(), timeout=RPC_TIMEOUT).parked_messages == 0
    with pytest.raises(grpc.RpcError) as caught:
        queue.DeleteParkedMessage(qpb.DeleteParkedMessageRequest(id=parked.id), timeout=RPC_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert f"parked message '{parked.id}' not found" in (caught.value.details() or "")


def test_a_cancel_the_queue_refuses_is_parked_by_the_jobs_service(secured: Stack) -> None:
    """The jobs service's outbox parks too: a cancel the queue refuses (a job id it can
    never hold) is listed by the jobs service after three tries, then deleted."""
    engine = db.make_engine(f"sqlite:///{secured.tmp}/jobs.sqlite3", setting="JOBS_DATABASE_URL")
    outbox = SqlOutbox(engine, JobsOutboxRow)
    with engine.begin() as connection:
        payload = {"job_id": "j" * 65, "generation": 1}
        outbox.add_many(connection, [("cancel", "too-long-id", payload, Clock().now())])
    engine.dispose()
    jobs = secured.jobs_stub(ADMIN_TOKEN)

    def parked() -> list[ParkedMessage]:
        found = jobs.ListParkedMessages(jpb.ListParkedMessagesRequest(), timeout=RPC_TIMEOUT)
        return [m for m in found.messages if m.key == "too-long-id"]

    [message] = eventually(parked, 20, "the jobs service to park the cancel")

    assert (message.topic, message.attempts) == ("cancel", 3)
    assert "job_id" in message.last_error and "64" in message.last_error
    jobs.DeleteParkedMessage(jpb.DeleteParkedMessageRequest(id=message.id), timeout=RPC_TIMEOUT)
    assert parked() == []


def test_parked_messages_are_for_operators_only(secured: Stack) -> None:
    for stub, request in (
        (secured.jobs_stub(CLIENT_TOKEN).ListParkedMessages, jpb.ListParkedMessagesRequest()),
        (secured.queue_stub(CLIENT_TOKEN).ListParkedMessages, qpb.ListParkedMessagesRequest()),
        (
            secured.jobs_stub(CLIENT_TOKEN).RedriveParkedMessage,
            jpb.RedriveParkedMessageRequest(id=1),
        ),
        (
            secured.queue_stub(CLIENT_TOKEN).DeleteParkedMessage,
            qpb.DeleteParkedMessageRequest(id=1),
        ),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            stub(request, timeout=RPC_TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

    jobs = secured.jobs_stub(ADMIN_TOKEN)
    listed = jobs.ListParkedMessages(jpb.ListParkedMessagesRequest(), timeout=RPC_TIMEOUT)
    assert list(listed.messages) == [] and listed.total_parked == 0


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (jpb.ListParkedMessagesRequest(page_size=1001), "page_size"),
        (jpb.ListParkedMessagesRequest(page_token=paging.encode("not-a-number")), "page_token"),
        (jpb.ListParkedMessagesRequest(page_token=paging.encode("9" * 30)), "page_token"),
        (jpb.RedriveParkedMessageRequest(id=0), "id"),
        (jpb.DeleteParkedMessageRequest(id=-5), "id"),
    ],
)
def test_a_bad_parked_message_request_is_invalid_argument(
    secured: Stack, request_: object, field: str
) -> None:
    jobs = secured.jobs_stub(ADMIN_TOKEN)
    method = getattr(jobs, type(request_).__name__.removesuffix("Request"))
    with pytest.raises(grpc.RpcError) as caught:
        method(request_, timeout=RPC_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (caught.value.details() or "")


def test_blixctl_lists_redrives_and_deletes_parked_messages(
    secured: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BLIXARD_ADMIN_TOKEN", ADMIN_TOKEN)
    queue = secured.queue_stub(ADMIN_TOKEN)
    report_from_the_queue(secured, [Report("cli-job", 1, 0, "RUNNING", Clock().now(), 1)])

    def parked_ids() -> list[int]:
        found = queue.ListParkedMessages(qpb.ListParkedMessagesRequest(), timeout=RPC_TIMEOUT)
        return [m.id for m in found.messages if m.key == "cli-job"]

    [message_id] = eventually(parked_ids, 20, "the report to be parked")
    capsys.readouterr()

    def blixctl(*args: str) -> tuple[int, str, str]:
        target = secured.queue_target if args[1] == "queue" else secured.jobs_target
        code = cli.main([*args[:2], "--address", target, *args[2:]])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = blixctl("parked", "queue")
    assert code == 0, err
    [row] = [line for line in out.splitlines() if "cli-job" in line]
    assert row.split()[:4] == [str(message_id), "status", "cli-job", "3"]
    assert "sequence" in row and "1 parked in all" in err

    code, out, _ = blixctl("parked", "queue", "--json")
    assert [json.loads(line)["key"] for line in out.splitlines()] == ["cli-job"]

    code, out, _ = blixctl("redrive-parked", "queue", str(message_id))
    assert code == 0 and f"message {message_id} (status cli-job) goes out again" in out
    eventually(parked_ids, 20, "the redriven report to be parked again")

    code, out, _ = blixctl("delete-parked", "queue", str(message_id))
    assert code == 0 and "deleted" in out and parked_ids() == []

    code, _, err = blixctl("delete-parked", "queue", str(message_id))
    assert code == cli.EXIT_RPC and "not found" in err

    monkeypatch.delenv("BLIXARD_ADMIN_TOKEN")
    monkeypatch.setenv("BLIXARD_CLIENT_TOKEN", CLIENT_TOKEN)
    code, _, err = blixctl("parked", "jobs")
    assert code == cli.EXIT_RPC and "PERMISSION_DENIED" in err
