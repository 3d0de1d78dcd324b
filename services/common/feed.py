"""A change counter with a condition: wakes waiters (watch streams, relays, long polls) when
something changed in this process. Other processes are seen by polling on a timeout."""

from __future__ import annotations

import threading


class ChangeFeed:
    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._version = 0

    def changed(self) -> None:
        with self._condition:
            self._version += 1
            self._condition.notify_all()

    @property
    def version(self) -> int:
        return self._version

    def wait(self, seen: int, timeout: float) -> int:
        """Wait until the version differs from ``seen`` or the timeout passes."""
        with self._condition:
            self._condition.wait_for(lambda: self._version != seen, timeout=timeout)
            return self._version
