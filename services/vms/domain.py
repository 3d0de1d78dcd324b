"""VMs and their states: the state machine, the JSON form every row is stored in, and a
parser for the legacy text form rows of the old system were written in.

A state is one of seven variants, some with fields. It is stored as JSON, always
(``{"state": "busy", "job_id": "j-1", "started_at": 1732700000.0}``), next to its bare
kind (``busy``) in an indexed column that lists and counts use. Counting by kind, never by
the serialised form, is the point: the old monitor keyed its index by the full form, so
``Idle { jobs_completed: 3, .. }`` never matched ``Idle`` and idle counts stayed zero.
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from services.common.errors import FailedPrecondition


class Kind(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    IDLE = "idle"
    DRAINING = "draining"
    TERMINATED = "terminated"
    FAILED = "failed"


@dataclass(frozen=True)
class Starting:
    kind = Kind.STARTING


@dataclass(frozen=True)
class Ready:
    kind = Kind.READY


@dataclass(frozen=True)
class Busy:
    job_id: str
    started_at: float  # seconds since the epoch
    kind = Kind.BUSY


@dataclass(frozen=True)
class Idle:
    jobs_completed: int
    last_job_at: float
    kind = Kind.IDLE


@dataclass(frozen=True)
class Draining:
    kind = Kind.DRAINING


@dataclass(frozen=True)
class Terminated:
    reason: str
    exit_code: int | None = None
    kind = Kind.TERMINATED


@dataclass(frozen=True)
class Failed:
    error: str
    kind = Kind.FAILED


VmState = Starting | Ready | Busy | Idle | Draining | Terminated | Failed

LIVE = frozenset({Kind.STARTING, Kind.READY, Kind.BUSY, Kind.IDLE, Kind.DRAINING})
ENDED = frozenset({Kind.TERMINATED, Kind.FAILED})

# Which kinds may follow which. A VM that has ended stays ended.
_NEXT: dict[Kind, frozenset[Kind]] = {
    Kind.STARTING: frozenset({Kind.READY, Kind.FAILED, Kind.TERMINATED}),
    Kind.READY: frozenset({Kind.BUSY, Kind.DRAINING, Kind.FAILED, Kind.TERMINATED}),
    Kind.BUSY: frozenset({Kind.IDLE, Kind.DRAINING, Kind.FAILED, Kind.TERMINATED}),
    Kind.IDLE: frozenset({Kind.BUSY, Kind.DRAINING, Kind.FAILED, Kind.TERMINATED}),
    Kind.DRAINING: frozenset({Kind.FAILED, Kind.TERMINATED}),
    Kind.TERMINATED: frozenset(),
    Kind.FAILED: frozenset(),
}


def can_move(current: VmState, new: VmState) -> bool:
    return new.kind in _NEXT[current.kind]


def check_move(vm_id: str, current: VmState, new: VmState) -> None:
    if not can_move(current, new):
        raise FailedPrecondition(
            f"VM {vm_id} is {current.kind.name}; it cannot become {new.kind.name}",
            reason="ILLEGAL_TRANSITION",
            subject=f"vms/{vm_id}",
        )


@dataclass(frozen=True)
class Vm:
    """A VM as the registry knows it."""

    vm_id: str
    state: VmState
    vcpus: int
    memory_mb: int
    backend: str
    created_at: datetime
    updated_at: datetime
    pid: int = 0
    directory: str = ""
    accelerator: str = ""
    pooled: bool = False  # waiting in the warm pool, handed to nobody
    jobs_run: int = 0  # jobs run in this VM so far (kept across BUSY/IDLE)
    # Set when the row was read in the legacy text form; recovery rewrites it as JSON.
    needs_migration: bool = field(default=False, compare=False)


# ---- the JSON form -----------------------------------------------------------------------


def to_json(state: VmState) -> str:
    body: dict[str, Any] = {"state": state.kind.value}
    if isinstance(state, Busy):
        body.update(job_id=state.job_id, started_at=state.started_at)
    elif isinstance(state, Idle):
        body.update(jobs_completed=state.jobs_completed, last_job_at=state.last_job_at)
    elif isinstance(state, Terminated):
        body.update(reason=state.reason, exit_code=state.exit_code)
    elif isinstance(state, Failed):
        body.update(error=state.error)
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


class StateFormatError(ValueError):
    """A stored state that is neither valid JSON nor the legacy text form."""


def from_json(text: str) -> VmState:
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise StateFormatError(f"not JSON: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("state"), str):
        raise StateFormatError(f"not a VM state: {text[:80]!r}")
    return _build(body["state"], body, text)


def _build(name: str, fields: dict[str, Any], text: str) -> VmState:
    try:
        kind = Kind(name.lower())
        if kind is Kind.STARTING:
            return Starting()
        if kind is Kind.READY:
            return Ready()
        if kind is Kind.DRAINING:
            return Draining()
        if kind is Kind.BUSY:
            return Busy(_text(fields["job_id"]), _seconds(fields["started_at"]))
        if kind is Kind.IDLE:
            return Idle(_count(fields["jobs_completed"]), _seconds(fields["last_job_at"]))
        if kind is Kind.TERMINATED:
            code = fields.get("exit_code")
            return Terminated(_text(fields.get("reason", "")), None if code is None else _int(code))
        return Failed(_text(fields["error"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise StateFormatError(f"not a VM state ({exc}): {text[:80]!r}") from None


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected text, got {value!r}")
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _count(value: Any) -> int:
    number = _int(value)
    if number < 0:
        raise ValueError(f"a count cannot be negative: {number}")
    return number


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TypeError(f"expected seconds, got {value!r}")
    return float(value)


# ---- the legacy text form ----------------------------------------------------------------
#
# The old system wrote a state as Rust's Debug form: ``Ready``, ``Busy { job_id: "j-1",
# started_at: 1732700000 }``, ``Terminated { reason: "stopped", exit_code: Some(0) }``,
# ``Failed { error: "boom \"x\"" }``. It migrated such rows with their fields emptied; here
# every field is kept.

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.)*")
      | (?P<number>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)
      | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<punct>[{}(),:])
    )""",
    re.VERBOSE | re.DOTALL,
)

