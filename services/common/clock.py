"""Time that never crashes and never goes backwards.

Wall-clock readings are for timestamps users read and for deadlines shared through the
database; durations and local timers use the monotonic clock. A wall clock that reads
before the epoch or past the year 9999, is not a number, cannot be read, or steps
backwards logs a warning (once per step) and time goes on from the last good reading at
half the monotonic clock's rate, until the wall clock catches up: never backwards, and
never still (a clock held still for the length of a step would stop every lease, retry
backoff and redelivery that long).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

log = logging.getLogger(__name__)
_GOING_ON = "time goes on from the last good reading at half speed"


# The last second datetime can hold (9999-12-31T23:59:59Z).
MAX_TIMESTAMP = 253402300799.0
# While the wall clock is behind or unusable, time goes on at this part of the monotonic
# clock's rate: a wall clock stepped back by S seconds is caught up with in S / (1 - SLEW).
SLEW = 0.5


class Clock:
    def __init__(
        self, wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._last = 0.0  # the last time given
        self._last_mono = monotonic()  # the monotonic clock's reading then
        self._warned = False
        self._lock = threading.Lock()

    def timestamp(self) -> float:
        """Seconds since the epoch: never negative, never below an earlier reading.

        Both clocks are read inside the lock: read before it, a thread that took the lock
        later could bring an earlier reading than the last one given, and a well-behaved
        clock would look as if it had stepped backwards."""
        with self._lock:
            mono = self._monotonic()
            try:
                reading = float(self._wall())
            except (OSError, OverflowError, ValueError) as exc:
                self._warn_once(f"the wall clock could not be read ({exc}); {_GOING_ON}")
                return self._go_on(mono)
            if not math.isfinite(reading) or not 0 <= reading <= MAX_TIMESTAMP:
                self._warn_once(
                    f"the wall clock reads {reading!r}, before the epoch, past the year "
                    f"9999 or not a time; {_GOING_ON}"
                )
                return self._go_on(mono)
            held = self._held(mono)
            if reading < held:
                self._warn_once(
                    f"the wall clock stepped backwards by {held - reading:.3f}s; {_GOING_ON} "
                    f"until it catches up"
                )
                return self._go_on(mono)
            self._warned = False
            self._last = reading
            self._mark(mono)
            return reading

    def _held(self, mono: float) -> float:
        elapsed = mono - self._last_mono
        return self._last + (elapsed * SLEW if math.isfinite(elapsed) and elapsed > 0 else 0.0)

    def _go_on(self, mono: float) -> float:
        self._last = self._held(mono)
        self._mark(mono)
        return self._last

    def _mark(self, mono: float) -> None:
        # An injected monotonic clock may read anything; the mark never goes backwards.
        if math.isfinite(mono) and not mono < self._last_mono:
            self._last_mono = mono

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp(), tz=UTC)

    def monotonic(self) -> float:
        return self._monotonic()

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning(message)


def to_utc(value: datetime) -> datetime:
    """Datetimes read back from SQLite come without a zone; they were stored as UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


SYSTEM_CLOCK = Clock()
