"""Output of a running job, sent to the jobs service so a user can follow it live.

The execution writes into a bounded buffer (``write`` never blocks and never does I/O); a
thread sends what is buffered at most every ``interval`` seconds, in chunks the jobs
service accepts, each with its offset in everything the attempt wrote (so a retried call
stores nothing twice). When the jobs service is slow or down, the buffer keeps the newest
``buffer_bytes`` and drops older unsent bytes, counting them: the stored output then has
a gap, never a worker whose memory grows. A refusal (the job is unknown, the attempt was
replaced, the role is not allowed) stops sending for this execution.

With ``inline_up_to`` set, an execution that ends before the first send, having written at
most that many bytes, sends nothing at all: its caller sends the output with the completion
instead (the tail and the total: the jobs service stores them as this execution's output).
Most jobs are that short, and so cost the jobs service no output call.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc

from services.common.backoff import backoff
from services.common.errors import describe
from services.common.outbox import Transient
from services.worker.jobs_client import OutputPort

log = logging.getLogger(__name__)

SEND_INTERVAL = 0.5
BUFFER_BYTES = 256 * 1024
CHUNK_BYTES = 64 * 1024  # the jobs service's limit per call


class OutputSender:
    def __init__(
        self,
        port: OutputPort,
        job_id: str,
        generation: int,
        attempt: int,
        execution_id: str,
        *,
        interval: float = SEND_INTERVAL,
        buffer_bytes: int = BUFFER_BYTES,
        inline_up_to: int | None = None,
    ) -> None:
        self._port = port
        self.job_id = job_id
        self.generation = generation
        self.attempt = attempt
        self.execution_id = execution_id
        self.interval = interval
        self.buffer_bytes = buffer_bytes
        self.inline_up_to = inline_up_to
        self.inline = False  # True once close() left the output to the completion
        self.written = 0  # every byte the execution wrote
        self.dropped = 0  # bytes never sent (buffer overflow, refusal)
        self._pending = bytearray()
        self._pending_start = 0  # the offset of _pending[0]
        self._lock = threading.Lock()  # the buffer
        self._sending = threading.Lock()  # one sender at a time: the thread, then close()
        self._closed = threading.Event()
        self._failures = 0
        self._tried = False  # a send was tried (from then on this execution streams)
        self._resume_at = 0.0
        self._refused = False
        self._truncated = False
        self._thread = threading.Thread(target=self._run, name=f"output-{job_id[:8]}", daemon=True)

    def start(self) -> OutputSender:
        self._thread.start()
        return self

    def write(self, data: bytes) -> None:
        """Buffer ``data``; called by the execution's reader. Never blocks on the network."""
        if not data:
            return
        with self._lock:
            self.written += len(data)
            if self._refused:
                self.dropped += len(data)
                return
            self._pending += data
            excess = len(self._pending) - self.buffer_bytes
            if excess <= 0:
                return
            del self._pending[:excess]
            self._pending_start += excess
            self.dropped += excess
            first = not self._truncated
            self._truncated = True
        if first:
            log.warning(
                "job %s: output truncated: the jobs service is not keeping up; unsent bytes "
                "past %d KiB are dropped (and counted)",
                self.job_id,
                self.buffer_bytes // 1024,
            )

    def close(self) -> None:
        """Stop the thread, then send what is left and the total (one try, bounded); or,
        for an execution that never sent and wrote at most ``inline_up_to`` bytes, nothing
        (``inline`` is then True: the output goes with the completion)."""
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            self.inline = (
                self.inline_up_to is not None
                and not self._tried
                and self.written <= self.inline_up_to
            )
        if self.inline:
            return
        self._send(final=True)
        if self.dropped:
            log.info(
                "job %s: %d of %d output bytes could not be sent to the jobs service",
                self.job_id,
                self.dropped,
                self.written,
            )

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _run(self) -> None:
        while not self._closed.wait(self.interval):
            try:
                self._send(final=False)
            except Exception:
                log.exception("job %s: sending output failed unexpectedly", self.job_id)

    def _send(self, *, final: bool) -> None:
        with self._sending:
            if self._refused or (not final and time.monotonic() < self._resume_at):
                return
            budget = self.buffer_bytes  # per round, so a chatty job cannot keep us here
            while True:
                with self._lock:
                    start = self._pending_start
                    piece = bytes(self._pending[:CHUNK_BYTES])
                    last = len(piece) == len(self._pending)
                    total = self.written if final and last else None
                if not piece and total is None:
                    return
                if not self._deliver(start, piece, total):
                    return
                if total is not None:
                    return
                budget -= len(piece)
                if budget <= 0 and not final:
                    return

    def _deliver(self, start: int, piece: bytes, total: int | None) -> bool:
        self._tried = True
        try:
            self._port.append_output(
                self.job_id,
                self.generation,
                self.attempt,
                start,
                piece,
                total_bytes=total,
                execution_id=self.execution_id,
            )
        except Transient as exc:
            self._failures += 1
            delay = backoff(self._failures, base=0.5, cap=10.0)
            self._resume_at = time.monotonic() + delay
            log.log(
                logging.WARNING if self._failures == 1 else logging.DEBUG,
                "job %s: output not sent (%s); trying again in %.1fs",
                self.job_id,
                exc,
                delay,
            )
            return False
        except grpc.RpcError as exc:
            with self._lock:
                self._refused = True
                self.dropped += len(self._pending)
                self._pending.clear()
            log.warning(
                "job %s: the jobs service refused its output (%s); not sending more",
                self.job_id,
                describe(exc),
            )
            return False
        self._failures = 0
        with self._lock:
            end = start + len(piece)
            if self._pending_start < end:
                del self._pending[: end - self._pending_start]
                self._pending_start = end
        return True
