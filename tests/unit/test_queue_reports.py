"""A queue report survives the outbox: stored as JSON, sent as UpdateJobStatus."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from blixard.jobs.v1 import jobs_service_pb2 as jpb

from services.queue import convert
from services.queue.domain import Report
from services.queue.store import _payload

AT = datetime(2026, 12, 1, 4, 30, 5, 123456, tzinfo=UTC)


@pytest.mark.parametrize("exit_code", [None, 0, 3])
def test_a_stored_report_becomes_the_update_the_jobs_service_gets(exit_code: int | None) -> None:
    report = Report("job-1", 2, 7, "SUCCEEDED", AT, 3, "w-1", exit_code, b"tail\n", "", "done")
    stored = json.loads(json.dumps(_payload(report)))  # what the outbox row holds

    request = convert.update_request(stored)

    assert (request.job_id, request.generation, request.sequence, request.attempt) == (
        "job-1",
        2,
        7,
        3,
    )
    assert request.state == jpb.JOB_STATE_SUCCEEDED
    assert (request.worker_id, request.output_tail, request.error, request.reason) == (
        "w-1",
        "tail\n",
        "",
        "done",
    )
    assert request.event_time.ToDatetime(tzinfo=UTC) == AT
    assert request.HasField("exit_code") is (exit_code is not None)
    if exit_code is not None:
        assert request.exit_code == exit_code


@pytest.mark.parametrize(
    "state", ["PENDING", "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"]
)
def test_every_reported_state_has_a_job_state(state: str) -> None:
    report = Report("job-1", 1, 1, state, AT, 1)
    request = convert.update_request(json.loads(json.dumps(_payload(report))))
    assert jpb.JobState.Name(request.state) == f"JOB_STATE_{state}"


def test_any_output_bytes_and_error_text_survive_the_outbox_exactly() -> None:
    report = Report("job-1", 1, 2, "FAILED", AT, 1, "w-1", 3, b"a\x00b\xff\xfe", "e\x00rr\n")
    stored = json.dumps(_payload(report))  # the outbox row's text: JSON, no raw NUL in it
    assert "\x00" not in stored

    request = convert.update_request(json.loads(stored))

    assert request.output_tail_bytes == b"a\x00b\xff\xfe"
    assert request.output_tail == "a\x00b\ufffd\ufffd"  # the text view, for older services
    assert request.error == "e\x00rr\n"


def test_a_report_stored_before_tails_were_bytes_keeps_its_tail() -> None:
    """An outbox row written by the previous version: output_tail as JSON text."""
    stored = {
        "job_id": "job-1",
        "generation": 1,
        "sequence": 2,
        "job_state": "SUCCEEDED",
        "at": AT.isoformat(),
        "attempt": 1,
        "output_tail": "hé\n",
    }

    request = convert.update_request(stored)

    assert (request.output_tail_bytes, request.output_tail) == ("hé\n".encode(), "hé\n")
