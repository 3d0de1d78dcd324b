"""JobManager.submit_many on the fake, SQLite and PostgreSQL: one transaction for a batch,
idempotent per request_id also against concurrent batches, each job failing alone."""

from __future__ import annotations

import threading

import pytest

from services.common.errors import AlreadyExists, InvalidArgument
from services.jobs import store as jobs_store
from services.jobs.domain import JobFilter, JobState, SpecIndex, Submission
from services.jobs.manager import JobManager
from services.jobs.store import JobStore
from tests.storage.test_jobs_store import manager  # noqa: F401  (the fixture)

SPEC = '{"command": ["true"]}'
OTHER = '{"command": ["false"]}'


def test_a_batch_stores_each_job_with_its_labels_event_and_message(manager: JobManager) -> None:  # noqa: F811
    labelled = Submission("r-1", SPEC, SpecIndex(labels={"team": "blue"}))
    woken = manager.feed.version
    results = manager.submit_many(
        [labelled, Submission(None, SPEC), Submission("r-1", SPEC), Submission("r-1", OTHER)],
        {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
    )

    (first, created), (second, created_2), (again, created_3), reused = results
    assert (created, created_2, created_3) == (True, True, False)
    assert again.job_id == first.job_id != second.job_id
    assert isinstance(reused, AlreadyExists) and reused.metadata["job_id"] == first.job_id
    assert manager.store.outbox.pending() == 2
    assert manager.feed.version == woken + 1  # the relay is woken once, after the commit
    for job in (first, second):
        stored = manager.get(job.job_id)
        assert stored.state is JobState.PENDING and stored.spec_json == SPEC
        assert stored.trace_context["traceparent"].startswith("00-111")
        assert [(e.state, e.reason) for e in manager.events(job.job_id)] == [
            (JobState.PENDING, "submitted")
        ]
    found, _ = manager.list_jobs(10, where=JobFilter(labels=(("team", "blue"),)))
    assert [job.job_id for job in found] == [first.job_id]


def test_concurrent_batches_with_the_same_request_ids_make_each_job_once(
    manager: JobManager,  # noqa: F811
) -> None:
    request_ids = [f"r-{i:03d}" for i in range(50)]
    answers: list[list[str]] = []
    errors: list[BaseException] = []

    def submit(reverse: bool) -> None:
        order = sorted(request_ids, reverse=reverse)
        try:
            results = manager.submit_many([Submission(r, SPEC) for r in order], {})
            by_request = {job.request_id: job.job_id for job, _ in results}  # type: ignore[misc]
            answers.append([by_request[r] for r in request_ids])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(i % 2 == 1,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert all(answer == answers[0] for answer in answers)
    stored, _ = manager.list_jobs(1000)
    assert sorted(job.job_id for job in stored) == sorted(answers[0])
    assert manager.store.outbox.pending() == 50


@pytest.mark.parametrize("manager", ["postgresql"], indirect=True)  # it refuses NUL in text
def test_a_value_the_database_refuses_fails_that_job_alone(
    manager: JobManager,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert isinstance(manager.store, JobStore)
    # Without the check in Python, the database itself refuses the NUL in the label.
    monkeypatch.setattr(
        jobs_store, "_LABEL_LIMITS", jobs_store.ColumnLimits(jobs_store.JobRow.__table__)
    )  # type: ignore[arg-type]

    results = manager.submit_many(
        [
            Submission("r-ok", SPEC),
            Submission("r-nul", SPEC, SpecIndex(labels={"team": "a\x00b"})),
            Submission("r-ok-2", SPEC, SpecIndex(labels={"team": "b"})),
        ],
        {},
    )

    ok, refused, ok_2 = results
    assert isinstance(refused, InvalidArgument) and refused.reason == "VALUE_REFUSED"
    assert not isinstance(ok, BaseException) and ok[1]
    assert not isinstance(ok_2, BaseException) and ok_2[1]
    stored, _ = manager.list_jobs(10)
    assert sorted(j.request_id or "" for j in stored) == ["r-ok", "r-ok-2"]
    assert manager.store.outbox.pending() == 2
