"""Collect every problem of a request, then report them all in one INVALID_ARGUMENT."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from services.common.errors import InvalidArgument


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
