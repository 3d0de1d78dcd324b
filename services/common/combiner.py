"""Group commit: requests that arrive while a batch is being written share the next one.

A store writer pays a fixed cost per transaction (begin, commit, session set-up) that is
larger than what one item adds to it. Callers ``submit`` their request and block; one of
them, the leader, takes every request waiting (up to ``max_batch``) and runs them through
``run_batch`` in one go, then hands each caller its own result and passes the lead to the
oldest caller still waiting. With one caller at a time a batch is that one request:
nothing waits on a timer, so an idle service answers as fast as before.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Request = TypeVar("Request")
Result = TypeVar("Result")


class _Slot(Generic[Request, Result]):
    __slots__ = ("error", "finished", "request", "result", "wake")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.result: Result | None = None
        self.error: BaseException | None = None
        self.finished = False
        self.wake = threading.Event()  # set when finished, or when it is to lead

    def outcome(self) -> Result:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


class Combiner(Generic[Request, Result]):
    def __init__(
        self,
        run_batch: Callable[[list[Request]], Sequence[Result]],
        max_batch: int = 64,
    ) -> None:
        """``run_batch`` gets the requests of a batch and returns one result for each, in
        order; if it raises, every request of that batch raises the same exception. So a
        request that fails on its own (a stale token, a value the store refuses) must come
        back as its own result (an error object), never raised: one bad request must not
        cost the others sharing its batch their work; raise only for what fails them all."""
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._waiting: deque[_Slot[Request, Result]] = deque()
        self._leading = False

    def submit(self, request: Request) -> Result:
        slot: _Slot[Request, Result] = _Slot(request)
        with self._lock:
            self._waiting.append(slot)
            lead = not self._leading
            self._leading = True
        if not lead:
            slot.wake.wait()
            if slot.finished:
                return slot.outcome()
        # This caller leads: its slot is the oldest waiting, so the batch includes it.
        self._lead()
        return slot.outcome()

    def _lead(self) -> None:
        with self._lock:
            batch = [
                self._waiting.popleft() for _ in range(min(self._max_batch, len(self._waiting)))
            ]
        try:
            results = self._run_batch([slot.request for slot in batch])
            if len(results) != len(batch):
                raise AssertionError(f"{len(results)} results for a batch of {len(batch)}")
            for slot, result in zip(batch, results, strict=True):
                slot.result = result
        except BaseException as exc:  # every caller of the batch gets it, not only the leader
            for slot in batch:
                slot.error = exc
        finally:
            with self._lock:
                following = self._waiting[0] if self._waiting else None
                self._leading = following is not None
            for slot in batch:
                slot.finished = True
                slot.wake.set()
            if following is not None:
                following.wake.set()  # not finished: it leads the next batch
