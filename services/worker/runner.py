"""The worker loop: register, claim up to the free slots (long poll), execute, heartbeat
every lease/3, complete. On stop: no new claims, running jobs get a grace period, then
their leases are released so another worker picks them up.

While a job runs its output goes to the jobs service (``output.OutputSender``), and every
execution is recorded in the bounded ``tracker.ExecutionTracker``. When the executor is
unavailable (the VM service answers UNAVAILABLE), the lease is released, not failed, and
claims pause with a growing backoff so the worker does not spin claiming and releasing.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable

import grpc

from services.common import telemetry
from services.common.backoff import backoff
from services.common.errors import describe
from services.common.outbox import Transient
from services.common.pbtime import seconds
from services.common.startup import StartupError
from services.worker.adapters import TAIL_BYTES, Adapter, Execution, Result, StartFailed, Task
from services.worker.config import WorkerConfig
from services.worker.jobs_client import OutputPort
from services.worker.output import OutputSender
from services.worker.queue_client import ClaimedItem, QueueClient
from services.worker.tracker import ExecutionTracker, Outcome

log = logging.getLogger(__name__)

POLL_STEP = 0.2
# An empty claim that came back at once (no long poll) waits the rest of this: no spinning.
MIN_CLAIM_PERIOD = 0.5
UNAVAILABLE_BACKOFF_BASE = 1.0
UNAVAILABLE_BACKOFF_CAP = 30.0
# A completion or release the queue could not take is sent again for at least this long
# (and twice the lease): a queue restarted meanwhile still holds the lease (it times a
# lease it finds late for another lease length before ending it).
REPORT_PATIENCE = 60.0
REPORT_BACKOFF_BASE = 0.5
REPORT_BACKOFF_CAP = 5.0
# A registration refused with one of these codes will be refused again (a setting is
# wrong): the hint each adds to the one line the worker ends with.
_REFUSED_HINTS = {
    grpc.StatusCode.INVALID_ARGUMENT: "",
    grpc.StatusCode.UNAUTHENTICATED: " (the token is missing, or not one the queue knows)",
    grpc.StatusCode.PERMISSION_DENIED: " (the token is not the queue's worker token)",
}
# RegisterWorker's fields, by the setting that fills each.
_SETTING_OF = {
    "worker_id": "WORKER_ID",
    "worker_type": "WORKER_TYPE",
    "slots": "WORKER_SLOTS",
}


class Worker:
    def __init__(
        self,
        settings: WorkerConfig,
        queue: QueueClient,
        adapter: Adapter,
        *,
        output: OutputPort | None = None,
        tracker: ExecutionTracker | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.adapter = adapter
        self.output = output
        self.tracker = tracker or ExecutionTracker(settings.tracker)
        self._stopping = threading.Event()
        self._release_now = threading.Event()
        self._active: dict[str, threading.Thread] = {}
        self._lock = threading.Condition()
        self._tracer = telemetry.tracer(__name__)
        self._paused_until = 0.0
        self._unavailable_streak = 0
        self.heartbeat_interval = settings.heartbeat_interval

    # ---- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        self.tracker.start_cleanup()
        try:
            self._register()
            self._claim_loop()
            self._drain()
        finally:
            self.tracker.stop_cleanup()

    def _claim_loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            free = self._wait_for_free_slot()
            if free == 0 or self._paused():
                continue
            started = time.monotonic()
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
                if self._stopping.is_set():
                    # Claimed while the stop came: give it back at once, do not start it.
                    self._release(item, "the worker is shutting down")
                else:
                    self._launch(item)
            if not claimed:
                self._stopping.wait(max(0.0, MIN_CLAIM_PERIOD - (time.monotonic() - started)))

    def stop(self) -> None:
        """Ask the loop to drain and end (SIGTERM): no new claims from now on, and the claim
        waiting in a long poll ends at once rather than within WORKER_POLL_WAIT."""
        self._stopping.set()
        self.queue.interrupt()
        with self._lock:
            self._lock.notify_all()

    def _register(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                worker_timeout = self.queue.register(
                    self.settings.worker_id, self.settings.worker_type, self.settings.slots
                )
                # A lease heartbeat is also how the queue hears from a busy worker: one
                # silent past the queue's worker timeout would lose the leases it runs.
                if worker_timeout:  # a quarter: one failed heartbeat is not yet silence
                    self.heartbeat_interval = min(
                        self.settings.heartbeat_interval, worker_timeout / 4
                    )
                log.info(
                    "worker %s (%s, %d slots) registered; heartbeats every %.1fs",
                    self.settings.worker_id,
                    self.settings.worker_type,
                    self.settings.slots,
                    self.heartbeat_interval,
                )
                return
            except (Transient, grpc.RpcError) as exc:
                if isinstance(exc, grpc.RpcError) and exc.code() in _REFUSED_HINTS:
                    raise StartupError(self._refusal(exc)) from None
                failures += 1
                delay = backoff(failures, base=0.5, cap=10.0)
                log.warning(
                    "cannot register with the queue (%s); retrying in %.1fs", _why(exc), delay
                )
                self._stopping.wait(delay)

    def _refusal(self, exc: grpc.RpcError) -> str:
        """One line for a registration the queue refused: the setting to look at first."""
        failure = describe(exc)
        if failure.code == grpc.StatusCode.INVALID_ARGUMENT:
            fields = {field.split("[")[0] for field, _ in failure.field_violations}
            named = sorted(_SETTING_OF[f] for f in fields if f in _SETTING_OF)
            settings = ", ".join(named) or "WORKER_ID or WORKER_TYPE"
        else:  # UNAUTHENTICATED, PERMISSION_DENIED
            settings = "BLIXARD_WORKER_TOKEN"
        why = " ".join(str(failure).split())  # one line, whatever the queue said
        return (
            f"{settings}: the queue at {self.settings.queue_address} refused to register "
            f"this worker: {why}{_REFUSED_HINTS[failure.code]}"
        )

    def _wait_for_free_slot(self) -> int:
        with self._lock:
            self._lock.wait_for(
                lambda: len(self._active) < self.settings.slots or self._stopping.is_set(),
                timeout=1.0,
            )
            if self._stopping.is_set():
                return 0
            return self.settings.slots - len(self._active)

    def _paused(self) -> bool:
        """Wait while claims are paused (the executor was unavailable); True if it was."""
        with self._lock:
            delay = self._paused_until - time.monotonic()
        if delay <= 0:
            return False
        self._stopping.wait(delay)
        return True

    def _executor_unavailable(self, why: str) -> None:
        with self._lock:
            self._unavailable_streak += 1
            delay = backoff(
                self._unavailable_streak,
                base=UNAVAILABLE_BACKOFF_BASE,
                cap=UNAVAILABLE_BACKOFF_CAP,
            )
            self._paused_until = max(self._paused_until, time.monotonic() + delay)
        log.warning("%s; no claims for %.1fs", why, delay)

    def _executor_available(self) -> None:
        with self._lock:
            self._unavailable_streak = 0

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
            log.info(
                "draining: no new claims; %d running job(s), %.0fs grace",
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
        # One execution: an attempt given back to the queue may run again under its number.
        key = secrets.token_hex(8)
        self.tracker.start(key, item.job_id, item.generation, item.attempt)
        try:
            with self._tracer.start_as_current_span(
                "worker.execute",
                context=telemetry.context_from(item.trace_context),
                attributes={"blixard.job_id": item.job_id, "blixard.attempt": item.attempt},
            ):
                self._supervise(item, key)
        except Exception as exc:
            log.exception("job %s: the execution failed unexpectedly", item.job_id)
            self.tracker.finish(key, Outcome.FAILED, error=f"worker error: {exc!r}")
        finally:
            with self._lock:
                self._active.pop(item.token, None)
                self._lock.notify_all()

    def _task(self, item: ClaimedItem) -> tuple[Task, float]:
        spec = item.spec
        timeout = (
            seconds(spec.requirements.timeout)
            if spec.requirements.HasField("timeout")
            else self.settings.default_timeout
        )
        task = Task(
            list(spec.command),
            dict(spec.env),
            spec.working_directory,
            job_id=item.job_id,
            timeout=timeout,
            vcpus=spec.requirements.vcpus,
            memory_mb=spec.requirements.memory_mb,
        )
        return task, timeout

    def _supervise(self, item: ClaimedItem, key: str) -> None:
        task, timeout = self._task(item)
        log.info("job %s attempt %d: starting %s", item.job_id, item.attempt, task.command)
        sender = self._output_sender(item, key)
        try:
            try:
                execution = self.adapter.start(task, sender)
            except StartFailed as exc:
                result = Result(None, b"", 0, str(exc))
                ending = "start failed"
            else:
                ending = self._watch(item, execution, timeout)
                result = execution.result()
        finally:
            if sender is not None:
                # Before the report: a follower has all the output when the job ends.
                sender.close()
        self._conclude(item, key, ending, result, timeout)

    def _output_sender(self, item: ClaimedItem, key: str) -> OutputSender | None:
        if self.output is None:
            return None
        # A job that ends before its output's first send sends it with its completion.
        return OutputSender(
            self.output, item.job_id, item.generation, item.attempt, key, inline_up_to=TAIL_BYTES
        ).start()

    def _watch(self, item: ClaimedItem, execution: Execution, timeout: float) -> str:
        """Heartbeat until the execution ends; why the worker stopped it, or ''."""
        started = time.monotonic()
        next_heartbeat = started + self.heartbeat_interval
        while not execution.wait(POLL_STEP):
            now = time.monotonic()
            ending = ""
            if self._release_now.is_set():
                ending = "released"
            elif now - started > timeout:
                ending = "timed out"
            elif now >= next_heartbeat:
                next_heartbeat = now + self.heartbeat_interval
                ending = self._heartbeat(item)
            if ending:
                execution.stop(self.settings.kill_grace)
                return ending
        return ""

    def _conclude(
        self, item: ClaimedItem, key: str, ending: str, result: Result, timeout: float
    ) -> None:
        """Record how the execution ended, then report it to the queue."""
        if ending == "timed out":
            result = Result(
                result.exit_code,
                result.output_tail,
                result.total_bytes,
                f"timed out after {timeout:g}s",
            )
        outcome = _outcome(ending, result)
        self.tracker.finish(
            key,
            outcome,
            exit_code=result.exit_code,
            error=result.error or result.unavailable,
            output_bytes=result.total_bytes,
        )
        if result.unavailable:
            self._release(item, f"the executor is unavailable: {result.unavailable}")
            self._executor_unavailable(f"job {item.job_id}: {result.unavailable}")
            return
        if ending != "start failed":
            self._executor_available()
        if outcome is Outcome.RELEASED:
            self._release(item, "the worker is shutting down")
        elif outcome is Outcome.LOST:
            log.warning("job %s: the lease was lost; the result is not reported", item.job_id)
        else:
            self._finish(item, key, outcome.value, result)

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

    def _finish(self, item: ClaimedItem, key: str, outcome: str, result: Result) -> None:
        error = result.error or ("" if result.exit_code == 0 else f"exited with {result.exit_code}")
        log.info(
            "job %s attempt %d: %s (exit %s)", item.job_id, item.attempt, outcome, result.exit_code
        )
        self._report(
            item,
            lambda: self.queue.complete(
                item.token,
                outcome,
                result.exit_code,
                result.output_tail,
                error,
                result.total_bytes,
                key,
            ),
        )

    def _release(self, item: ClaimedItem, reason: str) -> None:
        log.info("job %s: releasing its lease (%s)", item.job_id, reason)
        self._report(item, lambda: self.queue.release(item.token, reason[:1024]))

    def _report(self, item: ClaimedItem, send: Callable[[], None]) -> None:
        give_up = time.monotonic() + max(REPORT_PATIENCE, 2 * self.settings.lease_seconds)
        attempt = 0
        while True:
            try:
                send()
                return
            except Transient as exc:
                delay = backoff(attempt, base=REPORT_BACKOFF_BASE, cap=REPORT_BACKOFF_CAP)
                attempt += 1
                if time.monotonic() + delay > give_up:
                    break
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


def _outcome(ending: str, result: Result) -> Outcome:
    if result.unavailable or ending == "released":
        return Outcome.RELEASED
    if ending == "lease lost":
        return Outcome.LOST
    if ending == "cancelled":
        return Outcome.CANCELLED
    if ending == "timed out" or result.exit_code != 0:
        return Outcome.FAILED
    return Outcome.SUCCEEDED


def _why(exc: BaseException) -> str:
    return str(describe(exc)) if isinstance(exc, grpc.RpcError) else str(exc)
