"""services.common.client.one_by_one: the fallback for a peer without a batch call."""

from __future__ import annotations

from services.common.client import one_by_one


def test_each_is_sent_in_order_until_the_first_failure() -> None:
    sent: list[int] = []

    def send(n: int) -> None:
        if n == 3:
            raise ValueError("refused")
        sent.append(n)

    answers = one_by_one([1, 2, 3, 4], send)

    assert sent == [1, 2]
    assert answers[:2] == [None, None]
    assert [type(a).__name__ for a in answers[2:]] == ["ValueError", "ValueError"]
    assert one_by_one([], send) == []
