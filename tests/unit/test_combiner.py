"""services.common.combiner: concurrent requests share batches; each gets its own result."""

from __future__ import annotations

import threading
import time

import pytest

from services.common.combiner import Combiner


def test_a_lone_request_is_a_batch_of_one() -> None:
    batches: list[list[int]] = []

    def run(requests: list[int]) -> list[int]:
        batches.append(list(requests))
        return [r * 2 for r in requests]

    combiner = Combiner(run)
    assert [combiner.submit(n) for n in range(3)] == [0, 2, 4]
    assert batches == [[0], [1], [2]]


def test_requests_arriving_during_a_batch_share_the_next_and_get_their_own_results() -> None:
    batches: list[list[int]] = []
    first_running = threading.Event()
    release_first = threading.Event()

    def run(requests: list[int]) -> list[int]:
        batches.append(list(requests))
        if requests == [0]:
            first_running.set()
            release_first.wait(10)
        return [r * 10 for r in requests]

    combiner = Combiner(run, max_batch=64)
    results: dict[int, int] = {}

    def call(n: int) -> None:
        results[n] = combiner.submit(n)

    first = threading.Thread(target=call, args=(0,))
    first.start()
    assert first_running.wait(10)
    others = [threading.Thread(target=call, args=(n,)) for n in range(1, 9)]
    for thread in others:
        thread.start()
    deadline = time.monotonic() + 10
    while len(combiner._waiting) < 8 and time.monotonic() < deadline:  # all queued behind
        time.sleep(0.01)
    release_first.set()
    for thread in [first, *others]:
        thread.join(10)

    assert results == {n: n * 10 for n in range(9)}
    assert batches[0] == [0] and sorted(batches[1]) == list(range(1, 9)) and len(batches) == 2


def test_max_batch_bounds_a_batch() -> None:
    gate = threading.Event()
    sizes: list[int] = []

    def run(requests: list[int]) -> list[int]:
        sizes.append(len(requests))
        gate.wait(10)
        return requests

    combiner = Combiner(run, max_batch=3)
    threads = [threading.Thread(target=combiner.submit, args=(n,)) for n in range(10)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    gate.set()
    for thread in threads:
        thread.join(10)
    assert sum(sizes) == 10 and max(sizes) <= 3


def test_a_failed_batch_fails_each_of_its_callers_and_the_next_batch_runs() -> None:
    gate = threading.Event()
    calls = 0

    def run(requests: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            gate.wait(10)
            raise RuntimeError("store down")
        if any(r < 0 for r in requests):
            raise ValueError("bad batch")
        return requests

    combiner = Combiner(run)
    outcomes: dict[int, object] = {}

    def call(n: int) -> None:
        try:
            outcomes[n] = combiner.submit(n)
        except Exception as exc:
            outcomes[n] = type(exc).__name__

    first = threading.Thread(target=call, args=(0,))
    first.start()
    time.sleep(0.2)
    gate.set()
    first.join(10)
    assert outcomes == {0: "RuntimeError"}
    assert combiner.submit(5) == 5
    with pytest.raises(ValueError):
        combiner.submit(-1)
    assert combiner.submit(6) == 6


def test_many_threads_each_get_exactly_their_own_answer() -> None:
    def run(requests: list[tuple[int, int]]) -> list[tuple[int, int]]:
        time.sleep(0.001)
        return [(thread, n + 1) for thread, n in requests]

    combiner = Combiner(run, max_batch=8)
    wrong: list[tuple[int, int]] = []

    def worker(thread: int) -> None:
        for n in range(200):
            if combiner.submit((thread, n)) != (thread, n + 1):
                wrong.append((thread, n))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert wrong == []


def test_every_caller_of_a_failed_batch_gets_its_error() -> None:
    gate = threading.Event()
    first_running = threading.Event()

    def run(requests: list[int]) -> list[int]:
        if requests == [0]:
            first_running.set()
            gate.wait(10)
            return requests
        raise RuntimeError(f"store down for {sorted(requests)}")

    combiner = Combiner(run)
    outcomes: dict[int, object] = {}

    def call(n: int) -> None:
        try:
            outcomes[n] = combiner.submit(n)
        except RuntimeError as exc:
            outcomes[n] = str(exc)

    threads = [threading.Thread(target=call, args=(0,))]
    threads[0].start()
    assert first_running.wait(10)
    threads += [threading.Thread(target=call, args=(n,)) for n in (1, 2)]
    for thread in threads[1:]:
        thread.start()
    deadline = time.monotonic() + 10
    while len(combiner._waiting) < 2 and time.monotonic() < deadline:  # both queued behind
        time.sleep(0.01)
    gate.set()
    for thread in threads:
        thread.join(10)

    assert outcomes == {0: 0, 1: "store down for [1, 2]", 2: "store down for [1, 2]"}
