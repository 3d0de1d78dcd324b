"""Work items, their states and every rule that moves them. Each move returns the report
the queue owes the jobs service (through its outbox), or None."""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from services.common.backoff import backoff
from services.common.errors import FailedPrecondition


class ItemState(enum.Enum):
    WAITING = "WAITING"
    LEASED = "LEASED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    DEAD_LETTERED = "DEAD_LETTERED"
    CANCELLED = "CANCELLED"

    @property
    def live(self) -> bool:
        return self in (ItemState.WAITING, ItemState.LEASED)


class Outcome(enum.Enum):
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class WorkerState(enum.Enum):
    ONLINE = "ONLINE"
    DRAINING = "DRAINING"
    OFFLINE = "OFFLINE"


@dataclass
class Worker:
    worker_id: str
    worker_type: str
    labels: dict[str, str]
    slots: int
    state: WorkerState
    last_seen: datetime
    # DrainWorker was called: no new claims, even after it went silent and came back,
    # until the worker registers again (a restart).
    drained: bool = False

    def seen(self, now: datetime) -> None:
        """Heard from (a claim, a heartbeat): back from OFFLINE, as drained as it was."""
        self.last_seen = now
        if self.state is WorkerState.OFFLINE:
            self.state = WorkerState.DRAINING if self.drained else WorkerState.ONLINE

    def drain(self) -> None:
        self.drained = True
        if self.state is WorkerState.ONLINE:
            self.state = WorkerState.DRAINING

    @property
    def may_claim(self) -> bool:
        return not self.drained


@dataclass(frozen=True)
class RetryPolicy:
    default_max_attempts: int = 3
    base_seconds: float = 1.0
    cap_seconds: float = 300.0


@dataclass(slots=True)
class Item:
    job_id: str
    generation: int
    spec: bytes  # a serialized JobSpec
    state: ItemState
    priority: int
    run_at: datetime
    seq: int
    max_attempts: int
    created_at: datetime
    updated_at: datetime
    worker_types: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    attempt: int = 0
    lease_token: str | None = None
    lease_deadline: datetime | None = None
    lease_seconds: float = 0.0
    worker_id: str = ""
    version: int = 0
    cancel_requested: bool = False
    exit_code: int | None = None
    output_tail: bytes = b""
    error: str = ""
    report_seq: int = 0
    trace_context: dict[str, str] = field(default_factory=dict)

    def accepts(self, worker_type: str, worker_labels: dict[str, str]) -> bool:
        if self.worker_types and worker_type not in self.worker_types:
            return False
        return all(worker_labels.get(k) == v for k, v in self.labels.items())


@dataclass(frozen=True)
class NewItem:
    job_id: str
    generation: int
    spec: bytes  # a serialized JobSpec
    priority: int
    max_attempts: int
    run_at: datetime | None
    worker_types: tuple[str, ...]
    labels: dict[str, str]
    trace_context: dict[str, str]


@dataclass(frozen=True)
class NextGeneration:
    """A job's next generation, held while the item's current generation still holds a
    lease (two executions of one job never overlap), or the cancel of a generation not
    yet enqueued (``cancelled``: when its enqueue comes, it lands cancelled)."""

    new: NewItem
    cancelled: bool
    created_at: datetime


def tombstone(job_id: str, generation: int, created_at: datetime) -> NextGeneration:
    """A cancel that came before the enqueue of its generation."""
    new = NewItem(job_id, generation, b"", 0, 0, None, (), {}, {})
    return NextGeneration(new, True, created_at)


@dataclass(frozen=True, slots=True)
class Report:
    """An item transition for the jobs service, in the jobs contract's terms."""

    job_id: str
    generation: int
    sequence: int
    job_state: str  # PENDING | QUEUED | RUNNING | SUCCEEDED | FAILED | CANCELLED
    at: datetime
    attempt: int
    worker_id: str = ""
    exit_code: int | None = None
    output_tail: bytes = b""
    error: str = ""
    reason: str = ""
    actor: str = ""  # "worker:<id>", "queue" or "operator"
    # Set when the worker sent the attempt's output with its completion (see Completion).
    output_bytes: int | None = None
    execution_id: str = ""


def _report(item: Item, job_state: str, now: datetime, reason: str = "", actor: str = "") -> Report:
    """``actor``: who caused it; by default the worker that holds or held the lease."""
    item.report_seq += 1
    return Report(
        item.job_id,
        item.generation,
        item.report_seq,
        job_state,
        now,
        item.attempt,
        item.worker_id,
        item.exit_code,
        item.output_tail,
        item.error,
        reason,
        actor or (f"worker:{item.worker_id}" if item.worker_id else "queue"),
    )


def new_lease_token() -> str:
    return secrets.token_urlsafe(24)


def enqueued(item: Item, now: datetime) -> Report:
    return _report(item, "QUEUED", now, "enqueued", "queue")


def lease(item: Item, worker_id: str, lease_seconds: float, now: datetime) -> Report:
    item.state = ItemState.LEASED
    item.attempt += 1
    item.worker_id = worker_id
    item.lease_token = new_lease_token()
    item.lease_seconds = lease_seconds
    item.lease_deadline = now + timedelta(seconds=lease_seconds)
    item.exit_code = None
    item.output_tail = b""
    item.updated_at = now
    return _report(item, "RUNNING", now, f"attempt {item.attempt} leased to {worker_id}")


