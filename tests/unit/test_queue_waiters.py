"""Which long polls an item wakes: only those that may take it, as many as can take the
items, longest waiting first; what a woken poll leaves is handed on."""

from __future__ import annotations

from contextlib import ExitStack

from services.queue.cache import Kind
from services.queue.waiters import Waiter, Waiters

ANY: Kind = ((), ())
VM: Kind = (("vm",), ())
GPU: Kind = ((), (("gpu", "yes"),))


def woken(*waiters: Waiter) -> list[bool]:
    return [w.woken.is_set() for w in waiters]


def test_an_item_wakes_one_poll_that_may_take_it_longest_waiting_first() -> None:
    waiters = Waiters(lambda kind: (kind, 100))
    with ExitStack() as polls:
        first = polls.enter_context(waiters.waiting("process", {}, False))
        second = polls.enter_context(waiters.waiting("process", {}, False))
        vm = polls.enter_context(waiters.waiting("vm", {}, False))
        gpu = polls.enter_context(waiters.waiting("process", {"gpu": "yes"}, False))

        waiters.claimable([VM])
        assert woken(first, second, vm, gpu) == [False, False, True, False]
        waiters.claimable([GPU])
        assert woken(first, second, vm, gpu) == [False, False, True, True]
        waiters.claimable([ANY])
        assert woken(first, second, vm, gpu) == [True, False, True, True]
        waiters.claimable([(("mock",), ())])  # nobody of that type waits
        assert woken(first, second, vm, gpu) == [True, False, True, True]
        assert first.offered == [ANY] and vm.offered == [VM]


def test_each_poll_counts_for_its_max_items() -> None:
    waiters = Waiters(lambda kind: (kind, 100))
    with ExitStack() as polls:
        a = polls.enter_context(waiters.waiting("process", {}, False, max_items=4))
        b = polls.enter_context(waiters.waiting("process", {}, False, max_items=4))
        c = polls.enter_context(waiters.waiting("process", {}, False, max_items=4))
        waiters.claimable([ANY] * 3)
        assert woken(a, b, c) == [True, False, False]
        waiters.claimable([ANY] * 6)  # a is awake already: b and c
        assert woken(a, b, c) == [True, True, True]


def test_a_named_only_poll_is_not_woken_for_items_any_type_may_take() -> None:
    waiters = Waiters(lambda kind: (kind, 100))
    with waiters.waiting("vm", {}, True) as named:
        waiters.claimable([ANY])
        assert not named.woken.is_set()
        waiters.claimable([VM])
        assert named.woken.is_set()


def test_what_a_woken_poll_left_is_handed_on_while_it_can_be_claimed() -> None:
    claimable = {ANY}
    waiters = Waiters(lambda kind: (kind, 1) if kind in claimable else None)
    with ExitStack() as polls:
        first = polls.enter_context(waiters.waiting("process", {}, False))
        second = polls.enter_context(waiters.waiting("process", {}, False))
        third = polls.enter_context(waiters.waiting("process", {}, False))
        waiters.claimable([ANY])
        offered = waiters.attempting(first)  # it claims, and takes something else
        assert offered == [ANY] and woken(first, second, third) == [False, False, False]
        waiters.hand_on(offered, first)  # the item is still there: the next poll is woken
        assert woken(first, second, third) == [False, True, False]
        claimable.clear()
        waiters.hand_on(waiters.attempting(second), second)  # it took it: nobody more woken
        assert woken(first, second, third) == [False, False, False]


def test_a_woken_poll_that_leaves_hands_on_what_it_was_woken_for() -> None:
    waiters = Waiters(lambda kind: (kind, 100))
    with waiters.waiting("process", {}, False) as stays:
        with waiters.waiting("process", {}, False, max_items=2) as goes:
            waiters.claimable([ANY, ANY])  # `stays` (longest waiting) and `goes`
            assert woken(stays, goes) == [True, True]
            waiters.attempting(stays)  # `stays` took one; `goes` leaves without trying
            assert woken(stays, goes) == [False, True]
        assert woken(stays) == [True] and stays.offered == [ANY]
        assert len(waiters) == 1
    assert len(waiters) == 0


def test_a_poll_leaving_several_items_hands_each_on() -> None:
    held = {ANY: 2}  # of the three items it was woken for, the index still holds two
    waiters = Waiters(lambda kind: (kind, held[kind]) if held.get(kind) else None)
    with ExitStack() as polls:
        with waiters.waiting("process", {}, False, max_items=3) as goes:
            others = [polls.enter_context(waiters.waiting("process", {}, False)) for _ in range(3)]
            waiters.claimable([ANY] * 3)  # all three for `goes`, the longest waiting
            assert woken(goes, *others) == [True, False, False, False]
            assert goes.offered == [ANY] * 3
        # It went away without trying: one poll per item still there, no more.
        assert woken(*others) == [True, True, False]


def test_items_two_worker_types_accept_wake_one_poll_each_across_the_types() -> None:
    both: Kind = (("vm", "process"), ())
    waiters = Waiters(lambda kind: (kind, 2))  # both items are still in both types' parts
    with ExitStack() as polls:
        with waiters.waiting("vm", {}, False, max_items=2) as goes:
            others = [
                polls.enter_context(waiters.waiting(t, {}, False))
                for t in ("vm", "process", "vm", "process")
            ]
            waiters.claimable([both] * 2)
            assert woken(goes, *others) == [True, False, False, False, False]
        assert woken(*others) == [True, True, False, False]  # two items: two polls
