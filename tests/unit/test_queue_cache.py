"""The queue cache on its own: staging, exact rollback, commits and the delayed heap."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from services.queue.cache import ItemCache
from services.queue.domain import Item, ItemState

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def item(
    job_id: str,
    priority: int = 0,
    seq: int = 0,
    version: int = 1,
    state: ItemState = ItemState.WAITING,
    run_at: datetime = T0,
    worker_types: tuple[str, ...] = (),
    labels: dict[str, str] | None = None,
) -> Item:
    return Item(
        job_id=job_id,
        generation=1,
        spec=b"",
        state=state,
        priority=priority,
        run_at=run_at,
        seq=seq,
        max_attempts=3,
        created_at=T0,
        updated_at=T0,
        worker_types=worker_types,
        labels=labels or {},
        version=version,
    )


NOW = T0.timestamp() + 1


def claim_ids(
    cache: ItemCache, n: int, worker_type: str = "process", labels: dict[str, str] | None = None
) -> list[str]:
    return [e.job_id for e in cache.stage_claim(worker_type, labels or {}, n, NOW)]


def test_claims_take_highest_priority_then_fifo_and_hide_what_they_took() -> None:
    cache = ItemCache()
    cache.load([item("low", 0, 1), item("high", 5, 3), item("low-2", 0, 2)])
    assert claim_ids(cache, 2) == ["high", "low"]
    assert claim_ids(cache, 5) == ["low-2"]  # the first claim's items are not visible
    assert claim_ids(cache, 5) == []


def test_rollback_puts_back_exactly_what_was_taken() -> None:
    cache = ItemCache()
    cache.load([item("a", seq=1), item("b", seq=2), item("c", seq=3)])
    before = (cache.view(), cache.claimable())
    staged = cache.stage_claim("process", {}, 2, NOW)
    assert cache.claimable() == {"c"}
    for entry in staged:
        cache.rollback(entry)
    assert (cache.view(), cache.claimable()) == before
    assert claim_ids(cache, 3) == ["a", "b", "c"]


def test_a_rollback_never_restores_over_a_newer_committed_version() -> None:
    cache = ItemCache()
    cache.load([item("a", version=1)])
    [staged] = cache.stage_claim("process", {}, 1, NOW)
    # meanwhile another operation committed version 2 (say, a cancel request on a lease)
    cache.apply(item("a", version=2, state=ItemState.LEASED))
    cache.rollback(staged)
    assert cache.view() == {"a": (ItemState.LEASED, 2)}
    assert cache.claimable() == set()


def test_commit_records_the_lease_and_an_ended_item_is_forgotten() -> None:
    cache = ItemCache()
    cache.load([item("a")])
    [staged] = cache.stage_claim("process", {}, 1, NOW)
    cache.commit(staged, item("a", version=2, state=ItemState.LEASED))
    assert cache.view() == {"a": (ItemState.LEASED, 2)}
    cache.apply(item("a", version=3, state=ItemState.SUCCEEDED))
    assert cache.view() == {}
    cache.apply(item("a", version=2, state=ItemState.LEASED))  # a write applied late
    assert cache.view() == {}  # an ended item does not come back...
    cache.apply(item("a", version=4))  # ...unless it is newer: a new generation
    assert cache.view() == {"a": (ItemState.WAITING, 4)}


def test_older_versions_never_overwrite_newer_ones() -> None:
    cache = ItemCache()
    cache.apply(item("a", version=5, state=ItemState.LEASED))
    cache.apply(item("a", version=4))
    assert cache.view() == {"a": (ItemState.LEASED, 5)}


def test_worker_types_and_labels() -> None:
    cache = ItemCache()
    cache.load(
        [
            item("vm", seq=1, worker_types=("vm",)),
            item("any", seq=2),
            item("gpu", seq=3, labels={"gpu": "yes"}),
        ]
    )
    assert claim_ids(cache, 5, "process") == ["any"]
    assert claim_ids(cache, 5, "vm", {"gpu": "yes"}) == ["vm", "gpu"]


def test_a_worker_takes_from_every_label_set_it_carries_in_one_order() -> None:
    cache = ItemCache()
    cache.load(
        [
            item("gpu-1", priority=1, seq=1, labels={"gpu": "yes"}),
            item("plain-2", priority=1, seq=2),
            item("both-3", priority=1, seq=3, labels={"gpu": "yes", "zone": "a"}),
            item("zone-b-4", priority=9, seq=4, labels={"zone": "b"}),
            item("zone-a-5", priority=1, seq=5, labels={"zone": "a"}),
            item("urgent-6", priority=5, seq=6, labels={"zone": "a"}),
            item("plain-7", priority=0, seq=7),
        ]
    )
    labels = {"gpu": "yes", "zone": "a", "extra": "1"}
    assert claim_ids(cache, 4, labels=labels) == ["urgent-6", "gpu-1", "plain-2", "both-3"]
    assert claim_ids(cache, 9, labels={}) == ["plain-7"]
    assert claim_ids(cache, 9, labels={"zone": "b"}) == ["zone-b-4"]
    assert cache.claimable() == {"zone-a-5"}


def test_a_worker_with_few_labels_among_many_label_sets_takes_what_it_carries() -> None:
    # More label sets than subsets of the worker's labels: the parts are looked up by subset.
    cache = ItemCache()
    cache.load([item(f"zone-{n}", seq=n, labels={"zone": str(n)}) for n in range(20)])
    cache.load(
        [
            item("gpu-zone-3", seq=30, labels={"gpu": "yes", "zone": "3"}),
            item("gpu", seq=31, labels={"gpu": "yes"}),
            item("gpu-no", seq=32, labels={"gpu": "no"}),
            item("plain", seq=33),
        ]
    )
    labels = {"gpu": "yes", "zone": "3"}
    assert claim_ids(cache, 9, labels=labels) == ["zone-3", "gpu-zone-3", "gpu", "plain"]
    assert claim_ids(cache, 9, labels={"gpu": "no"}) == ["gpu-no"]
    assert len(cache.claimable()) == 19


def test_items_a_worker_cannot_take_stay_for_one_that_can() -> None:
    cache = ItemCache()
    cache.load([item(f"gpu-{n}", priority=5, seq=n, labels={"gpu": "yes"}) for n in range(100)])
    cache.load([item("plain", seq=1000)])
    staged = cache.stage_claim("process", {}, 1, NOW)
    assert [e.job_id for e in staged] == ["plain"]
    cache.rollback(staged[0])
    assert claim_ids(cache, 2, labels={"gpu": "yes"}) == ["gpu-0", "gpu-1"]
    assert claim_ids(cache, 200, labels={}) == ["plain"]
    assert len(cache.claimable()) == 98 and cache.ready_count() == 98
    assert claim_ids(cache, 200, labels={"gpu": "yes"})[-1] == "gpu-99"
    assert cache.claimable() == set() and cache.ready_count() == 0


def test_items_wait_for_their_run_at() -> None:
    cache = ItemCache()
    later = T0 + timedelta(hours=1)
    cache.stage_claim("process", {}, 1, NOW)  # the cache has seen time NOW
    cache.load([item("later", run_at=later), item("now")])
    assert claim_ids(cache, 5) == ["now"]
    assert cache.claimable() == {"later"}
    assert [e.job_id for e in cache.stage_claim("process", {}, 5, later.timestamp())] == ["later"]


def test_a_stale_delayed_entry_is_skipped() -> None:
    cache = ItemCache()
    later = T0 + timedelta(hours=1)
    cache.stage_claim("process", {}, 1, NOW)
    cache.load([item("x", run_at=later)])
    cache.apply(replace(item("x", version=2), state=ItemState.LEASED))
    assert cache.stage_claim("process", {}, 5, later.timestamp()) == []


def test_named_only_claims_skip_items_that_accept_any_worker() -> None:
    cache = ItemCache()
    cache.load([item("plain", seq=1), item("vm-job", seq=2, worker_types=("vm",))])
    staged = cache.stage_claim("vm", {}, 5, NOW, named_only=True)
    assert [e.job_id for e in staged] == ["vm-job"]
    assert claim_ids(cache, 5) == ["plain"]


def test_ready_kind_says_which_parts_hold_claimable_items_of_a_kind() -> None:
    cache = ItemCache()
    cache.stage_claim("process", {}, 1, NOW)  # the cache has seen time NOW
    gpu = (("gpu", "yes"),)
    cache.load(
        [
            item("vm-gpu", seq=1, worker_types=("vm",), labels={"gpu": "yes"}),
            item("any", seq=2),
            item("later", seq=3, worker_types=("process",), run_at=T0 + timedelta(hours=1)),
        ]
    )
    assert cache.ready_kind((("vm", "process"), gpu), NOW) == ((("vm",), gpu), 1)
    assert cache.ready_kind(((), ()), NOW) == (((), ()), 1)
    assert cache.ready_kind((("process",), ()), NOW) is None
    later = (T0 + timedelta(hours=2)).timestamp()  # due by then: counted, and promoted
    assert cache.ready_kind((("process",), ()), later) == ((("process",), ()), 1)
    assert claim_ids(cache, 5, "vm", {"gpu": "yes"}) == ["vm-gpu", "any"]
    assert cache.ready_kind((("vm", "process"), gpu), NOW) is None
    zone = (("zone", "a"),)
    both = [
        item(f"both-{n}", seq=10 + n, worker_types=("vm", "process"), labels=dict(zone))
        for n in (1, 2)
    ]
    cache.load(both)
    # In both types' parts: either type's workers can take them; two items, not four.
    assert cache.ready_kind((("vm", "process"), zone), NOW) == ((("vm", "process"), zone), 2)


def test_the_delayed_heap_holds_one_entry_per_delayed_item_however_it_churns() -> None:
    cache = ItemCache()
    cache.stage_claim("process", {}, 1, NOW)  # the cache has seen time NOW
    later = T0 + timedelta(hours=1)
    for _ in range(100):  # the same committed items again and again (reconciles)
        cache.load([item(f"d-{i}", seq=i, run_at=later) for i in range(5)])
    assert cache.delayed_size() == 5
    for version in range(2, 400):  # one item changes while it waits (each a new entry)
        cache.apply(item("d-0", seq=0, run_at=later + timedelta(seconds=version), version=version))
    for i in range(1, 5):  # the others end before their time
        cache.apply(item(f"d-{i}", version=2, state=ItemState.CANCELLED))
    assert cache.delayed_size() <= 2 * 1 + 64
    assert cache.claimable() == {"d-0"}
    assert claim_ids(cache, 5) == []
    far = (later + timedelta(hours=1)).timestamp()
    assert [e.job_id for e in cache.stage_claim("process", {}, 5, far)] == ["d-0"]
