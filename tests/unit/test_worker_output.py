"""services.worker.output: a running job's output reaches the jobs service in order, by
offset, from a bounded buffer that never blocks the job, also when the service is down."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc
import pytest

from services.common.outbox import Transient
from services.worker.output import CHUNK_BYTES, OutputSender


@dataclass
class Call:
    offset: int
    data: bytes
    total_bytes: int | None
    execution_id: str


class Refused(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.NOT_FOUND

    def details(self) -> str:
        return "job 'j' not found"


@dataclass
class FakeJobs:
    """The jobs service's side, as the worker sees it: stores by offset like the real one."""

    down: bool = False
    refuse: bool = False
    block: threading.Event | None = None
    calls: list[Call] = field(default_factory=list)
    stored: bytearray = field(default_factory=bytearray)
    total: int | None = None

    def append_output(
        self,
        job_id: str,
        generation: int,
        attempt: int,
        offset: int,
        data: bytes,
        total_bytes: int | None = None,
        execution_id: str = "",
    ) -> int:
        if self.block is not None:
            self.block.wait()
        if self.down:
            raise Transient("UNAVAILABLE: connection refused")
        if self.refuse:
            raise Refused()
        self.calls.append(Call(offset, data, total_bytes, execution_id))
        if offset > len(self.stored):
            self.stored += b"?" * (offset - len(self.stored))  # a gap
        end = offset + len(data)
        if end > len(self.stored):
            self.stored += data[len(self.stored) - offset :]
        if total_bytes is not None:
            self.total = total_bytes
        return len(self.stored)


def sender(jobs: FakeJobs, **kw: object) -> OutputSender:
    return OutputSender(jobs, "job-1", 1, 1, "exec-1", interval=0.02, **kw)  # type: ignore[arg-type]


def eventually(condition, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return bool(condition())


def test_output_arrives_while_the_job_runs_then_the_total_on_close() -> None:
    jobs = FakeJobs()
    out = sender(jobs).start()
    out.write(b"line 1\n")
    assert eventually(lambda: bytes(jobs.stored) == b"line 1\n"), "sent before the job ended"
    out.write(b"line 2\n")
    out.close()
    assert bytes(jobs.stored) == b"line 1\nline 2\n"
    assert jobs.total == 14
    assert jobs.calls[-1].total_bytes == 14
    assert all(c.total_bytes is None for c in jobs.calls[:-1])
    assert {c.execution_id for c in jobs.calls} == {"exec-1"}
    assert (out.written, out.dropped) == (14, 0)


def test_large_output_goes_in_chunks_the_service_accepts_with_their_offsets() -> None:
    jobs = FakeJobs()
    out = sender(jobs, buffer_bytes=1024 * 1024)
    data = bytes(range(256)) * 1200  # 300 KiB
    out.write(data)
    out.start().close()
    assert bytes(jobs.stored) == data
    assert all(len(c.data) <= CHUNK_BYTES for c in jobs.calls)
    offsets = [c.offset for c in jobs.calls]
    assert offsets == sorted(offsets) and offsets[0] == 0


def test_with_the_service_down_memory_stays_bounded_and_drops_are_counted() -> None:
    jobs = FakeJobs(down=True)
    out = sender(jobs, buffer_bytes=1000).start()
    for _ in range(100):
        out.write(b"x" * 100)  # 10,000 bytes, ten times the buffer
        assert out.pending <= 1000
    jobs.down = False
    out.write(b"THE END")
    out.close()
    assert out.written == 10_007
    assert out.dropped == 10_007 - 1000
    # The newest bytes arrive, at their true offsets: the gap shows what was lost.
    assert bytes(jobs.stored).endswith(b"x" * 993 + b"THE END")
    assert jobs.calls[0].offset == 10_007 - 1000
    assert jobs.total == 10_007


def test_write_never_blocks_while_the_service_hangs() -> None:
    gate = threading.Event()
    jobs = FakeJobs(block=gate)
    out = sender(jobs, buffer_bytes=4096).start()
    out.write(b"first")
    time.sleep(0.1)  # the sender thread is now stuck in a call
    started = time.monotonic()
    for _ in range(1000):
        out.write(b"y" * 64)
    assert time.monotonic() - started < 1.0
    assert out.pending <= 4096
    gate.set()
    out.close()
    assert jobs.total == 5 + 64_000


def test_a_refusal_stops_sending_for_this_execution() -> None:
    jobs = FakeJobs(refuse=True)
    out = sender(jobs).start()
    out.write(b"a" * 10)
    assert eventually(lambda: out.dropped == 10)
    out.write(b"b" * 10)
    out.close()
    assert jobs.calls == []
    assert (out.written, out.dropped, out.pending) == (20, 20, 0)


def test_an_execution_without_output_still_reports_its_total() -> None:
    jobs = FakeJobs()
    sender(jobs).start().close()
    assert [(c.offset, c.data, c.total_bytes) for c in jobs.calls] == [(0, b"", 0)]


@pytest.mark.parametrize("interval", [0.3])
def test_sends_at_most_every_interval(interval: float) -> None:
    jobs = FakeJobs()
    out = OutputSender(jobs, "job-1", 1, 1, "e", interval=interval).start()  # type: ignore[arg-type]
    started = time.monotonic()
    while time.monotonic() - started < 1.0:
        out.write(b".")
        time.sleep(0.005)
    out.close()
    # About one call per interval over one second (and the final one), not one per write.
    assert 2 <= len(jobs.calls) <= 1.0 / interval + 3


def test_an_execution_that_ends_before_the_first_send_leaves_its_output_to_the_completion() -> None:
    jobs = FakeJobs()
    out = OutputSender(jobs, "job-1", 1, 1, "e", interval=5, inline_up_to=100).start()  # type: ignore[arg-type]
    out.write(b"hi\n")
    out.close()
    assert jobs.calls == []
    assert (out.inline, out.written) == (True, 3)


def test_more_than_the_completion_carries_is_sent_even_when_the_job_was_short() -> None:
    jobs = FakeJobs()
    out = OutputSender(jobs, "job-1", 1, 1, "e", interval=5, inline_up_to=100).start()  # type: ignore[arg-type]
    out.write(b"x" * 101)
    out.close()
    assert out.inline is False
    assert (bytes(jobs.stored), jobs.total) == (b"x" * 101, 101)


def test_once_an_execution_has_streamed_its_end_is_sent_too() -> None:
    jobs = FakeJobs()
    out = sender(jobs, inline_up_to=100).start()
    out.write(b"first\n")
    assert eventually(lambda: bytes(jobs.stored) == b"first\n")
    out.write(b"last\n")
    out.close()
    assert out.inline is False
    assert (bytes(jobs.stored), jobs.total) == (b"first\nlast\n", 11)