_ESCAPES = {
    "n": "\n",
    "t": "\t",
    "r": "\r",
    "0": "\0",
    "f": "\f",
    "b": "\b",
    "\\": "\\",
    '"': '"',
    "'": "'",
}


def _unescape(body: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(body):
        char = body[i]
        if char != "\\":
            out.append(char)
            i += 1
            continue
        nxt = body[i + 1]
        if nxt == "u" and body[i + 2 : i + 3] == "{":  # Rust: \u{1f600}
            end = body.index("}", i)
            out.append(chr(int(body[i + 3 : end], 16)))
            i = end + 1
        elif nxt == "u":  # \u001b
            out.append(chr(int(body[i + 2 : i + 6], 16)))
            i += 6
        else:
            out.append(_ESCAPES.get(nxt, nxt))
            i += 2
    return "".join(out)


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    stripped = text.rstrip()
    while position < len(stripped):
        match = _TOKEN.match(stripped, position)
        if match is None or match.end() == position:
            raise StateFormatError(f"unexpected text at {position}: {text[:80]!r}")
        group = match.lastgroup
        assert group is not None
        tokens.append((group, match.group(group)))
        position = match.end()
    return tokens


def _value(tokens: list[tuple[str, str]], i: int, text: str) -> tuple[Any, int]:
    kind, token = tokens[i]
    if kind == "string":
        return _unescape(token[1:-1]), i + 1
    if kind == "number":
        number = float(token)
        return (int(number) if number.is_integer() and "." not in token else number), i + 1
    if kind == "name" and token == "None":
        return None, i + 1
    if kind == "name" and token in ("true", "false"):
        return token == "true", i + 1
    if kind == "name" and token == "Some":
        if tokens[i + 1] != ("punct", "("):
            raise StateFormatError(f"Some without '(': {text[:80]!r}")
        inner, j = _value(tokens, i + 2, text)
        if tokens[j] != ("punct", ")"):
            raise StateFormatError(f"Some( without ')': {text[:80]!r}")
        return inner, j + 1
    raise StateFormatError(f"unexpected {token!r}: {text[:80]!r}")


def parse_legacy(text: str) -> VmState:
    tokens = _tokens(text)
    if not tokens or tokens[0][0] != "name":
        raise StateFormatError(f"not a legacy VM state: {text[:80]!r}")
    name = tokens[0][1]
    fields: dict[str, Any] = {}
    i = 1
    try:
        if i < len(tokens):
            if tokens[i] != ("punct", "{"):
                raise StateFormatError(f"expected '{{' after {name}: {text[:80]!r}")
            i += 1
            while tokens[i] != ("punct", "}"):
                key_kind, key = tokens[i]
                if key_kind != "name" or tokens[i + 1] != ("punct", ":"):
                    raise StateFormatError(f"expected a field name: {text[:80]!r}")
                fields[key], i = _value(tokens, i + 2, text)
                if tokens[i] == ("punct", ","):
                    i += 1
            i += 1
        if i != len(tokens):
            raise StateFormatError(f"text after the state: {text[:80]!r}")
    except IndexError:
        raise StateFormatError(f"the legacy state ends early: {text[:80]!r}") from None
    if name.lower() not in {k.value for k in Kind}:
        raise StateFormatError(f"unknown legacy state {name!r}")
    return _build(name, fields, text)


def parse_stored(text: str) -> tuple[VmState, bool]:
    """A stored state and whether it was in the legacy text form (to be rewritten)."""
    if text.lstrip().startswith("{"):
        return from_json(text), False
    return parse_legacy(text), True


def to_legacy(state: VmState) -> str:
    """The old system's text form (for tests and for reading old rows back)."""

    def string(value: str) -> str:
        return json.dumps(value, ensure_ascii=False)

    def number(value: float) -> str:
        return str(int(value)) if float(value).is_integer() else repr(value)

    if isinstance(state, Busy):
        return f"Busy {{ job_id: {string(state.job_id)}, started_at: {number(state.started_at)} }}"
    if isinstance(state, Idle):
        return (
            f"Idle {{ jobs_completed: {state.jobs_completed}, "
            f"last_job_at: {number(state.last_job_at)} }}"
        )
    if isinstance(state, Terminated):
        code = "None" if state.exit_code is None else f"Some({state.exit_code})"
        return f"Terminated {{ reason: {string(state.reason)}, exit_code: {code} }}"
    if isinstance(state, Failed):
        return f"Failed {{ error: {string(state.error)} }}"
    return state.kind.name.capitalize()


def count_by_kind(states: list[VmState]) -> dict[Kind, int]:
    """How many VMs are in each kind of state: keyed by kind, never by the serialised form."""
    counts = dict.fromkeys(Kind, 0)
    for state in states:
        counts[state.kind] += 1
    return counts
