"""The output of running jobs in the jobs service (real server, real SQLite): the worker
appends by offset, clients read it or follow it live, and only the last 1 MiB is kept."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from alembic import command
from alembic.config import Config
from blixard.jobs.v1 import jobs_service_pb2 as jpb
from blixard.jobs.v1 import jobs_service_pb2_grpc as jpb_grpc
from sqlalchemy import create_engine, text

from services.common.client import open_channel
from services.common.errors import describe
from services.common.outbox import Transient
from services.jobs import bootstrap as jobs_bootstrap
from services.jobs import config as jobs_config
from services.jobs.domain import OUTPUT_KEEP_BYTES
from services.worker.jobs_client import JobsClient
from tests.conftest import free_port
from tests.grpc.conftest import (
    CLIENT_TOKEN,
    RPC_TIMEOUT,
    TOKENS,
    WORKER_TOKEN,
    Stack,
    jobs_env,
    spec,
    start,
)

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[jpb_grpc.JobServiceStub]:
    """A jobs service and its queue, no worker: the tests play the worker's part."""
    running = Stack(tmp_path_factory.mktemp("output"))
    try:
        yield running.start_pair().jobs_stub()
    finally:
        running.stop()


def new_job(jobs: jpb_grpc.JobServiceStub) -> str:
    request = jpb.SubmitJobRequest(spec=spec("sh", "-c", "echo never runs here"))
    return jobs.SubmitJob(request, timeout=RPC_TIMEOUT).job.job_id


def append(
    jobs: jpb_grpc.JobServiceStub,
    job_id: str,
    offset: int,
    data: bytes,
    *,
    attempt: int = 1,
    execution: str = "e1",
    total: int | None = None,
    generation: int = 1,
) -> int:
    request = jpb.AppendJobOutputRequest(
        job_id=job_id,
        generation=generation,
        attempt=attempt,
        offset=offset,
        data=data,
        execution_id=execution,
    )
    if total is not None:
        request.total_bytes = total
    return jobs.AppendJobOutput(request, timeout=RPC_TIMEOUT).next_offset


def read(jobs: jpb_grpc.JobServiceStub, job_id: str) -> list[jpb.GetJobOutputResponse]:
    request = jpb.GetJobOutputRequest(job_id=job_id)
    return list(jobs.GetJobOutput(request, timeout=RPC_TIMEOUT))


def text_of(chunks: list[jpb.GetJobOutputResponse]) -> bytes:
    return b"".join(c.data for c in chunks)


def test_a_retried_append_stores_nothing_twice(jobs: jpb_grpc.JobServiceStub) -> None:
    job_id = new_job(jobs)
    assert append(jobs, job_id, 0, b"hello ") == 6
    assert append(jobs, job_id, 0, b"hello ") == 6  # the same call again
    assert append(jobs, job_id, 0, b"hello wor") == 9  # again, with more
    assert append(jobs, job_id, 3, b"lo world\n") == 12  # overlapping
    assert append(jobs, job_id, 5, b" w") == 12  # entirely stored already

    chunks = read(jobs, job_id)

    assert text_of(chunks) == b"hello world\n"
    assert [(c.offset, len(c.data)) for c in chunks] == [(0, 12)], "stored once, merged"
    assert {(c.generation, c.attempt) for c in chunks} == {(1, 1)}


def test_only_the_last_mebibyte_is_kept(jobs: jpb_grpc.JobServiceStub) -> None:
    job_id = new_job(jobs)
    written = b"".join(f"{i:07d}\n".encode() for i in range(300_000))  # 2.4 MB
    for offset in range(0, len(written), 60_000):
        append(jobs, job_id, offset, written[offset : offset + 60_000])

    chunks = read(jobs, job_id)

    assert text_of(chunks) == written[-OUTPUT_KEEP_BYTES:]
    assert chunks[0].offset == len(written) - OUTPUT_KEEP_BYTES
    ends = [c.offset + len(c.data) for c in chunks]
    assert [c.offset for c in chunks[1:]] == ends[:-1], "contiguous"


