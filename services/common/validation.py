"""Collect every problem of a request, then report them all in one INVALID_ARGUMENT; and
the one rule every request passes at the edge (``check_fields``): no text a column cannot
hold, no integer past a column's range, no list without a bound."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from services.common.errors import MAX_LISTED, InvalidArgument, brief

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class Problems:
    """The problems of one request. Only the first ``MAX_LISTED`` are kept, the others
    counted: a request with a million bad entries costs a counter, not a million objects."""

    def __init__(self) -> None:
        self._items: list[FieldViolation] = []
        self._more = 0

    def add(self, field: str, description: str) -> None:
        if len(self._items) < MAX_LISTED:
            self._items.append(FieldViolation(brief(field), brief(description)))
        else:
            self._more += 1

    def check(self, ok: bool, field: str, description: str) -> bool:
        if not ok:
            self.add(field, description)
        return ok

    def extend(self, violations: Iterable[FieldViolation]) -> None:
        for violation in violations:
            self.add(violation.field, violation.description)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items) + self._more

    def error(self) -> InvalidArgument | None:
        return combine(self._items, more=self._more)

    def raise_if_any(self) -> None:
        error = self.error()
        if error is not None:
            raise error


def combine(violations: Iterable[FieldViolation], *, more: int = 0) -> InvalidArgument | None:
    """One error for all the problems (``more`` of them not given, only counted); no
    problems is no error. The error lists the first ``MAX_LISTED`` and counts the rest."""
    items: list[FieldViolation] = []
    for violation in violations:
        if len(items) < MAX_LISTED:
            items.append(violation)
        else:
            more += 1
    if not items:
        return None
    total = len(items) + more
    summary = "; ".join(f"{v.field}: {v.description}" for v in items)
    if more:
        summary += f"; and {more} more"
    noun = "problem" if total == 1 else "problems"
    return InvalidArgument(
        f"the request has {total} {noun}: {summary}",
        violations=[(v.field, v.description) for v in items],
        metadata={"problems": str(total)} if more else None,
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
    each checked on its own: by the edge rule (``check_fields``), then by ``check``."""
    batch_size = Problems()
    batch_size.check(0 < len(requests) <= at_most, "requests", f"between 1 and {at_most}")
    batch_size.raise_if_any()
    valid: list[T] = []
    refused: dict[int, InvalidArgument] = {}
    for i, request in enumerate(requests):
        problems = Problems()
        if isinstance(request, Message):
            check_fields(request, problems)
        check(request, problems)
        error = problems.error()
        if error is None:
            valid.append(request)
        else:
            refused[i] = error
    return BatchCheck(valid, refused, len(requests))


# ---- the edge rule: what no column can hold never reaches one ---------------------------

# PostgreSQL's integer and bigint are signed (as is SQLite's INTEGER): a uint32 past 2^31-1
# or a uint64 past 2^63-1 fits no column it could be stored in.
MAX_UINT32 = 2**31 - 1
MAX_UINT64 = 2**63 - 1
# Every repeated field and map is bounded; a field named here has its own bound.
MAX_ENTRIES = 1024
ENTRIES: dict[str, int] = {
    "blixard.jobs.v1.ListJobsRequest.states": 64,
    "blixard.queue.v1.ListItemsRequest.states": 64,
    "blixard.vms.v1.ListVmsRequest.states": 64,
}
# Data a job produced (its output and error text): stored as it came, never refused for
# a NUL, so a completion is never lost because the job printed one. Every other text is
# a name, an id, an argument or a filter, and a NUL in it is refused (PostgreSQL's text
# columns cannot hold one).
DATA_FIELDS = frozenset(
    {
        "blixard.queue.v1.CompleteRequest.output_tail",
        "blixard.queue.v1.CompleteRequest.error",
        "blixard.jobs.v1.UpdateJobStatusRequest.output_tail",
        "blixard.jobs.v1.UpdateJobStatusRequest.error",
    }
)
NUL_RULE = "must not contain NUL (\\0) characters"

_UINT32 = (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32)
_UINT64 = (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64)


def is_batch(fd: FieldDescriptor) -> bool:
    """A repeated field of another RPC's request (``BatchXRequest.requests``): its items
    are checked one by one by the batch call (``check_each``), so a bad one fails alone."""
    return (
        fd.is_repeated
        and fd.message_type is not None
        and fd.message_type.name.endswith("Request")
        and not fd.message_type.GetOptions().map_entry
    )


def check_fields(message: Message, problems: Problems, path: str = "") -> None:
    """The rule every request passes before anything reads it, over its descriptor (a new
    field is covered as it is added): text without NUL (except ``DATA_FIELDS``), unsigned
    integers within the signed columns' range, at most ``MAX_ENTRIES`` entries in a list
    or map (``ENTRIES`` for some). The items of a batch are left to ``check_each``."""
    for fd, value in message.ListFields():
        name = f"{path}{fd.name}"
        if fd.is_repeated:
            limit = ENTRIES.get(fd.full_name, MAX_ENTRIES)
            if not problems.check(len(value) <= limit, name, f"at most {limit} entries"):
                continue
            if is_batch(fd):
                continue
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                _check_map(fd, value, problems, name)
            else:
                for i, item in enumerate(value):
                    _check_value(fd, item, problems, f"{name}[{i}]")
        else:
            _check_value(fd, value, problems, name)


def _check_map(fd: FieldDescriptor, value: object, problems: Problems, name: str) -> None:
    assert fd.message_type is not None
    value_fd = fd.message_type.fields_by_name["value"]
    for key, item in value.items():  # type: ignore[attr-defined]
        entry = f"{name}[{_shown(key)}]"
        if isinstance(key, str) and "\x00" in key:
            problems.add(entry, f"the key {NUL_RULE}")
        _check_value(value_fd, item, problems, entry)


def _check_value(fd: FieldDescriptor, value: object, problems: Problems, name: str) -> None:
    if isinstance(value, Message):
        check_fields(value, problems, f"{name}.")
    elif isinstance(value, str):
        if "\x00" in value and fd.full_name not in DATA_FIELDS:
            problems.add(name, NUL_RULE)
    elif fd.type in _UINT32:
        problems.check(value <= MAX_UINT32, name, f"at most {MAX_UINT32}")  # type: ignore[operator]
    elif fd.type in _UINT64:
        problems.check(value <= MAX_UINT64, name, f"at most {MAX_UINT64}")  # type: ignore[operator]


def _shown(key: object) -> str:
    return brief(str(key).replace("\x00", "\\0"), 64)


def check_request(message: Message) -> None:
    """``check_fields`` for a whole request: raises its INVALID_ARGUMENT if any."""
    problems = Problems()
    check_fields(message, problems)
    problems.raise_if_any()
