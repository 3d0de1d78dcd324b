"""How a job is executed: one interface, an adapter per worker type.

An adapter starts an execution and hands back a handle the worker supervises: it waits on
it, heartbeats meanwhile, and stops it on a cancel, a timeout or a lost lease. Output goes
to a bounded tail (kept for the result) and, when given, to a sink as it is written (the
worker streams it to the jobs service). The VM adapter is in ``vm_adapter.py``.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import threading
from dataclasses import dataclass
from typing import IO, Protocol

TAIL_BYTES = 64 * 1024
_BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ")


@dataclass(frozen=True)
class Task:
    command: list[str]
    env: dict[str, str]
    working_directory: str
    job_id: str = ""
    timeout: float = 0.0  # seconds; 0 = none (the worker enforces its own)
    vcpus: int = 0  # 0 = the executor's default
    memory_mb: int = 0


@dataclass(frozen=True)
class Result:
    exit_code: int | None
    output_tail: bytes  # the last bytes of the output, as the job wrote them
    total_bytes: int
    error: str = ""
    # Set when the executor could not be reached (the VM service is UNAVAILABLE): the job
    # did not fail, the lease goes back to the queue for another worker.
    unavailable: str = ""


class Execution(Protocol):
    def wait(self, timeout: float) -> bool:
        """True once the execution has ended."""
        ...

    def stop(self, grace: float) -> None:
        """End it: politely, then by force after ``grace`` seconds."""
        ...

    def result(self) -> Result: ...


class OutputSink(Protocol):
    def write(self, data: bytes) -> None:
        """Take output as it is written; must not block."""
        ...


class Adapter(Protocol):
    def start(self, task: Task, output: OutputSink | None = None) -> Execution: ...


class StartFailed(Exception):
    """The execution could not start (no such program, bad directory)."""


class OutputTail:
    """Keeps the last ``limit`` bytes of a stream and counts all of them."""

    def __init__(self, limit: int = TAIL_BYTES) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._kept = 0
        self.limit = limit
        self.total = 0
        self._lock = threading.Lock()

    def add(self, chunk: bytes) -> None:
        with self._lock:
            self.total += len(chunk)
            self._chunks.append(chunk)
            self._kept += len(chunk)
            while self._chunks and self._kept - len(self._chunks[0]) >= self.limit:
                self._kept -= len(self._chunks.popleft())

    def data(self) -> bytes:
        """The last ``limit`` bytes, exactly as written."""
        if self.limit <= 0:
            return b""
        with self._lock:
            return b"".join(self._chunks)[-self.limit :]


class ProcessExecution:
    def __init__(self, process: subprocess.Popen[bytes], output: OutputSink | None = None) -> None:
        self.process = process
        self.tail = OutputTail()
        self._output = output
        assert process.stdout is not None
        self._reader = threading.Thread(
            target=self._read, args=(process.stdout,), name=f"output-{process.pid}", daemon=True
        )
        self._reader.start()

    def _read(self, stream: IO[bytes]) -> None:
        with stream:
            for chunk in iter(lambda: os.read(stream.fileno(), 65536), b""):
                self.tail.add(chunk)
                if self._output is not None:
                    self._output.write(chunk)

    def wait(self, timeout: float) -> bool:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def stop(self, grace: float) -> None:
        """SIGTERM to the whole process group, then SIGKILL after the grace."""
        self._signal_group(signal.SIGTERM)
        if not self.wait(grace):
            self._signal_group(signal.SIGKILL)
            self.process.wait()
        # Children that ignored SIGTERM and outlived their leader go too.
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, signum: signal.Signals) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def result(self) -> Result:
        if self.process.poll() is not None:
            # The job is its leader's life: what it left running in its group goes too.
            self._signal_group(signal.SIGKILL)
        self._reader.join(timeout=5)
        code = self.process.returncode
        error = ""
        if code is not None and code < 0:
            error = f"killed by {signal.Signals(-code).name}"
            code = 128 - code
        return Result(code, self.tail.data(), self.tail.total, error)


class ProcessAdapter:
    """A local process: argv (no shell), its own session and process group."""

    def start(self, task: Task, output: OutputSink | None = None) -> Execution:
        env = {k: v for k in _BASE_ENV if (v := os.environ.get(k)) is not None}
        env.update(task.env)
        try:
            process = subprocess.Popen(
                task.command,
                env=env,
                cwd=task.working_directory or None,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except (OSError, ValueError) as exc:
            raise StartFailed(
                f"cannot start {task.command[0]!r}: {getattr(exc, 'strerror', None) or exc}"
            ) from None
        return ProcessExecution(process, output)


class MockExecution:
    def __init__(self, delay: float, fail: bool, output: OutputSink | None = None) -> None:
        self._done = threading.Event()
        self._fail = fail
        self._stopped = False
        self._output = output
        self._timer = threading.Timer(delay, self._end)
        self._timer.daemon = True
        self._timer.start()

    def _end(self) -> None:
        if self._output is not None:
            self._output.write(b"mock failure\n" if self._fail else b"mock success\n")
        self._done.set()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    def stop(self, grace: float) -> None:
        self._stopped = True
        self._timer.cancel()
        self._done.set()

    def result(self) -> Result:
        if self._stopped:
            return Result(137, b"", 0, "stopped")
        if self._fail:
            return Result(1, b"mock failure\n", 13, "mock failure")
        return Result(0, b"mock success\n", 13)


class MockAdapter:
    """A delay, and failures at a given rate: seeded, so a run can be repeated."""

    def __init__(self, delay: float, failure_rate: float, seed: int) -> None:
        self.delay = delay
        self.failure_rate = failure_rate
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def start(self, task: Task, output: OutputSink | None = None) -> Execution:
        with self._lock:
            fail = self._random.random() < self.failure_rate
        return MockExecution(self.delay, fail, output)