def test_a_gap_the_worker_dropped_shows_in_the_offsets(jobs: jpb_grpc.JobServiceStub) -> None:
    job_id = new_job(jobs)
    append(jobs, job_id, 0, b"start\n")
    assert append(jobs, job_id, 1000, b"end\n") == 1004

    chunks = read(jobs, job_id)

    assert [(c.offset, c.data) for c in chunks] == [(0, b"start\n"), (1000, b"end\n")]


def test_a_later_attempt_replaces_the_output_and_an_earlier_one_is_refused(
    jobs: jpb_grpc.JobServiceStub,
) -> None:
    job_id = new_job(jobs)
    append(jobs, job_id, 0, b"attempt one\n", attempt=1)
    append(jobs, job_id, 0, b"two\n", attempt=2, execution="e2")
    assert text_of(read(jobs, job_id)) == b"two\n"

    with pytest.raises(grpc.RpcError) as caught:
        append(jobs, job_id, 12, b"late words from attempt one\n", attempt=1)
    failure = describe(caught.value)
    assert (failure.code, failure.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "STALE_ATTEMPT")
    assert text_of(read(jobs, job_id)) == b"two\n"

    # The same attempt run again (its lease was given back) replaces it too.
    append(jobs, job_id, 0, b"2 again\n", attempt=2, execution="e3")
    assert text_of(read(jobs, job_id)) == b"2 again\n"


def test_the_total_becomes_the_jobs_output_bytes(jobs: jpb_grpc.JobServiceStub) -> None:
    job_id = new_job(jobs)
    before = jobs.GetJob(jpb.GetJobRequest(job_id=job_id), timeout=RPC_TIMEOUT).job
    assert before.output_bytes == 0
    append(jobs, job_id, 0, b"x" * 10)
    append(jobs, job_id, 10, b"", total=5_000_000)  # most of it was never sent

    job = jobs.GetJob(jpb.GetJobRequest(job_id=job_id), timeout=RPC_TIMEOUT).job

    assert job.output_bytes == 5_000_000


def test_follow_sends_output_as_it_comes_and_ends_with_the_job(
    jobs: jpb_grpc.JobServiceStub,
) -> None:
    job_id = new_job(jobs)
    append(jobs, job_id, 0, b"before\n")
    received: list[tuple[float, bytes]] = []
    ended = threading.Event()

    def follow() -> None:
        request = jpb.GetJobOutputRequest(job_id=job_id, follow=True)
        for chunk in jobs.GetJobOutput(request, timeout=30):
            received.append((time.monotonic(), chunk.data))
        ended.set()

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    offset = 7
    sent: list[float] = []
    for line in (b"one\n", b"two\n", b"three\n"):
        time.sleep(0.4)
        sent.append(time.monotonic())
        offset = append(jobs, job_id, offset, line)
    time.sleep(0.3)
    assert not ended.is_set(), "the stream stays open while the job has not ended"

    jobs.CancelJob(jpb.CancelJobRequest(job_id=job_id), timeout=RPC_TIMEOUT)

    assert ended.wait(5), "the stream ends when the job does"
    assert b"".join(d for _, d in received) == b"before\none\ntwo\nthree\n"
    # Each line arrived while the job ran, soon after it was appended, not at the end.
    arrivals = [t for t, d in received if d != b"before\n"]
    assert len(arrivals) == 3
    for sent_at, arrived_at in zip(sent, arrivals, strict=True):
        assert arrived_at - sent_at < 0.3


def test_output_of_a_job_with_none_is_an_empty_stream(jobs: jpb_grpc.JobServiceStub) -> None:
    assert read(jobs, new_job(jobs)) == []


