"""Collect every problem of a request, then report them all in one INVALID_ARGUMENT; and
the one rule every request passes at the edge (``check_fields``): no text a column cannot
hold, no integer past a column's range, no list without a bound."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf.descriptor import Descriptor, FieldDescriptor
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
    no_nul = _NO_NUL.get()  # the batch's bytes hold no NUL: only bounds to check
    valid: list[T] = []
    refused: dict[int, InvalidArgument] = {}
    for i, request in enumerate(requests):
        problems = Problems()
        if isinstance(request, Message):
            check_item(request, problems, no_nul=no_nul)
        check(request, problems)
        error = problems.error()
        if error is None:
            valid.append(request)
        else:
            refused[i] = error
    return BatchCheck(valid, refused, len(requests))


def check_item(
    request: Message, problems: Problems, path: str = "", *, no_nul: bool | None = None
) -> None:
    """The edge rule for one item of a batch call (``check_each`` applies it; a batch
    call that checks its items itself calls it for each). ``path``: the item's place,
    such as ``requests[3].``."""
    if no_nul is None:
        no_nul = _NO_NUL.get()
    (_check_bounds if no_nul else check_fields)(request, problems, path)


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
        # The queue quotes a worker's error in a report's reason ("cancelled; attempt N: …").
        "blixard.jobs.v1.UpdateJobStatusRequest.reason",
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


# What the rule checks in a field, decided once per field from its descriptor (reading a
# descriptor's attributes costs more than the check): (kind, repeated, bound, value kind).
_SKIP, _TEXT, _UINT32_KIND, _UINT64_KIND, _MESSAGE, _MAP, _BATCH = range(7)
_PLANS: dict[FieldDescriptor, tuple[int, bool, int, int]] = {}


def _kind(fd: FieldDescriptor) -> int:
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        return _MAP
    if is_batch(fd):
        return _BATCH
    if fd.message_type is not None:
        return _MESSAGE
    if fd.type == FieldDescriptor.TYPE_STRING:
        return _SKIP if fd.full_name in DATA_FIELDS else _TEXT
    if fd.type in _UINT32:
        return _UINT32_KIND
    if fd.type in _UINT64:
        return _UINT64_KIND
    return _SKIP


def _plan(fd: FieldDescriptor) -> tuple[int, bool, int, int]:
    plan = _PLANS.get(fd)
    if plan is None:
        kind = _kind(fd)
        value_kind = _SKIP
        if kind == _MAP:
            assert fd.message_type is not None
            value_kind = _kind(fd.message_type.fields_by_name["value"])
        plan = (kind, fd.is_repeated, ENTRIES.get(fd.full_name, MAX_ENTRIES), value_kind)
        _PLANS[fd] = plan
    return plan


def check_fields(message: Message, problems: Problems, path: str = "") -> None:
    """The rule every request passes before anything reads it, over its descriptor (a new
    field is covered as it is added): text without NUL (except ``DATA_FIELDS``), unsigned
    integers within the signed columns' range, at most ``MAX_ENTRIES`` entries in a list
    or map (``ENTRIES`` for some). The items of a batch are left to ``check_each``.
    Field names are built only for a problem: the rule runs on every request."""
    for fd, value in message.ListFields():
        kind, repeated, limit, value_kind = _plan(fd)
        if kind in (_SKIP, _BATCH) and (not repeated or len(value) <= limit):
            continue
        if repeated:
            if len(value) > limit:
                problems.add(path + fd.name, f"at most {limit} entries")
            elif kind == _MAP:
                _check_map(value, value_kind, problems, path + fd.name)
            elif kind == _MESSAGE:
                for i, item in enumerate(value):
                    check_fields(item, problems, f"{path}{fd.name}[{i}].")
            elif _bad(kind, value):
                for i, item in enumerate(value):
                    if _bad(kind, (item,)):
                        _add(kind, problems, f"{path}{fd.name}[{i}]")
        elif kind == _MESSAGE:
            check_fields(value, problems, f"{path}{fd.name}.")
        elif _bad(kind, (value,)):
            _add(kind, problems, path + fd.name)


def _bad(kind: int, values: Iterable[object]) -> bool:
    if kind == _TEXT:
        return any("\x00" in v for v in values)  # type: ignore[operator]
    if kind == _UINT32_KIND:
        return any(v > MAX_UINT32 for v in values)  # type: ignore[operator]
    return any(v > MAX_UINT64 for v in values)  # type: ignore[operator]


def _add(kind: int, problems: Problems, name: str) -> None:
    if kind == _TEXT:
        problems.add(name, NUL_RULE)
    else:
        problems.add(name, f"at most {MAX_UINT32 if kind == _UINT32_KIND else MAX_UINT64}")


def _check_map(value: Any, kind: int, problems: Problems, name: str) -> None:
    if kind == _TEXT and not any("\x00" in k or "\x00" in v for k, v in value.items()):
        return  # the usual map of text to text, clean: one pass
    for key, item in value.items():
        if isinstance(key, str) and "\x00" in key:
            problems.add(f"{name}[{_shown(key)}]", f"the key {NUL_RULE}")
        if kind == _MESSAGE:
            check_fields(item, problems, f"{name}[{_shown(key)}].")
        elif kind != _SKIP and _bad(kind, (item,)):
            _add(kind, problems, f"{name}[{_shown(key)}]")


def _shown(key: object) -> str:
    return brief(str(key).replace("\x00", "\\0"), 64)


# ---- the same rule, fast, for a request whose bytes hold no NUL ---------------------------
#
# UTF-8 text holds a 0 byte only for a NUL: when the request's bytes hold none, no text in
# it can, and only the integers and the lengths of lists remain to check. They are read by
# name from a plan made once per message type, which costs a tenth of the walk above.

_NO_NUL: ContextVar[bool] = ContextVar("blixard_request_without_nul", default=False)


@contextmanager
def request_bytes(raw: bytes) -> Iterator[None]:
    """While a handler runs on ``raw``: say whether it holds no NUL (for ``check_each``)."""
    token = _NO_NUL.set(b"\x00" not in raw)
    try:
        yield
    finally:
        _NO_NUL.reset(token)


_BOUNDS: dict[Descriptor, list[tuple[str, int, bool, int, Descriptor | None]]] = {}


def _bounds(descriptor: Descriptor) -> list[tuple[str, int, bool, int, Descriptor | None]]:
    """The fields of a message type that may break a bound whatever their text: integers,
    lists and maps, and messages that hold some. (name, kind, repeated, bound, the type
    of the message(s) it holds)."""
    plan = _BOUNDS.get(descriptor)
    if plan is None:
        _BOUNDS[descriptor] = plan = []  # a type that holds itself stops here
        for fd in descriptor.fields:
            kind, repeated, limit, _value_kind = _plan(fd)
            inner: Descriptor | None = None
            if kind == _MAP:
                assert fd.message_type is not None
                inner = fd.message_type.fields_by_name["value"].message_type
            elif kind == _MESSAGE:
                inner = fd.message_type
            if inner is not None and not _bounds(inner):
                inner = None
            if repeated or kind in (_UINT32_KIND, _UINT64_KIND) or inner is not None:
                plan.append((fd.name, kind, repeated, limit, inner))
    return plan


def _check_bounds(message: Message, problems: Problems, path: str = "") -> None:
    for name, kind, repeated, limit, inner in _bounds(message.DESCRIPTOR):  # type: ignore[arg-type]
        if repeated:
            value = getattr(message, name)
            if len(value) > limit:
                problems.add(path + name, f"at most {limit} entries")
            elif kind == _MAP:
                if inner is not None:
                    for key, item in value.items():
                        _check_bounds(item, problems, f"{path}{name}[{_shown(key)}].")
            elif inner is not None:
                for i, item in enumerate(value):
                    _check_bounds(item, problems, f"{path}{name}[{i}].")
            elif kind in (_UINT32_KIND, _UINT64_KIND) and _bad(kind, value):
                for i, item in enumerate(value):
                    if _bad(kind, (item,)):
                        _add(kind, problems, f"{path}{name}[{i}]")
        elif inner is not None:
            if message.HasField(name):
                _check_bounds(getattr(message, name), problems, f"{path}{name}.")
        elif getattr(message, name) > (MAX_UINT32 if kind == _UINT32_KIND else MAX_UINT64):
            _add(kind, problems, path + name)


def check_request(message: Message, raw: bytes | None = None) -> None:
    """``check_fields`` for a whole request (parsed from ``raw``, when given): raises its
    INVALID_ARGUMENT if any."""
    problems = Problems()
    if raw is not None and b"\x00" not in raw:
        _check_bounds(message, problems)
    else:
        check_fields(message, problems)
    problems.raise_if_any()
