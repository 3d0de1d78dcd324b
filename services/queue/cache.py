"""The queue's transactional cache: an in-memory index of live items, so a claim picks its
items in O(log n) without scanning the store.

Claimable items are kept per worker type and, within it, per set of labels they require,
each part sorted best first. A claim merges only the parts the worker's labels satisfy, so
items it cannot take are never walked past: k items cost O(min(p, 2^m) + k log n), for p
label sets among the items and m labels on the worker (p = 1 when no item requires labels).

The store is the source of truth; the cache holds only committed state. A claim is a
transaction across both:

1. ``stage_claim`` takes the best items out of the available index at once (no other
   claimer can see them) and remembers exactly what it took;
2. the caller writes the store in one transaction with a conditional update;
3. ``commit`` records the committed result, or ``rollback`` puts every staged entry back
   where it was: unless a newer version was committed meanwhile, which a rollback never
   overwrites. After a conflict or a failed write the caller ``refresh``es the item
   from the store.

Readers of the queue read the store, so nobody ever sees a staged claim. ``view()`` is
the committed state, which the tests compare with the store after every operation.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from sortedcontainers import SortedList

from services.queue.domain import Item, ItemState

ENDED_MEMORY = 65_536
ANY = ""  # the index of items that name no worker type
Key = tuple[int, int, str]  # (-priority, seq, job_id): highest priority, then FIFO
LabelSet = tuple[tuple[str, str], ...]  # the labels an item requires, sorted
# What decides who may claim an item: the worker types it accepts (empty = any) and the
# labels it requires.
Kind = tuple[tuple[str, ...], LabelSet]


def satisfies(required: LabelSet, labels: dict[str, str]) -> bool:
    """Whether a worker with ``labels`` carries every label of ``required``."""
    return all(labels.get(k) == v for k, v in required)


@dataclass(frozen=True, slots=True)
class Entry:
    """What the cache knows of one live item, as last committed."""

    job_id: str
    version: int
    state: ItemState
    priority: int
    seq: int
    run_at: float
    worker_types: tuple[str, ...]
    labels: LabelSet

    @property
    def key(self) -> Key:
        return (-self.priority, self.seq, self.job_id)

    @property
    def kind(self) -> Kind:
        return (self.worker_types, self.labels)

    @classmethod
    def of(cls, item: Item) -> Entry:
        return cls(
            item.job_id,
            item.version,
            item.state,
            item.priority,
            item.seq,
            item.run_at.timestamp(),
            tuple(item.worker_types),
            tuple(sorted(item.labels.items())),
        )


def _satisfied(parts: dict[LabelSet, SortedList], labels: dict[str, str]) -> Iterator[SortedList]:
    """The parts whose required labels a worker with ``labels`` carries: looked up by each
    subset of its labels when it has fewer subsets than there are parts, else checked."""
    if len(labels) < 16 and 1 << len(labels) < len(parts):
        carried = sorted(labels.items())
        for size in range(len(carried) + 1):
            for required in itertools.combinations(carried, size):
                if (keys := parts.get(required)) is not None:
                    yield keys
    else:
        for required, keys in parts.items():
            if satisfies(required, labels):
                yield keys


class ItemCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}  # every live item, committed state
        # worker type -> required labels -> keys of claimable items (no empty parts)
        self._ready: dict[str, dict[LabelSet, SortedList]] = {}
        # Items whose run_at is still to come: a heap of (run_at, job_id, version), and the
        # one current heap entry of each item (its run_at and version). Entries of items
        # that changed or ended since are stale: skipped when they come up, and dropped all
        # at once when they outnumber the current ones (the heap stays proportional to the
        # live delayed items, however often the same item is indexed again).
        self._delayed: list[tuple[float, str, int]] = []
        self._queued: dict[str, tuple[float, int]] = {}
        self._staged: dict[str, Entry] = {}  # taken by claims in flight
        self._now = 0.0  # the latest time seen (claims, enqueues): it never goes back
        # The versions at which recent items ended, so a write applied late (a thread
        # that committed earlier but applies after) cannot bring an ended item back.
        self._ended: OrderedDict[str, int] = OrderedDict()

    # ---- loading and committed changes ------------------------------------------------

    def load(self, items: Iterable[Item]) -> None:
        for item in items:
            self.apply(item)

    def load_entries(self, entries: Iterable[Entry], now: float) -> None:
        """Fill an empty cache at start-up (items due by ``now`` go straight to the index)."""
        with self._lock:
            self._now = max(self._now, now)
            for entry in entries:
                self._unindex(self._entries.get(entry.job_id))
                self._entries[entry.job_id] = entry
                self._unqueue(entry.job_id, entry)
                self._index(entry)

    def apply(self, item: Item) -> None:
        """Record a committed item (a live one is indexed, an ended one forgotten). An
        older version than the cache already has is ignored."""
        with self._lock:
            current = self._entries.get(item.job_id)
            if current is not None and current.version > item.version:
                return
            if self._ended.get(item.job_id, -1) >= item.version:
                return  # a late write of an item that has ended since
            self._unindex(current)
            if item.state.live:
                entry = Entry.of(item)
                self._entries[item.job_id] = entry
                self._unqueue(item.job_id, entry)
                if item.job_id not in self._staged:
                    self._index(entry)
            else:
                self._entries.pop(item.job_id, None)
                self._unqueue(item.job_id, None)
                self._ended[item.job_id] = item.version
                self._ended.move_to_end(item.job_id)
                if len(self._ended) > ENDED_MEMORY:
                    self._ended.popitem(last=False)

    def ids(self) -> set[str]:
        with self._lock:
            return set(self._entries)

    def version(self, job_id: str) -> int | None:
        """The committed version the cache holds of ``job_id`` (None: none)."""
        with self._lock:
            entry = self._entries.get(job_id)
            return None if entry is None else entry.version

    def forget(self, job_id: str, seen: int | None) -> None:
        """The store had no such item when read; ``seen`` is the version the cache held
        before that read (None: none). An entry committed after the read stands: the
        store read before its write."""
        with self._lock:
            entry = self._entries.get(job_id)
            if entry is None or seen is None or entry.version > seen:
                return
            del self._entries[job_id]
            self._unindex(entry)
            self._unqueue(job_id, None)

    # ---- the claim transaction --------------------------------------------------------

    def stage_claim(
        self,
        worker_type: str,
        labels: dict[str, str],
        max_items: int,
        now: float,
        named_only: bool = False,
    ) -> list[Entry]:
        """Take up to ``max_items`` claimable entries, best first, out of the index."""
        with self._lock:
            self._promote(now)
            taken: list[Entry] = []
            for key in self._candidates(worker_type, labels, named_only):
                taken.append(self._entries[key[2]])
                if len(taken) == max_items:
                    break
            for entry in taken:
                self._unindex(entry)
                self._staged[entry.job_id] = entry
            return taken

    def commit(self, staged: Entry, item: Item) -> None:
        """The store committed the claim of ``staged``; ``item`` is what it wrote."""
        with self._lock:
            self._staged.pop(staged.job_id, None)
        self.apply(item)

    def rollback(self, staged: Entry) -> None:
        """Put ``staged`` back exactly where it was, unless a newer version was committed
        meanwhile (then that one stands, already indexed by ``apply``)."""
        with self._lock:
            self._staged.pop(staged.job_id, None)
            current = self._entries.get(staged.job_id)
            if current is not None:  # ``staged`` itself, or a newer committed version
                self._index(current)

    # ---- what readers and tests see ---------------------------------------------------

    def view(self) -> dict[str, tuple[ItemState, int]]:
        """The committed state of every live item: (state, version) by job id."""
        with self._lock:
            return {job_id: (e.state, e.version) for job_id, e in self._entries.items()}

    def claimable(self) -> set[str]:
        """The job ids a claim can reach now or once their run_at comes: those in the
        index and the current entries in the delayed heap."""
        with self._lock:
            ready = {key[2] for keys in self._parts() for key in keys}
            return ready | set(self._queued)

    def ready_kind(self, kind: Kind, now: float) -> tuple[Kind, int] | None:
        """Whether the index parts an item of ``kind`` goes in (one per worker type it
        accepts, or the any-type part) hold items claimable by ``now``: ``kind`` narrowed
        to the worker types whose parts hold some (the workers that can take from where
        they are), and how many the fullest of those parts holds; None when none does.
        Items due by ``now`` count (a release or redrive sets run_at to its own now, later
        than any time the index has seen: they wait in the delayed heap until promoted)."""
        worker_types, labels = kind
        with self._lock:
            self._promote(now)
            held = {
                t: len(keys)
                for t in worker_types or (ANY,)
                if (keys := self._ready.get(t, {}).get(labels))
            }
        if not held:
            return None
        return (tuple(t for t in held if t != ANY), labels), max(held.values())

    def ready_count(self) -> int:
        with self._lock:
            return sum(len(keys) for keys in self._parts())

    def advance(self, now: float) -> None:
        """The clock read ``now``: items due by then are claimable from now on (the cache
        keeps the latest time it saw, so a clock stepped back delays no item)."""
        with self._lock:
            self._promote(now)

    def max_seq(self) -> int:
        """The highest enqueue number of a live item (0 when none)."""
        with self._lock:
            return max((entry.seq for entry in self._entries.values()), default=0)

    def delayed_size(self) -> int:
        """Entries in the delayed heap, stale ones included (what it costs in memory)."""
        with self._lock:
            return len(self._delayed)

    def staged_count(self) -> int:
        with self._lock:
            return len(self._staged)

    def __len__(self) -> int:
        return len(self._entries)

    # ---- inside the lock --------------------------------------------------------------

    def _parts(self) -> Iterator[SortedList]:
        for parts in self._ready.values():
            yield from parts.values()

    def _candidates(
        self, worker_type: str, labels: dict[str, str], named_only: bool
    ) -> Iterator[Key]:
        """The keys a worker may claim, best first: the parts of its type (and of any type)
        whose required labels it carries, merged."""
        types = (worker_type,) if named_only or worker_type == ANY else (worker_type, ANY)
        lists = [keys for t in types for keys in _satisfied(self._ready.get(t, {}), labels)]
        if len(lists) == 1:
            return iter(lists[0])
        return heapq.merge(*lists)

    def _index(self, entry: Entry) -> None:
        if entry.state is not ItemState.WAITING:
            return
        if entry.run_at > self._now:
            mark = (entry.run_at, entry.version)
            if self._queued.get(entry.job_id) != mark:  # else it is in the heap already
                self._queued[entry.job_id] = mark
                heapq.heappush(self._delayed, (entry.run_at, entry.job_id, entry.version))
                self._compact()
            return
        self._make_ready(entry)

    def _unqueue(self, job_id: str, entry: Entry | None) -> None:
        """``job_id``'s committed entry is now ``entry`` (None: gone): a heap entry for
        another version or run_at is stale from now on."""
        mark = self._queued.get(job_id)
        if mark is None:
            return
        if (
            entry is None
            or entry.state is not ItemState.WAITING
            or mark != (entry.run_at, entry.version)
        ):
            del self._queued[job_id]
            self._compact()

    def _compact(self) -> None:
        """Rebuild the heap from the current entries once stale ones outnumber them (so
        each rebuild is paid for by as many changes as the heap holds)."""
        if len(self._delayed) > 2 * len(self._queued) + 64:
            self._delayed = [(r, job_id, v) for job_id, (r, v) in self._queued.items()]
            heapq.heapify(self._delayed)

    def _make_ready(self, entry: Entry) -> None:
        for worker_type in entry.worker_types or (ANY,):
            parts = self._ready.setdefault(worker_type, {})
            keys = parts.get(entry.labels)
            if keys is None:
                keys = parts[entry.labels] = SortedList()
            if entry.key not in keys:
                keys.add(entry.key)

    def _unindex(self, entry: Entry | None) -> None:
        if entry is None or entry.state is not ItemState.WAITING:
            return
        for worker_type in entry.worker_types or (ANY,):
            parts = self._ready.get(worker_type)
            keys = parts.get(entry.labels) if parts is not None else None
            if keys is not None:
                keys.discard(entry.key)  # a delayed entry is not there: no-op
                if not keys:
                    del parts[entry.labels]  # type: ignore[union-attr]
                    if not parts:
                        del self._ready[worker_type]
        # A delayed entry stays in the heap; _promote skips it as stale.

    def _promote(self, now: float) -> None:
        """Move entries whose run_at has come from the delayed heap to the index. Items
        due by the last claim's time go straight to the index; later ones wait here."""
        self._now = max(self._now, now)
        while self._delayed and self._delayed[0][0] <= self._now:
            run_at, job_id, version = heapq.heappop(self._delayed)
            if self._queued.get(job_id) != (run_at, version):
                continue  # stale: the item changed or ended since
            del self._queued[job_id]
            entry = self._entries.get(job_id)
            if entry is not None and job_id not in self._staged:
                self._make_ready(entry)
