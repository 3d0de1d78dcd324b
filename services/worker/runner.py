"""The worker loop: register, claim up to the free slots (long poll), execute, heartbeat
every lease/3, complete. On stop: no new claims, running jobs get a grace period, then
their leases are released so another worker picks them up."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc

from services.common import telemetry
from services.common.backoff import backoff
from services.common.errors import describe
from services.common.outbox import Transient
from services.common.pbtime import seconds
from services.worker.adapters import Adapter, Result, StartFailed, Task
from services.worker.config import WorkerConfig
from services.worker.queue_client import ClaimedItem, QueueClient

log = logging.getLogger(__name__)

POLL_STEP = 0.2


class Worker:
    def __init__(self, settings: WorkerConfig, queue: QueueClient, adapter: Adapter) -> None:
        self.settings = settings
        self.queue = queue
        self.adapter = adapter
        self._stopping = threading.Event()
        self._release_now = threading.Event()
        self._active: dict[str, threading.Thread] = {}
        self._lock = threading.Condition()
        self._tracer = telemetry.tracer(__name__)

    # ---- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        self._register()
        failures = 0
        while not self._stopping.is_set():
            free = self._wait_for_free_slot()
            if free == 0:
                continue
            try:
                claimed = self.queue.claim(
                    self.settings.worker_id,
                    self.settings.worker_type,
                    free,
                    self.settings.lease_seconds,
                    self.settings.poll_wait,
                )
                failures = 0
            except (Transient, grpc.RpcError) as exc:
                failures += 1
                delay = backoff(failures, base=0.5, cap=10.0)
                log.warning("claim failed (%s); retrying in %.1fs", _why(exc), delay)
                self._stopping.wait(delay)
                continue
            for item in claimed:
                self._launch(item)
        self._drain()

    def stop(self) -> None:
        """Ask the loop to drain and end (SIGTERM)."""
        self._stopping.set()
        with self._lock:
            self._lock.notify_all()

    def _register(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                self.queue.register(
                    self.settings.worker_id, self.settings.worker_type, self.settings.slots
                )
                log.info(
                    "worker %s (%s, %d slots) registered",
                    self.settings.worker_id,
                    self.settings.worker_type,
                    self.settings.slots,
                )
                return
            except (Transient, grpc.RpcError) as exc:
                failures += 1
                delay = backoff(failures, base=0.5, cap=10.0)
                log.warning(
                    "cannot register with the queue (%s); retrying in %.1fs", _why(exc), delay
                )
                self._stopping.wait(delay)

    def _wait_for_free_slot(self) -> int:
        with self._lock:
            self._lock.wait_for(
                lambda: len(self._active) < self.settings.slots or self._stopping.is_set(),
                timeout=1.0,
            )
            if self._stopping.is_set():
                return 0
            return self.settings.slots - len(self._active)

    def _launch(self, item: ClaimedItem) -> None:
        thread = threading.Thread(
            target=self._execute, args=(item,), name=f"job-{item.job_id[:8]}", daemon=True
        )
        with self._lock:
            self._active[item.token] = thread
        thread.start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.settings.drain_grace
        with self._lock:
            if self._active:
                log.info(
                    "draining: %d running job(s), %.0fs grace",
                    len(self._active),
                    self.settings.drain_grace,
                )
            self._lock.wait_for(
                lambda: not self._active, timeout=max(0.0, deadline - time.monotonic())
            )
            remaining = list(self._active.values())
        if remaining:
            log.info(
                "grace period over: stopping %d job(s) and releasing their leases", len(remaining)
            )
            self._release_now.set()
            for thread in remaining:
                thread.join(timeout=self.settings.kill_grace + 15)

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._active)

    # ---- one execution ----------------------------------------------------------------

    def _execute(self, item: ClaimedItem) -> None:
        try:
            with self._tracer.start_as_current_span(
                "worker.execute",
                context=telemetry.context_from(item.trace_context),
                attributes={"blixard.job_id": item.job_id, "blixard.attempt": item.attempt},
            ):
                self._supervise(item)
        except Exception:
            log.exception("job %s: the execution failed unexpectedly", item.job_id)
        finally:
            with self._lock:
                self._active.pop(item.token, None)
                self._lock.notify_all()

    def _supervise(self, item: ClaimedItem) -> None:
        spec = item.spec
        task = Task(list(spec.command), dict(spec.env), spec.working_directory)
        timeout = (
            seconds(spec.requirements.timeout)
            if spec.requirements.HasField("timeout")
            else self.settings.default_timeout
        )
        log.info("job %s attempt %d: starting %s", item.job_id, item.attempt, task.command)
        try:
            execution = self.adapter.start(task)
        except StartFailed as exc:
            self._finish(item, "FAILED", Result(None, "", 0, str(exc)))
            return
        started = time.monotonic()
        next_heartbeat = started + self.settings.heartbeat_interval
        ending = ""  # why the worker stopped it: cancelled, timed out, lease lost, released
        while not execution.wait(POLL_STEP):
            now = time.monotonic()
            if self._release_now.is_set():
                ending = "released"
            elif now - started > timeout:
                ending = "timed out"
            elif now >= next_heartbeat:
                next_heartbeat = now + self.settings.heartbeat_interval
                ending = self._heartbeat(item)
            if ending:
                execution.stop(self.settings.kill_grace)
                break
        result = execution.result()
        if ending == "released":
            self._release(item)
        elif ending == "lease lost":
            log.warning("job %s: the lease was lost; the result is not reported", item.job_id)
        elif ending == "cancelled":
            self._finish(item, "CANCELLED", result)
        elif ending == "timed out":
            self._finish(
                item,
                "FAILED",
                Result(
                    result.exit_code,
                    result.output_tail,
                    result.total_bytes,
                    f"timed out after {timeout:g}s",
                ),
            )
        else:
            self._finish(item, "SUCCEEDED" if result.exit_code == 0 else "FAILED", result)

    def _heartbeat(self, item: ClaimedItem) -> str:
        try:
            return "cancelled" if self.queue.heartbeat(item.token) else ""
        except Transient as exc:
            log.warning("job %s: heartbeat failed (%s); will try again", item.job_id, exc)
            return ""
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                return "lease lost"
            log.warning("job %s: heartbeat failed (%s)", item.job_id, _why(exc))
            return ""

    def _finish(self, item: ClaimedItem, outcome: str, result: Result) -> None:
        error = result.error or ("" if result.exit_code == 0 else f"exited with {result.exit_code}")
        log.info(
            "job %s attempt %d: %s (exit %s)", item.job_id, item.attempt, outcome, result.exit_code
        )
        self._report(
            item,
            lambda: self.queue.complete(
                item.token, outcome, result.exit_code, result.output_tail, error
            ),
        )

    def _release(self, item: ClaimedItem) -> None:
        log.info("job %s: releasing its lease", item.job_id)
        self._report(item, lambda: self.queue.release(item.token, "the worker is shutting down"))

    def _report(self, item: ClaimedItem, send: Callable[[], None]) -> None:
        for attempt in range(6):
            try:
                send()
                return
            except Transient as exc:
                delay = backoff(attempt, base=0.5, cap=5.0)
                log.warning(
                    "job %s: report failed (%s); retrying in %.1fs", item.job_id, exc, delay
                )
                time.sleep(delay)
            except grpc.RpcError as exc:
                log.warning("job %s: report refused: %s", item.job_id, _why(exc))
                return
        log.error(
            "job %s: could not report; the lease will expire and the job run again", item.job_id
        )


def _why(exc: BaseException) -> str:
    return str(describe(exc)) if isinstance(exc, grpc.RpcError) else str(exc)
