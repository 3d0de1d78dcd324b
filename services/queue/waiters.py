"""Long polls waiting for work, and which of them to wake when items become claimable.

Items that become claimable wake only as many waiting polls as can take them, longest
waiting first: a poll is woken only if its worker type is accepted and it carries the
labels the items require, and each woken poll counts for up to its ``max_items``. An idle
fleet is not woken whole by every enqueue (with a hundred polls that cost each enqueue
10 ms of the service's CPU, and all but one found nothing).

A woken poll that leaves items it was woken for unclaimed (it took others, or went away)
hands them on: as many of them as the index still holds wake the next polls that may take
them. So no item waits while a poll that could take it sleeps. What no local change
announces (another replica's enqueue, a delayed item whose time comes) the polls find by
looking again now and then.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from services.queue.cache import Kind, satisfies
from services.queue.domain import Item


def kind_of(item: Item) -> Kind:
    return tuple(item.worker_types), tuple(sorted(item.labels.items()))


@dataclass(eq=False)
class Waiter:
    worker_type: str
    labels: dict[str, str]
    named_only: bool  # only items that name its worker type
    max_items: int
    woken: threading.Event = field(default_factory=threading.Event)
    # What it was woken for and has not yet tried: an entry per item it was counted for.
    offered: list[Kind] = field(default_factory=list)
    asleep: bool = False  # in ``wait``

    def may_take(self, kind: Kind) -> bool:
        worker_types, required = kind
        if worker_types:
            if self.worker_type not in worker_types:
                return False
        elif self.named_only:
            return False
        return satisfies(required, self.labels)

    def wait(self, timeout: float) -> None:
        self.asleep = True
        try:
            self.woken.wait(timeout)
        finally:
            self.asleep = False


class Waiters:
    def __init__(self, ready_kind: Callable[[Kind], tuple[Kind, int] | None]) -> None:
        """``ready_kind(kind)``: whether the index still holds claimable items of that
        kind, as a narrower kind, and how many (ItemCache.ready_kind): what a woken poll
        left is handed only to polls that can take from where it is, and to no more of
        them than there are items. An item that two worker types accept,
        handed on because another item of that kind waits in the other type's part,
        must not wake polls of the first type, which would find nothing and hand it on
        to each other for as long as that item waits."""
        self._lock = threading.Lock()
        self._waiting: dict[Waiter, None] = {}  # an ordered set: longest waiting first
        self._ready_kind = ready_kind

    @contextmanager
    def waiting(
        self, worker_type: str, labels: dict[str, str], named_only: bool, max_items: int = 1
    ) -> Iterator[Waiter]:
        """Register a poll for the ``with`` block: across its claim attempts and waits,
        so nothing announced between an attempt and the wait is missed. Before each
        attempt the poll calls ``attempting``; after it, ``hand_on`` with what that
        returned. On leaving, what it was woken for since is handed on."""
        waiter = Waiter(worker_type, labels, named_only, max(1, max_items))
        with self._lock:
            self._waiting[waiter] = None
        try:
            yield waiter
        finally:
            with self._lock:
                self._waiting.pop(waiter, None)
                left, waiter.offered = waiter.offered, []
            self.hand_on(left, waiter)

    def attempting(self, waiter: Waiter) -> list[Kind]:
        """The poll is about to claim: what it was woken for (it is awake again)."""
        with self._lock:
            offered, waiter.offered = waiter.offered, []
            waiter.woken.clear()
            return offered

    def hand_on(self, offered: list[Kind], by: Waiter) -> None:
        """``by`` tried (or left) what it was woken for (an entry per item): wake others
        for what is left."""
        left: list[Kind] = []
        for kind, count in Counter(offered).items():
            ready = self._ready_kind(kind)
            if ready is not None:
                left.extend([ready[0]] * min(count, ready[1]))
        if left:
            self.claimable(left, but=by)

    def claimable(self, kinds: Iterable[Kind], but: Waiter | None = None) -> None:
        """Items of these kinds (one entry per item) became claimable: wake polls that may
        take them (``but`` that one), longest waiting first, each counting for up to its
        max_items."""
        counts = Counter(kinds)
        if not counts:
            return
        with self._lock:
            for kind, count in counts.items():
                for waiter in self._waiting:
                    if count <= 0:
                        break
                    if waiter is but or waiter.woken.is_set() or not waiter.may_take(kind):
                        continue
                    waiter.offered.extend([kind] * min(count, waiter.max_items))
                    waiter.woken.set()
                    count -= waiter.max_items

    def wake_all(self) -> None:
        with self._lock:
            for waiter in self._waiting:
                waiter.woken.set()

    def asleep(self) -> int:
        """How many polls are waiting between attempts."""
        with self._lock:
            return sum(waiter.asleep for waiter in self._waiting)

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting)
