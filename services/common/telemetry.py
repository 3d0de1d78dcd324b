"""OpenTelemetry tracing: a provider per process, interceptors on every server and client,
and the W3C trace context carried with a job so its whole life is one trace."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.grpc import (
    client_interceptor,
    grpcext,
    server_interceptor,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased

_provider: TracerProvider | None = None


def setup_tracing(
    service_name: str, exporter: str = "none", processors: Sequence[SpanProcessor] = ()
) -> TracerProvider:
    """Install this process's tracer provider (once) and return it. Spans go to the
    ``exporter`` ("console" prints them) and to any ``processors`` given (tests)."""
    global _provider
    if _provider is None:
        sinks = list(processors)
        if exporter == "console":
            sinks.append(BatchSpanProcessor(ConsoleSpanExporter()))
        # With nowhere to send them, recording a span per call cost about a third of a
        # busy queue's CPU: new traces are then not sampled. Trace and span ids are still
        # made and propagated (a job keeps its trace id), and a caller's sampled trace is
        # still recorded.
        sampler = ParentBased(ALWAYS_ON if sinks else ALWAYS_OFF)
        _provider = TracerProvider(
            resource=Resource.create({"service.name": service_name}), sampler=sampler
        )
        for sink in sinks:
            _provider.add_span_processor(sink)
        trace.set_tracer_provider(_provider)
    return _provider


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def server_interceptors() -> list[Any]:
    return [server_interceptor(tracer_provider=trace.get_tracer_provider())]


def trace_channel(channel: grpc.Channel) -> grpc.Channel:
    """The channel with a client span per call and the trace context in the metadata."""
    return grpcext.intercept_channel(  # type: ignore[no-any-return]
        channel, client_interceptor(tracer_provider=trace.get_tracer_provider())
    )


def current_context_carrier() -> dict[str, str]:
    """The current trace context as a dict (traceparent, tracestate) to store with a job."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def context_from(carrier: Mapping[str, str]) -> otel_context.Context:
    return propagate.extract(dict(carrier))


def trace_id_of(carrier: Mapping[str, str]) -> str:
    """The 32-hex trace id in a traceparent, or ''."""
    parts = carrier.get("traceparent", "").split("-")
    return parts[1] if len(parts) == 4 else ""


@contextmanager
def span_per_item(
    tracer_: trace.Tracer, name: str, items: Iterable[tuple[Mapping[str, str], dict[str, Any]]]
) -> Iterator[None]:
    """One span per item of a batch, each in the trace its carrier names (with its
    attributes), all covering the one call that handles them together."""
    spans = [
        tracer_.start_span(name, context=context_from(carrier), attributes=attributes)
        for carrier, attributes in items
    ]
    try:
        yield
    finally:
        for span in spans:
            span.end()
