"""A local process hands its output to the sink as it writes it, and leaves nothing behind."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from services.worker.adapters import MockAdapter, ProcessAdapter, Task


class Sink:
    def __init__(self) -> None:
        self.chunks: list[tuple[float, bytes]] = []
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            self.chunks.append((time.monotonic(), data))

    def data(self) -> bytes:
        with self._lock:
            return b"".join(d for _, d in self.chunks)


def test_output_reaches_the_sink_while_the_process_runs() -> None:
    sink = Sink()
    execution = ProcessAdapter().start(
        Task(["sh", "-c", "echo first; sleep 1; echo second"], {}, ""), sink
    )
    deadline = time.monotonic() + 5
    while b"first" not in sink.data() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.data() == b"first\n"
    assert not execution.wait(0), "seen before the process ended"
    assert execution.wait(10)
    result = execution.result()
    assert sink.data() == b"first\nsecond\n"
    assert (result.output_tail, result.total_bytes) == (b"first\nsecond\n", 13)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_what_a_job_left_running_in_its_group_is_gone_once_it_ends() -> None:
    # The sleep also holds the output pipe open: the result must not wait for it.
    execution = ProcessAdapter().start(Task(["sh", "-c", "sleep 300 & echo $!"], {}, ""))
    assert execution.wait(10)
    started = time.monotonic()
    result = execution.result()
    assert time.monotonic() - started < 2.0
    child = int(result.output_tail)
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(child), "the background sleep outlived its job"
    assert result.exit_code == 0


def test_the_mock_writes_its_output_to_the_sink() -> None:
    sink = Sink()
    execution = MockAdapter(0.0, 0.0, seed=1).start(Task(["x"], {}, ""), sink)
    assert execution.wait(5)
    assert sink.data() == b"mock success\n"
