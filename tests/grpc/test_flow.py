"""One job's life in-process: jobs service -> queue -> a process worker -> back to jobs."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from blixard.jobs.v1 import jobs_service_pb2 as jpb
from blixard.queue.v1 import queue_service_pb2 as qpb

from services.jobs import bootstrap as jobs_bootstrap
from services.jobs import config as jobs_config
from services.queue import bootstrap as queue_bootstrap
from services.queue import config as queue_config
from tests.conftest import free_port
from tests.grpc.conftest import (
    RPC_TIMEOUT,
    Stack,
    eventually,
    jobs_env,
    queue_env,
    spec,
    start,
    wait_for_state,
)

TERMINAL = {jpb.JOB_STATE_SUCCEEDED, jpb.JOB_STATE_FAILED, jpb.JOB_STATE_CANCELLED}
# The order states may follow one another in for a job that runs once.
PROGRESS = [
    jpb.JOB_STATE_PENDING,
    jpb.JOB_STATE_QUEUED,
    jpb.JOB_STATE_RUNNING,
    jpb.JOB_STATE_SUCCEEDED,
]


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = Stack(tmp_path_factory.mktemp("flow"))
    try:
        running.start_pair().start_worker()
        yield running
    finally:
        running.stop()


def _submit(stack: Stack, job_spec) -> jpb.Job:  # type: ignore[no-untyped-def]
    return stack.jobs_stub().SubmitJob(jpb.SubmitJobRequest(spec=job_spec), timeout=RPC_TIMEOUT).job


def test_a_job_that_exits_0_succeeds_with_its_output(suite: Stack) -> None:
    job = _submit(suite, spec("sh", "-c", "echo hi; exit 0"))
    assert job.state == jpb.JOB_STATE_PENDING

    done = wait_for_state(suite.jobs_stub(), job.job_id, TERMINAL)

    assert done.state == jpb.JOB_STATE_SUCCEEDED, done
    assert done.HasField("exit_code") and done.exit_code == 0
    assert "hi" in done.output_tail
    assert done.attempts == 1
    assert done.worker_id == "grpc-test-worker"
    assert done.error == ""
    assert done.start_time.ToNanoseconds() > 0
    assert done.end_time.ToNanoseconds() >= done.start_time.ToNanoseconds()


def test_a_job_that_exits_3_with_one_attempt_fails_with_its_exit_code(suite: Stack) -> None:
    job = _submit(suite, spec("sh", "-c", "echo oops >&2; exit 3", max_attempts=1))

    done = wait_for_state(suite.jobs_stub(), job.job_id, TERMINAL)

    assert done.state == jpb.JOB_STATE_FAILED, done
    assert done.HasField("exit_code") and done.exit_code == 3
    assert done.attempts == 1
    assert done.error, "the reason of the failure is stored"


def test_watch_streams_states_until_a_terminal_one(suite: Stack) -> None:
    job = _submit(suite, spec("sh", "-c", "sleep 0.3; echo watched"))
    jobs = suite.jobs_stub()

    started = time.monotonic()
    states = [
        r.job.state for r in jobs.WatchJob(jpb.WatchJobRequest(job_id=job.job_id), timeout=20)
    ]

    assert time.monotonic() - started < 20, "the stream ended by itself"
    assert states, "the current state comes first"
    assert states[-1] == jpb.JOB_STATE_SUCCEEDED
    assert all(s not in TERMINAL for s in states[:-1])
    positions = [PROGRESS.index(s) for s in states]
    assert positions == sorted(positions), [jpb.JobState.Name(s) for s in states]
    assert len(set(states)) == len(states), "no repeated state"


def test_watch_of_a_finished_job_sends_one_message_and_ends(suite: Stack) -> None:
    job = _submit(suite, spec("true"))
    wait_for_state(suite.jobs_stub(), job.job_id, TERMINAL)

    messages = list(
        suite.jobs_stub().WatchJob(jpb.WatchJobRequest(job_id=job.job_id), timeout=RPC_TIMEOUT)
    )

    assert [m.job.state for m in messages] == [jpb.JOB_STATE_SUCCEEDED]


def test_watch_of_an_unknown_job_is_not_found(suite: Stack) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(
            suite.jobs_stub().WatchJob(
                jpb.WatchJobRequest(job_id="00000000-0000-0000-0000-000000000000"),
                timeout=RPC_TIMEOUT,
            )
        )

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_history_records_every_transition(suite: Stack) -> None:
    job = _submit(suite, spec("true"))
    wait_for_state(suite.jobs_stub(), job.job_id, TERMINAL)

    events = (
        suite.jobs_stub()
        .ListJobEvents(jpb.ListJobEventsRequest(job_id=job.job_id), timeout=RPC_TIMEOUT)
        .events
    )

    states = [e.state for e in events]
    assert states[0] == jpb.JOB_STATE_PENDING
    assert states[-1] == jpb.JOB_STATE_SUCCEEDED
    assert jpb.JOB_STATE_RUNNING in states
    assert all(e.job_id == job.job_id and e.generation == 1 for e in events)


def test_list_jobs_pages_without_duplicates(make_stack) -> None:  # type: ignore[no-untyped-def]
    # A jobs database of its own, so exactly these seven jobs are listed.
    alone = make_stack().start_pair()
    jobs = alone.jobs_stub()
    submitted = [
        jobs.SubmitJob(
            jpb.SubmitJobRequest(request_id=f"page-{i}", spec=spec("echo", str(i))),
            timeout=RPC_TIMEOUT,
        ).job.job_id
        for i in range(7)
    ]

    pages: list[list[str]] = []
    tokens: list[str] = []
    token = ""
    for _ in range(5):
        response = jobs.ListJobs(
            jpb.ListJobsRequest(page_size=3, page_token=token), timeout=RPC_TIMEOUT
        )
        pages.append([j.job_id for j in response.jobs])
        tokens.append(response.next_page_token)
        token = response.next_page_token
        if not token:
            break

    assert [len(p) for p in pages] == [3, 3, 1]
    assert all(tokens[:-1]) and tokens[-1] == ""
    listed = [job_id for page in pages for job_id in page]
    assert len(set(listed)) == len(listed) == 7
    assert set(listed) == set(submitted)
    # Oldest first: the order they were submitted in.
    assert listed == submitted


def test_a_page_of_large_jobs_ends_early_and_the_next_goes_on(make_stack) -> None:  # type: ignore[no-untyped-def]
    """Twenty jobs of 256 KiB payloads are 5 MiB, more than one message may carry: the
    page ends before it is too big to send, and every job is listed once, in order."""
    alone = make_stack().start_pair()
    jobs, queue = alone.jobs_stub(), alone.queue_stub()
    payload = bytes(range(256)) * 1024  # 256 KiB, the most a spec may carry
    submitted = [
        jobs.SubmitJob(
            jpb.SubmitJobRequest(spec=spec("true", payload=payload)), timeout=RPC_TIMEOUT
        ).job.job_id
        for _ in range(20)
    ]
    listed: list[str] = []
    token, pages = "", 0
    while True:
        response = jobs.ListJobs(jpb.ListJobsRequest(page_token=token), timeout=RPC_TIMEOUT)
        listed.extend(j.job_id for j in response.jobs)
        pages += 1
        token = response.next_page_token
        if not token:
            break
    assert listed == submitted and pages >= 2
    # The queue's items carry the same specs: its list pages likewise.
    items = eventually(
        lambda: found if len(found := _all_items(queue)) == 20 else None, 20, "20 items"
    )
    assert sorted(items) == sorted(submitted)


def _all_items(queue) -> list[str]:  # type: ignore[no-untyped-def]
    found: list[str] = []
    token = ""
    while True:
        response = queue.ListItems(qpb.ListItemsRequest(page_token=token), timeout=RPC_TIMEOUT)
        found.extend(item.job_id for item in response.items)
        token = response.next_page_token
        if not token:
            return found


def test_cancel_of_a_running_job_stops_it_on_the_worker(suite: Stack) -> None:
    job = _submit(suite, spec("sh", "-c", "echo started; sleep 30"))
    jobs = suite.jobs_stub()
    wait_for_state(jobs, job.job_id, {jpb.JOB_STATE_RUNNING})

    cancelled = jobs.CancelJob(
        jpb.CancelJobRequest(job_id=job.job_id, reason="stop it"), timeout=RPC_TIMEOUT
    ).job
    assert cancelled.state == jpb.JOB_STATE_CANCELLED

    # The worker learns it at its next heartbeat (lease 6 s -> every 2 s), stops the
    # process and reports CANCELLED: the item ends CANCELLED, not by lease expiry.
    queue = suite.queue_stub()

    def item_cancelled() -> qpb.WorkItem | None:
        item = queue.GetItem(qpb.GetItemRequest(job_id=job.job_id), timeout=RPC_TIMEOUT).item
        return item if item.state == qpb.ITEM_STATE_CANCELLED else None

    item = eventually(item_cancelled, 12, "the worker to stop the cancelled job")
    assert item.cancel_requested
    assert "started" in item.output_tail
    assert suite.worker is not None
    eventually(lambda: suite.worker.active == 0, 5, "the worker to free the slot")
    after = jobs.GetJob(jpb.GetJobRequest(job_id=job.job_id), timeout=RPC_TIMEOUT).job
    assert after.state == jpb.JOB_STATE_CANCELLED


def test_retry_of_a_failed_job_runs_a_new_generation(suite: Stack) -> None:
    job = _submit(suite, spec("sh", "-c", "exit 4", max_attempts=1))
    jobs = suite.jobs_stub()
    failed = wait_for_state(jobs, job.job_id, TERMINAL)
    assert failed.state == jpb.JOB_STATE_FAILED

    retried = jobs.RetryJob(jpb.RetryJobRequest(job_id=job.job_id), timeout=RPC_TIMEOUT).job
    assert (retried.state, retried.generation) == (jpb.JOB_STATE_PENDING, 2)

    def second_end() -> jpb.Job | None:
        current = jobs.GetJob(jpb.GetJobRequest(job_id=job.job_id), timeout=RPC_TIMEOUT).job
        return current if current.generation == 2 and current.state in TERMINAL else None

    again = eventually(second_end, 20, "generation 2 to end")
    assert again.state == jpb.JOB_STATE_FAILED
    assert again.exit_code == 4
    assert again.attempts == 2, "attempts are counted over all generations"
    events = jobs.ListJobEvents(
        jpb.ListJobEventsRequest(job_id=job.job_id), timeout=RPC_TIMEOUT
    ).events
    assert {e.generation for e in events} == {1, 2}, "the history is kept"


def test_the_history_names_who_acted_and_the_attempt_in_the_jobs_count(suite: Stack) -> None:
    """A redrive is an operator's act, not the last worker's; after a redrive and a retry
    the history counts attempts as the job does (2, 3), not from 1 again."""
    job = _submit(suite, spec("sh", "-c", "exit 4", max_attempts=1))
    jobs = suite.jobs_stub()

    def ended(attempts: int) -> jpb.Job | None:
        current = jobs.GetJob(jpb.GetJobRequest(job_id=job.job_id), timeout=RPC_TIMEOUT).job
        done = current.state == jpb.JOB_STATE_FAILED and current.attempts == attempts
        return current if done else None

    eventually(lambda: ended(1), 20, "the first attempt to fail")
    suite.queue_stub().Redrive(qpb.RedriveRequest(job_id=job.job_id), timeout=RPC_TIMEOUT)
    eventually(lambda: ended(2), 20, "the redriven attempt to fail")
    jobs.RetryJob(jpb.RetryJobRequest(job_id=job.job_id), timeout=RPC_TIMEOUT)
    last = eventually(lambda: ended(3), 20, "generation 2 to fail")
    assert last.error == "exited with 4"

    events = jobs.ListJobEvents(
        jpb.ListJobEventsRequest(job_id=job.job_id), timeout=RPC_TIMEOUT
    ).events
    worker = "worker:grpc-test-worker"
    [redriven] = [e for e in events if "redriven" in e.reason]
    assert (redriven.state, redriven.actor) == (jpb.JOB_STATE_QUEUED, "operator")
    runs = [(e.actor, e.reason) for e in events if e.state == jpb.JOB_STATE_RUNNING]
    assert runs == [(worker, f"attempt {n} leased to grpc-test-worker") for n in (1, 2, 3)]
    ends = [(e.actor, e.reason) for e in events if e.state == jpb.JOB_STATE_FAILED]
    assert ends == [(worker, f"attempt {n} failed, none left; dead-lettered") for n in (1, 2, 3)]
    [retried] = [e for e in events if e.reason.startswith("retry")]
    assert retried.actor == "client"


def test_submit_succeeds_while_the_queue_is_down_and_delivery_resumes(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    tmp = tmp_path_factory.mktemp("late-queue")
    jobs_port, queue_port = free_port(), free_port()
    stack = Stack(tmp)
    try:
        stack.jobs = start(
            jobs_bootstrap.build(jobs_config.load(jobs_env(tmp, jobs_port, queue_port)))
        )
        jobs = stack.jobs_stub()
        job = jobs.SubmitJob(jpb.SubmitJobRequest(spec=spec("true")), timeout=RPC_TIMEOUT).job
        assert job.state == jpb.JOB_STATE_PENDING
        time.sleep(0.5)  # a few failed deliveries

        stack.queue = start(
            queue_bootstrap.build(
                queue_config.load({**queue_env(tmp, jobs_port), "QUEUE_GRPC_PORT": str(queue_port)})
            )
        )

        queued = wait_for_state(jobs, job.job_id, {jpb.JOB_STATE_QUEUED}, timeout=20)
        assert queued.generation == 1
    finally:
        stack.stop()
