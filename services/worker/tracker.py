"""The execution tracker: what this worker ran lately, bounded so a worker can run for months.

An entry is recorded when an execution starts and updated when it ends. Ended entries
expire by a TTL that depends on their outcome; past ``max_entries`` the least recently used
entry is evicted (ended ones before running ones); a cleanup thread removes expired entries
every ``cleanup_interval``; every read refreshes the entry (``last_accessed``, LRU order).

Ages are measured on the monotonic clock of the injected ``Clock``, guarded so a reading
that goes backwards or is not a number holds the last good one; the times shown to people
(``started_at``, ``ended_at``, ``last_accessed``) are the Clock's safe wall-clock readings.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace

from services.common.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    # Given back to the queue (drain, VM service unavailable): another worker runs it.
    RELEASED = "RELEASED"
    # The lease was lost (expired, or taken over): the result was not reported.
    LOST = "LOST"


@dataclass(frozen=True)
class TrackerLimits:
    max_entries: int = 10_000
    ttl_completed: float = 24 * 3600.0
    ttl_failed: float = 24 * 3600.0
    ttl_cancelled: float = 3600.0
    cleanup_interval: float = 3600.0

    def ttl(self, outcome: Outcome) -> float | None:
        """Seconds an ended entry is kept; None for a running one (kept while it runs)."""
        if outcome is Outcome.RUNNING:
            return None
        if outcome is Outcome.SUCCEEDED:
            return self.ttl_completed
        if outcome in (Outcome.FAILED, Outcome.LOST):
            return self.ttl_failed
        return self.ttl_cancelled  # CANCELLED, RELEASED


@dataclass(frozen=True, slots=True)
class Entry:
    # One execution: an attempt given back to the queue may run again under its number.
    execution_id: str
    job_id: str
    generation: int
    attempt: int
    outcome: Outcome
    started_at: float  # wall clock, seconds since the epoch
    last_accessed: float  # wall clock
    ended_at: float | None = None  # wall clock
    exit_code: int | None = None
    error: str = ""
    output_bytes: int = 0
    # Monotonic reading when it ended (ages and TTLs are measured on it).
    ended_tick: float | None = None


class ExecutionTracker:
    def __init__(self, limits: TrackerLimits | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self.limits = limits or TrackerLimits()
        if self.limits.max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._clock = clock
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self._last_tick = -math.inf
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.evicted = 0
        self.expired = 0

    # ---- time -------------------------------------------------------------------------

    def _tick(self) -> float:
        """The monotonic clock, never backwards, never NaN (caller holds the lock)."""
        try:
            reading = float(self._clock.monotonic())
        except (OSError, OverflowError, ValueError, TypeError):
            reading = math.nan
        if math.isfinite(reading) and reading > self._last_tick:
            self._last_tick = reading
        elif not math.isfinite(self._last_tick):
            self._last_tick = 0.0
        return self._last_tick

    def _expired(self, entry: Entry, tick: float) -> bool:
        ttl = self.limits.ttl(entry.outcome)
        if ttl is None or entry.ended_tick is None:
            return False
        return tick - entry.ended_tick >= ttl

    # ---- writes -----------------------------------------------------------------------

    def start(self, execution_id: str, job_id: str, generation: int, attempt: int) -> None:
        """Record an execution that starts now."""
        now = self._clock.timestamp()
        entry = Entry(execution_id, job_id, generation, attempt, Outcome.RUNNING, now, now)
        with self._lock:
            self._tick()
            self._put(entry)

    def finish(
        self,
        execution_id: str,
        outcome: Outcome,
        *,
        exit_code: int | None = None,
        error: str = "",
        output_bytes: int = 0,
    ) -> None:
        """Record how it ended. An entry evicted meanwhile (only when every entry was a
        running one) is not brought back: the tracker never grows past its bound."""
        if outcome is Outcome.RUNNING:
            raise ValueError("finish needs the outcome of an ended execution")
        now = self._clock.timestamp()
        with self._lock:
            tick = self._tick()
            current = self._entries.get(execution_id)
            if current is None:
                return
            self._put(
                replace(
                    current,
                    outcome=outcome,
                    last_accessed=now,
                    ended_at=now,
                    exit_code=exit_code,
                    error=error,
                    output_bytes=output_bytes,
                    ended_tick=tick,
                )
            )

    def _put(self, entry: Entry) -> None:
        self._entries.pop(entry.execution_id, None)
        self._entries[entry.execution_id] = entry
        while len(self._entries) > self.limits.max_entries:
            self._evict_one()

    def _evict_one(self) -> None:
        """The least recently used ended entry; a running one only when all are running."""
        victim = next(
            (k for k, e in self._entries.items() if e.outcome is not Outcome.RUNNING),
            next(iter(self._entries)),
        )
        del self._entries[victim]
        self.evicted += 1

    # ---- reads (each refreshes what it returns) ---------------------------------------

    def get(self, execution_id: str) -> Entry | None:
        now = self._clock.timestamp()
        with self._lock:
            return self._read(execution_id, self._tick(), now)

    def find(self, job_id: str) -> list[Entry]:
        """The executions of a job this worker still tracks, oldest first (a scan: for
        operators and tests, not for a hot path)."""
        now = self._clock.timestamp()
        with self._lock:
            tick = self._tick()
            keys = [k for k, e in self._entries.items() if e.job_id == job_id]
            found = [self._read(k, tick, now) for k in keys]
        return sorted((e for e in found if e is not None), key=lambda e: e.started_at)

    def _read(self, execution_id: str, tick: float, now: float) -> Entry | None:
        entry = self._entries.get(execution_id)
        if entry is None:
            return None
        if self._expired(entry, tick):
            del self._entries[execution_id]
            self.expired += 1
            return None
        entry = replace(entry, last_accessed=now)
        self._entries[execution_id] = entry
        self._entries.move_to_end(execution_id)
        return entry

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def counts(self) -> dict[str, int]:
        """Entries by outcome (a statistic: it refreshes nothing)."""
        with self._lock:
            counts: dict[str, int] = {}
            for entry in self._entries.values():
                counts[entry.outcome.value] = counts.get(entry.outcome.value, 0) + 1
            return counts

    # ---- cleanup ----------------------------------------------------------------------

    def cleanup(self) -> int:
        """Remove every expired entry; how many were removed."""
        with self._lock:
            tick = self._tick()
            gone = [k for k, e in self._entries.items() if self._expired(e, tick)]
            for key in gone:
                del self._entries[key]
            self.expired += len(gone)
        if gone:
            log.debug("tracker: %d expired entries removed, %d kept", len(gone), len(self))
        return len(gone)

    def start_cleanup(self) -> None:
        """Run ``cleanup`` every ``cleanup_interval`` seconds in a daemon thread."""
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="tracker-cleanup", daemon=True)
        self._thread.start()

    def stop_cleanup(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.wait(self.limits.cleanup_interval):
            try:
                self.cleanup()
            except Exception:
                log.exception("tracker cleanup failed; trying again next time")
