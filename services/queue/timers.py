"""Lease and worker timeouts timed on this replica's monotonic clock.

The store keeps wall-clock deadlines: replicas share them and users read them. But a wall
clock that steps forward (an NTP correction, a VM resumed from a pause) would make every
lease look expired and every worker silent at once, and each running job would be handed
to a second worker while the first still runs it. So the reaper ends a lease or takes a
worker for silent only when the wall clock says so AND this replica has timed it out on
its monotonic clock: from the grant, heartbeat or sighting it wrote itself, or, for what
it never wrote (another replica's lease, one from before a restart), from the moment it
first found it past its wall-clock time. A step can delay an expiry by one timeout; it
cannot hasten one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable


class Timers:
    """One timer per id, each for the store value it was started for (a lease's deadline,
    a worker's last_seen): when the store holds another value, the timer is another."""

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._ends: dict[str, tuple[Hashable, float]] = {}  # id -> (stamp, ends at)

    def start(self, key: str, stamp: Hashable, seconds: float) -> None:
        """This replica wrote ``stamp`` for ``key``: its timeout runs from now."""
        with self._lock:
            self._ends[key] = (stamp, self._monotonic() + seconds)

    def ran_out(self, key: str, stamp: Hashable, seconds: float) -> bool:
        """The wall clock says ``key`` (at ``stamp``) timed out: whether it has here too.
        A timer not started for this stamp starts now, and has not run out."""
        now = self._monotonic()
        with self._lock:
            timer = self._ends.get(key)
            if timer is None or timer[0] != stamp:
                self._ends[key] = (stamp, now + seconds)
                return False
            return now >= timer[1]

    def forget(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                self._ends.pop(key, None)

    def prune(self, grace: float) -> None:
        """Drop timers that ran out more than ``grace`` seconds ago (what ended through
        another replica). Only ever delays an expiry: a timer dropped starts again."""
        cutoff = self._monotonic() - grace
        with self._lock:
            for key in [k for k, (_, ends) in self._ends.items() if ends < cutoff]:
                del self._ends[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._ends)