def check_holder(item: Item | None, token: str) -> Item:
    """Fencing: only the current lease's holder may act on the item."""
    if item is None or item.state is not ItemState.LEASED or item.lease_token != token:
        raise FailedPrecondition(
            "the lease is not held: it expired, was released, or was replaced by a newer one",
            subject="lease",
            violation_type="LEASE",
            reason="LEASE_NOT_HELD",
        )
    return item


def heartbeat(item: Item, lease_seconds: float | None, now: datetime) -> None:
    seconds = lease_seconds or item.lease_seconds
    item.lease_seconds = seconds
    item.lease_deadline = now + timedelta(seconds=seconds)
    item.updated_at = now


def _end_lease(item: Item) -> None:
    item.lease_token = None
    item.lease_deadline = None


def fail_attempt(
    item: Item,
    error: str,
    now: datetime,
    policy: RetryPolicy,
    exit_code: int | None = None,
    output_tail: bytes = b"",
    actor: str = "",
) -> Report:
    """The attempt failed: wait for a retry after a backoff, or dead-letter; a job
    cancelled meanwhile ends CANCELLED and never runs again. Reasons name no maximum:
    the jobs service shows "attempt N" in the job's count, which goes on past it."""
    _end_lease(item)
    item.exit_code = exit_code
    item.output_tail = output_tail
    item.error = error
    item.updated_at = now
    if item.cancel_requested:
        item.state = ItemState.CANCELLED
        return _report(item, "CANCELLED", now, f"cancelled; attempt {item.attempt}: {error}", actor)
    if item.attempt >= item.max_attempts:
        item.state = ItemState.DEAD_LETTERED
        return _report(
            item, "FAILED", now, f"attempt {item.attempt} failed, none left; dead-lettered", actor
        )
    delay = backoff(item.attempt - 1, policy.base_seconds, policy.cap_seconds)
    item.state = ItemState.WAITING
    item.run_at = now + timedelta(seconds=delay)
    left = item.max_attempts - item.attempt
    return _report(
        item,
        "QUEUED",
        now,
        f"attempt {item.attempt} failed; {left} left, retry in {delay:.1f}s",
        actor,
    )


def complete(
    item: Item,
    outcome: Outcome,
    exit_code: int | None,
    output_tail: bytes,
    error: str,
    now: datetime,
    policy: RetryPolicy,
) -> Report:
    if outcome is Outcome.FAILED:
        return fail_attempt(
            item, error or f"exited with {exit_code}", now, policy, exit_code, output_tail
        )
    _end_lease(item)
    item.exit_code = exit_code
    item.output_tail = output_tail
    item.error = error
    item.updated_at = now
    if outcome is Outcome.SUCCEEDED:
        item.state = ItemState.SUCCEEDED
        return _report(item, "SUCCEEDED", now, "completed")
    item.state = ItemState.CANCELLED
    return _report(item, "CANCELLED", now, "stopped by the worker after a cancel")


def release(item: Item, reason: str, now: datetime) -> Report:
    """Give the item back without counting the attempt (a cancelled one ends instead)."""
    _end_lease(item)
    item.updated_at = now
    if item.cancel_requested:
        item.state = ItemState.CANCELLED
        return _report(item, "CANCELLED", now, "cancelled; the lease was released")
    item.state = ItemState.WAITING
    item.attempt = max(0, item.attempt - 1)
    item.run_at = now
    item.updated_at = now
    return _report(item, "QUEUED", now, f"released: {reason}" if reason else "released")


def cancel(item: Item, now: datetime) -> Report | None:
    if item.state is ItemState.WAITING:
        item.state = ItemState.CANCELLED
        item.updated_at = now
        return _report(item, "CANCELLED", now, "cancelled while waiting", "operator")
    if item.state is ItemState.DEAD_LETTERED:
        # A job cancelled as its last attempt failed: no redrive may run it again.
        item.state = ItemState.CANCELLED
        item.updated_at = now
        return _report(item, "CANCELLED", now, "cancelled while dead-lettered", "operator")
    if item.state is ItemState.LEASED:
        item.cancel_requested = True
        item.updated_at = now
        return None
    raise FailedPrecondition(
        f"item {item.job_id} is {item.state.value}; nothing to cancel",
        subject=f"items/{item.job_id}",
        reason="ILLEGAL_TRANSITION",
        metadata={"current_state": item.state.value},
    )


def redrive(item: Item, now: datetime) -> Report:
    if item.state is not ItemState.DEAD_LETTERED:
        raise FailedPrecondition(
            f"item {item.job_id} is {item.state.value}; only dead-lettered items can be redriven",
            subject=f"items/{item.job_id}",
            reason="ILLEGAL_TRANSITION",
            metadata={"current_state": item.state.value},
        )
    item.state = ItemState.WAITING
    item.attempt = 0
    item.run_at = now
    item.updated_at = now
    return _report(item, "QUEUED", now, "redriven from the dead letters", "operator")


def expire(item: Item, now: datetime, policy: RetryPolicy, why: str) -> Report:
    """The lease ran out (or its worker went offline): a failed attempt, the queue's act."""
    return fail_attempt(item, why, now, policy, actor="queue")
