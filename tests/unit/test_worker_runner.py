"""services.worker.runner with a fake queue and fake executions: what the worker reports to
the queue and records in its tracker, how it backs off, how it drains."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from blixard.common.v1 import job_spec_pb2

from services.common.outbox import Transient
from services.worker import config, runner
from services.worker.adapters import Execution, OutputSink, Result, Task
from services.worker.queue_client import ClaimedItem
from services.worker.runner import Worker
from services.worker.tracker import Outcome


@dataclass
class FakeQueue:
    """The queue as the worker sees it: items to hand out, and every call recorded."""

    waiting: list[ClaimedItem] = field(default_factory=list)
    cancelled: set[str] = field(default_factory=set)
    claims: list[float] = field(default_factory=list)
    completed: list[tuple[str, str, int | None]] = field(default_factory=list)
    released: list[tuple[str, str]] = field(default_factory=list)
    heartbeats: int = 0
    worker_timeout: float | None = None  # what RegisterWorker answers
    lock: threading.Lock = field(default_factory=threading.Lock)

    def register(self, worker_id: str, worker_type: str, slots: int) -> float | None:
        return self.worker_timeout

    def claim(
        self, worker_id: str, worker_type: str, max_items: int, lease_seconds: float, wait: float
    ) -> list[ClaimedItem]:
        with self.lock:
            self.claims.append(time.monotonic())
            taken, self.waiting = self.waiting[:max_items], self.waiting[max_items:]
        return taken

    def interrupt(self) -> None:
        pass

    def heartbeat(self, token: str) -> bool:
        with self.lock:
            self.heartbeats += 1
            return token in self.cancelled

    def complete(
        self,
        token: str,
        outcome: str,
        exit_code: int | None,
        output_tail: bytes,
        error: str,
        total_output_bytes: int | None = None,
        execution_id: str = "",
    ) -> None:
        with self.lock:
            self.completed.append((token, outcome, exit_code))

    def release(self, token: str, reason: str) -> None:
        with self.lock:
            self.released.append((token, reason))
            # Given back: it waits for a worker again.
            self.waiting.append(item(token))


def item(token: str, *command: str) -> ClaimedItem:
    spec = job_spec_pb2.JobSpec(command=list(command) or ["job"])
    return ClaimedItem(f"job-{token}", 1, 1, token, spec, {})


class FakeExecution:
    def __init__(self, result: Result, seconds: float) -> None:
        self._result = result
        self._done = threading.Event()
        self.stopped = False
        threading.Timer(seconds, self._done.set).start()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    def stop(self, grace: float) -> None:
        self.stopped = True
        self._done.set()

    def result(self) -> Result:
        return Result(137, b"", 0, "stopped") if self.stopped else self._result


@dataclass
class FakeAdapter:
    result: Result = field(default_factory=lambda: Result(0, b"ok\n", 3))
    seconds: float = 0.0
    started: list[Task] = field(default_factory=list)

    def start(self, task: Task, output: OutputSink | None = None) -> Execution:
        self.started.append(task)
        return FakeExecution(self.result, self.seconds)


def settings(**extra: str) -> config.WorkerConfig:
    return config.load(
        {
            "WORKER_ID": "unit-worker",
            "WORKER_SLOTS": "2",
            "WORKER_LEASE_SECONDS": "1.5",  # heartbeat every 0.5 s
            "WORKER_POLL_WAIT": "0",
            "WORKER_DRAIN_GRACE": "0.3",
            "WORKER_KILL_GRACE": "0.1",
            **extra,
        }
    )


@pytest.fixture
def running() -> Iterator[list[tuple[Worker, threading.Thread]]]:
    started: list[tuple[Worker, threading.Thread]] = []
    yield started
    for worker, thread in started:
        worker.stop()
        thread.join(timeout=10)
        assert not thread.is_alive()


def run(
    started: list[tuple[Worker, threading.Thread]],
    queue: FakeQueue,
    adapter: FakeAdapter,
    **extra: str,
) -> Worker:
    worker = Worker(settings(**extra), queue, adapter)  # type: ignore[arg-type]
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    started.append((worker, thread))
    return worker


def eventually(condition, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return bool(condition())


def test_a_job_is_completed_and_tracked(running: list) -> None:  # type: ignore[type-arg]
    queue = FakeQueue(waiting=[item("a")])
    worker = run(running, queue, FakeAdapter(Result(3, b"boom\n", 5, "")))
    assert eventually(lambda: queue.completed)
    assert queue.completed == [("a", "FAILED", 3)]
    [entry] = worker.tracker.find("job-a")
    assert (entry.outcome, entry.exit_code, entry.output_bytes) == (Outcome.FAILED, 3, 5)


def test_an_idle_worker_does_not_spin(running: list) -> None:  # type: ignore[type-arg]
    queue = FakeQueue()
    run(running, queue, FakeAdapter())  # the fake answers every claim at once, empty
    time.sleep(1.0)
    assert 1 <= len(queue.claims) <= 3


def test_an_unavailable_executor_releases_and_pauses_claims(running: list) -> None:  # type: ignore[type-arg]
    queue = FakeQueue(waiting=[item("vm")])
    adapter = FakeAdapter(Result(None, b"", 0, "", unavailable="UNAVAILABLE: no VM manager"))
    worker = run(running, queue, adapter)
    assert eventually(lambda: queue.released)
    assert queue.completed == [], "not failed"
    token, reason = queue.released[0]
    assert token == "vm" and "unavailable" in reason and "no VM manager" in reason
    assert worker.tracker.find("job-vm")[0].outcome is Outcome.RELEASED
    # The item is back in the queue; the worker backs off instead of claiming it again and
    # again: over two seconds, a handful of tries at most, not hundreds.
    time.sleep(2.0)
    assert 1 <= len(queue.released) <= 3, queue.released
    assert queue.completed == []


def test_a_cancel_seen_at_a_heartbeat_stops_the_execution(running: list) -> None:  # type: ignore[type-arg]
    queue = FakeQueue(waiting=[item("c")], cancelled={"c"})
    adapter = FakeAdapter(seconds=60)
    started = time.monotonic()
    run(running, queue, adapter)
    assert eventually(lambda: queue.completed)
    assert queue.completed == [("c", "CANCELLED", 137)]
    assert time.monotonic() - started < 0.5 + 1.0, "within one heartbeat interval (0.5 s)"


def test_stop_drains_then_releases_what_still_runs(running: list) -> None:  # type: ignore[type-arg]
    queue = FakeQueue(waiting=[item("long"), item("short")])
    worker = run(running, queue, FakeAdapter(seconds=60))
    assert eventually(lambda: worker.active == 2)
    queue.waiting.clear()
    worker.stop()
    assert eventually(lambda: len(queue.released) == 2)
    assert {t for t, _ in queue.released} == {"long", "short"}
    assert all("shutting down" in reason for _, reason in queue.released)
    assert queue.completed == []


def test_a_job_that_ends_within_the_grace_is_completed_not_released(running: list) -> None:  # type: ignore[type-arg]
    queue = FakeQueue(waiting=[item("quick")])
    worker = run(running, queue, FakeAdapter(seconds=0.3), WORKER_DRAIN_GRACE="5")
    assert eventually(lambda: worker.active == 1)
    worker.stop()
    assert eventually(lambda: queue.completed)
    assert queue.completed == [("quick", "SUCCEEDED", 0)]
    assert queue.released == []


def test_the_task_carries_what_the_executor_needs(running: list) -> None:  # type: ignore[type-arg]
    claimed = item("t", "echo", "hi")
    claimed.spec.requirements.vcpus = 2
    claimed.spec.requirements.memory_mb = 512
    claimed.spec.requirements.timeout.FromSeconds(42)
    adapter = FakeAdapter()
    queue = FakeQueue(waiting=[claimed])
    run(running, queue, adapter)
    assert eventually(lambda: adapter.started)
    task = adapter.started[0]
    assert (task.command, task.job_id, task.timeout, task.vcpus, task.memory_mb) == (
        ["echo", "hi"],
        "job-t",
        42.0,
        2,
        512,
    )


def test_a_busy_worker_is_heard_from_within_the_queues_worker_timeout(running: list) -> None:  # type: ignore[type-arg]
    """Leases of 30 s would be heartbeaten every 10 s; the queue takes a worker silent
    for 1.2 s for gone, so the worker heartbeats every 0.3 s instead."""
    queue = FakeQueue(waiting=[item("long")], worker_timeout=1.2)
    worker = run(running, queue, FakeAdapter(seconds=60), WORKER_LEASE_SECONDS="30")
    assert eventually(lambda: queue.heartbeats >= 1)
    counted = queue.heartbeats
    time.sleep(1.5)
    assert worker.heartbeat_interval == pytest.approx(0.3)
    assert queue.heartbeats - counted >= 3  # about 5; every 10 s would give none


def test_a_queue_that_names_no_worker_timeout_leaves_the_lease_based_interval(
    running: list,  # type: ignore[type-arg]
) -> None:
    queue = FakeQueue()
    worker = run(running, queue, FakeAdapter())
    assert eventually(lambda: queue.claims)  # registered: it claims
    assert worker.heartbeat_interval == 0.5  # lease 1.5 s / 3


@dataclass
class DownQueue(FakeQueue):
    """A queue that refuses the first completions as unreachable (it is restarting)."""

    down_for: int = 0

    def complete(
        self,
        token: str,
        outcome: str,
        exit_code: int | None,
        output_tail: bytes,
        error: str,
        total_output_bytes: int | None = None,
        execution_id: str = "",
    ) -> None:
        with self.lock:
            if self.down_for > 0:
                self.down_for -= 1
                raise Transient("UNAVAILABLE: connection refused")
        super().complete(token, outcome, exit_code, output_tail, error)


def test_a_completion_outlasts_a_queue_restart(
    running: list,  # type: ignore[type-arg]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Twenty failed tries (a minute of a queue restart, at the real backoff) and the
    completion still goes: the job does not run again because the queue was away."""
    monkeypatch.setattr(runner, "REPORT_BACKOFF_BASE", 0.001)
    monkeypatch.setattr(runner, "REPORT_BACKOFF_CAP", 0.002)
    queue = DownQueue(waiting=[item("a")], down_for=20)
    run(running, queue, FakeAdapter())
    assert eventually(lambda: queue.completed)
    assert queue.completed == [("a", "SUCCEEDED", 0)]


def test_a_completion_is_given_up_once_the_lease_is_long_gone(
    running: list,  # type: ignore[type-arg]
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(runner, "REPORT_PATIENCE", 0.0)  # twice the 1.5 s lease, then
    monkeypatch.setattr(runner, "REPORT_BACKOFF_BASE", 0.2)
    monkeypatch.setattr(runner, "REPORT_BACKOFF_CAP", 0.2)
    queue = DownQueue(waiting=[item("a")], down_for=10**6)
    started = time.monotonic()
    run(running, queue, FakeAdapter())
    assert eventually(lambda: "could not report" in caplog.text, timeout=10)
    assert 2.5 <= time.monotonic() - started <= 8  # twice the lease, then it gives up
    assert queue.completed == [] and 10**6 - queue.down_for > 6
