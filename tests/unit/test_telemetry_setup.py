"""setup_tracing in a fresh process (it installs the process's global provider)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.deployment import ROOT

PROBE = """
import json, sys
from opentelemetry import trace
from services.common import telemetry
telemetry.setup_tracing("probe", sys.argv[1])
tracer = trace.get_tracer("probe")
with tracer.start_as_current_span("root") as root:
    carrier = telemetry.current_context_carrier()
    recording = root.is_recording()  # (an ended span records nothing either way)
parent = telemetry.context_from({"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"})
child = tracer.start_span("child", context=parent)
print("PROBE " + json.dumps({
    "recording": recording,
    "trace_id": format(root.get_span_context().trace_id, "032x"),
    "carried": telemetry.trace_id_of(carrier),
    "sampled_parent_recorded": child.is_recording(),
}))
"""


def probe(exporter: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, exporter],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    [line] = [line for line in out.splitlines() if line.startswith("PROBE ")]
    return json.loads(line.removeprefix("PROBE "))  # type: ignore[no-any-return]


def test_without_an_exporter_new_traces_are_not_recorded_but_still_carried() -> None:
    got = probe("none")
    assert got["recording"] is False
    assert got["trace_id"] != "0" * 32 and got["carried"] == got["trace_id"]
    assert got["sampled_parent_recorded"] is True


def test_with_an_exporter_every_trace_is_recorded() -> None:
    got = probe("console")
    assert got["recording"] is True and got["carried"] == got["trace_id"]
