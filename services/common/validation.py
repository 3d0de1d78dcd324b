"""Collect every problem of a request, then report them all in one INVALID_ARGUMENT."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from services.common.errors import InvalidArgument

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class Problems:
    def __init__(self) -> None:
        self._items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self._items.append(FieldViolation(field, description))

    def check(self, ok: bool, field: str, description: str) -> bool:
        if not ok:
            self.add(field, description)
        return ok

    def extend(self, violations: Iterable[FieldViolation]) -> None:
        self._items.extend(violations)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def error(self) -> InvalidArgument | None:
        return combine(self._items)

    def raise_if_any(self) -> None:
        error = self.error()
        if error is not None:
            raise error


def combine(violations: Iterable[FieldViolation]) -> InvalidArgument | None:
    """One error for all the problems; no problems is no error."""
    items = list(violations)
    if not items:
        return None
    summary = "; ".join(f"{v.field}: {v.description}" for v in items)
    noun = "problem" if len(items) == 1 else "problems"
    return InvalidArgument(
        f"the request has {len(items)} {noun}: {summary}",
        violations=[(v.field, v.description) for v in items],
    )


@dataclass(frozen=True)
class BatchCheck(Generic[T]):
    """A batch call's requests checked one by one: the valid ones go on, each invalid one
    is refused alone (its own INVALID_ARGUMENT), and ``merge`` puts the answers back in
    the requests' order."""

    valid: list[T]
    refused: dict[int, InvalidArgument]
    size: int

    def merge(self, answers: Iterable[R]) -> list[R | InvalidArgument]:
        """The answers of the valid requests (in order) with the refusals, by position."""
        given = iter(answers)
        return [self.refused[i] if i in self.refused else next(given) for i in range(self.size)]


def check_each(
    requests: Sequence[T], check: Callable[[T, Problems], None], *, at_most: int
) -> BatchCheck[T]:
    """A batch of 1 to ``at_most`` requests (else the whole call is INVALID_ARGUMENT),
    each checked on its own."""
    batch_size = Problems()
    batch_size.check(0 < len(requests) <= at_most, "requests", f"between 1 and {at_most}")
    batch_size.raise_if_any()
    valid: list[T] = []
    refused: dict[int, InvalidArgument] = {}
    for i, request in enumerate(requests):
        problems = Problems()
        check(request, problems)
        error = problems.error()
        if error is None:
            valid.append(request)
        else:
            refused[i] = error
    return BatchCheck(valid, refused, len(requests))