def test_bad_appends_are_refused_with_every_problem(jobs: jpb_grpc.JobServiceStub) -> None:
    request = jpb.AppendJobOutputRequest(job_id="", generation=0, attempt=0, data=b"x" * 70_000)
    with pytest.raises(grpc.RpcError) as caught:
        jobs.AppendJobOutput(request, timeout=RPC_TIMEOUT)
    failure = describe(caught.value)
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {f for f, _ in failure.field_violations} == {"job_id", "generation", "attempt", "data"}

    with pytest.raises(grpc.RpcError) as caught:
        append(jobs, "no-such-job", 0, b"x")
    assert describe(caught.value).code == grpc.StatusCode.NOT_FOUND

    with pytest.raises(grpc.RpcError) as caught:
        append(jobs, new_job(jobs), 0, b"x", generation=2)
    failure = describe(caught.value)
    assert (failure.code, failure.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "UNKNOWN_GENERATION",
    )

    with pytest.raises(grpc.RpcError) as caught:
        read(jobs, "no-such-job")
    assert describe(caught.value).code == grpc.StatusCode.NOT_FOUND


# ---- who may do what ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = Stack(tmp_path_factory.mktemp("secured-output"), dict(TOKENS))
    try:
        yield running.start_pair()
    finally:
        running.stop()


def test_workers_append_and_clients_read(secured: Stack) -> None:
    client = secured.jobs_stub(CLIENT_TOKEN)
    worker = secured.jobs_stub(WORKER_TOKEN)
    job_id = new_job(client)

    assert append(worker, job_id, 0, b"from the worker\n") == 16
    assert text_of(read(client, job_id)) == b"from the worker\n"

    with pytest.raises(grpc.RpcError) as caught:
        append(client, job_id, 16, b"forged\n")
    assert describe(caught.value).code == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as caught:
        read(worker, job_id)
    assert describe(caught.value).code == grpc.StatusCode.PERMISSION_DENIED


# ---- the migration ------------------------------------------------------------------------


def test_a_database_of_the_first_schema_is_migrated_and_its_jobs_kept(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/jobs.sqlite3"
    alembic = Config()
    alembic.set_main_option("script_location", str(jobs_bootstrap.MIGRATIONS))
    alembic.attributes["version_table"] = "jobs_alembic_version"
    engine = create_engine(url)
    with engine.begin() as connection:
        alembic.attributes["connection"] = connection
        command.upgrade(alembic, "2eb044336b57")  # 0001, before output was stored
        connection.execute(
            text(
                "INSERT INTO jobs VALUES ('old-job', NULL, '{\"command\": [\"true\"]}', 'h', "
                "'SUCCEEDED', 1, 1, 0, 0, 'old output', '', 'w', '2026-01-01 00:00:00', "
                "'2026-01-01 00:00:00', NULL, NULL, 4, '{}', '')"
            )
        )
    engine.dispose()

    settings = jobs_config.load(jobs_env(tmp_path, free_port(), free_port()))
    running = start(jobs_bootstrap.build(settings))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = jpb_grpc.JobServiceStub(channel)
            job = stub.GetJob(jpb.GetJobRequest(job_id="old-job"), timeout=RPC_TIMEOUT).job
            assert (job.output_tail, job.output_bytes) == ("old output", 0)
            assert read(stub, "old-job") == []
            assert append(stub, "old-job", 0, b"new\n") == 4
    finally:
        running.stop(0.5)


# ---- the worker's side, with the jobs service down ----------------------------------------


def test_with_the_jobs_service_down_appends_fail_fast_not_on_every_call() -> None:
    channel = open_channel(f"127.0.0.1:{free_port()}")  # nothing listens there
    try:
        jobs = JobsClient(channel)
        with pytest.raises(Transient):
            jobs.append_output("job", 1, 1, 0, b"x")
        started = time.monotonic()
        for _ in range(50):
            with pytest.raises(Transient):
                jobs.append_output("job", 1, 1, 0, b"x")
        # No call goes out while it backs off: a job's completion is not held up by one.
        assert time.monotonic() - started < 0.2
    finally:
        channel.close()
