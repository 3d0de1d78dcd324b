"""One job is one trace: its submit, its enqueue by the outbox relay, its execution."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from blixard.jobs.v1 import jobs_service_pb2 as jpb
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.grpc.conftest import RPC_TIMEOUT, Stack, eventually, spans_in_trace, spec, wait_for_state

SUBMIT = "/blixard.jobs.v1.JobService/SubmitJob"
COMPLETE = "/blixard.queue.v1.QueueService/Complete"


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = Stack(tmp_path_factory.mktemp("traced"))
    try:
        running.start_pair().start_worker("traced-worker")
        yield running
    finally:
        running.stop()


def _server_span(
    exporter: InMemorySpanExporter, trace_id: str, name: str, timeout: float = 10.0
) -> ReadableSpan:
    def probe() -> ReadableSpan | None:
        for span in spans_in_trace(exporter, trace_id):
            if span.name == name and span.kind == SpanKind.SERVER:
                return span
        return None

    return eventually(probe, timeout, f"a server span {name} in trace {trace_id}")


def _submit_in_a_trace(stack: Stack, job_spec) -> tuple[jpb.Job, str]:  # type: ignore[no-untyped-def]
    jobs = stack.jobs_stub()
    with trace.get_tracer("tests").start_as_current_span("test.submit") as root:
        job = jobs.SubmitJob(jpb.SubmitJobRequest(spec=job_spec), timeout=RPC_TIMEOUT).job
    return job, format(root.get_span_context().trace_id, "032x")


def test_submit_has_a_server_span_and_the_job_carries_its_trace_id(
    traced: Stack, span_exporter: InMemorySpanExporter
) -> None:
    job, trace_id = _submit_in_a_trace(traced, spec("true"))

    server = _server_span(span_exporter, trace_id, SUBMIT)

    assert len(job.trace_id) == 32
    assert int(job.trace_id, 16) != 0
    assert job.trace_id == format(server.context.trace_id, "032x")
    # The context crossed the hop: the server span is a child of the client's span.
    assert job.trace_id == trace_id
    assert server.parent is not None and server.parent.is_remote
    # GetJob gives the same trace id later on.
    read = traced.jobs_stub().GetJob(jpb.GetJobRequest(job_id=job.job_id), timeout=RPC_TIMEOUT)
    assert read.job.trace_id == job.trace_id


def test_submit_without_a_caller_trace_still_starts_one(
    traced: Stack, span_exporter: InMemorySpanExporter
) -> None:
    job = (
        traced.jobs_stub()
        .SubmitJob(jpb.SubmitJobRequest(spec=spec("true")), timeout=RPC_TIMEOUT)
        .job
    )

    assert len(job.trace_id) == 32
    server = _server_span(span_exporter, job.trace_id, SUBMIT)
    assert server.attributes is not None


def test_the_relayed_enqueue_joins_the_submit_trace(
    traced: Stack, span_exporter: InMemorySpanExporter
) -> None:
    job, trace_id = _submit_in_a_trace(traced, spec("true"))

    submit = _server_span(span_exporter, trace_id, SUBMIT)
    # The relay sends a batch in one BatchEnqueue; each job's trace gets the relay's span
    # for it and, inside the queue, the span of the transaction that enqueued it.
    enqueue = eventually(
        lambda: next(
            (s for s in spans_in_trace(span_exporter, trace_id) if s.name == "queue.enqueue"),
            None,
        ),
        10,
        f"the queue's enqueue span in trace {trace_id}",
    )

    assert job.trace_id == trace_id
    assert enqueue.context.trace_id == submit.context.trace_id
    assert enqueue.attributes["blixard.job_id"] == job.job_id
    # It was made later, by the relay thread, not inside the submit call.
    assert enqueue.start_time >= submit.start_time
    relay = [s for s in spans_in_trace(span_exporter, trace_id) if s.name == "outbox.enqueue"]
    assert relay and relay[0].attributes["blixard.job_id"] == job.job_id
    assert relay[0].start_time <= enqueue.start_time


def test_execution_and_completion_join_the_job_trace(
    traced: Stack, span_exporter: InMemorySpanExporter
) -> None:
    job, trace_id = _submit_in_a_trace(traced, spec("sh", "-c", "echo traced"))
    done = wait_for_state(traced.jobs_stub(), job.job_id, {jpb.JOB_STATE_SUCCEEDED})
    assert done.trace_id == trace_id

    complete = _server_span(span_exporter, trace_id, COMPLETE)

    execute = [s for s in spans_in_trace(span_exporter, trace_id) if s.name == "worker.execute"]
    assert len(execute) == 1
    assert execute[0].attributes["blixard.job_id"] == job.job_id
    assert complete.context.trace_id == execute[0].context.trace_id
