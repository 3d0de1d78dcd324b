"""Time that never crashes and never goes backwards.

Wall-clock readings are for timestamps users read and for deadlines shared through the
database; durations and local timers use the monotonic clock. A wall clock that reads
before the epoch, is not a number, or steps backwards logs a warning (once per step) and
yields the last good reading instead.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

log = logging.getLogger(__name__)


class Clock:
    def __init__(
        self, wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._last = 0.0
        self._warned = False
        self._lock = threading.Lock()

    def timestamp(self) -> float:
        """Seconds since the epoch: never negative, never below an earlier reading."""
        try:
            reading = float(self._wall())
        except (OSError, OverflowError, ValueError) as exc:
            with self._lock:
                self._warn_once(
                    f"the wall clock could not be read ({exc}); using the last good time"
                )
                return self._last
        with self._lock:
            if not math.isfinite(reading) or reading < 0:
                self._warn_once(
                    f"the wall clock reads {reading!r}, before the epoch or not a "
                    f"time; using the last good time"
                )
                return self._last
            if reading < self._last:
                self._warn_once(
                    f"the wall clock stepped backwards by "
                    f"{self._last - reading:.3f}s; holding the last good time"
                )
                return self._last
            self._warned = False
            self._last = reading
            return reading

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
