"""What every benchmark prints the same way: machine facts, percentiles, tables, phase times."""

from __future__ import annotations

import datetime
import inspect
import logging
import math
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


def machine_facts() -> list[tuple[str, str]]:
    import grpc
    import sqlalchemy

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        ("date", datetime.datetime.now().astimezone().isoformat(timespec="seconds")),
        ("host", platform.node()),
        ("nproc", str(os.cpu_count())),
        ("load average", f"{load} (other processes may share the machine)"),
        ("python", sys.version.split()[0] + f" ({platform.python_implementation()})"),
        ("grpcio", grpc.__version__),
        ("sqlalchemy", sqlalchemy.__version__),
        ("platform", platform.platform()),
    ]


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU time of a process (all its threads) so far; with ``children``, also
    that of its children it has waited for (cutime + cstime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, linearly interpolated."""
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Summary:
    """Latencies in milliseconds."""

    count: int
    p50: float
    p99: float
    mean: float
    max: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Summary:
        ordered = sorted(s * 1000 for s in seconds)
        if not ordered:
            return cls(0, math.nan, math.nan, math.nan, math.nan)
        return cls(
            len(ordered),
            percentile(ordered, 50),
            percentile(ordered, 99),
            sum(ordered) / len(ordered),
            ordered[-1],
        )


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str = "") -> str:
    """A plain-text table; numbers right-aligned, text left-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    numeric = [
        all(isinstance(row[i], int | float) for row in rows) if rows else False
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    out = [title] if title else []
    out.append(line(headers))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


@dataclass
class Phases:
    """Wall time of each named phase, printed as it ends and listed at the end."""

    done: list[tuple[str, float]] = field(default_factory=list)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        say(f"-- {name} ...")
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.done.append((name, elapsed))
            say(f"-- {name}: {elapsed:.1f} s")


def say(text: str) -> None:
    print(text, flush=True)


class FirstLogs(logging.Handler):
    """Shows the first few log records at WARNING or above and counts the rest, so a service
    failing every call does not bury the figures in tracebacks."""

    def __init__(self, show: int = 3) -> None:
        super().__init__(logging.WARNING)
        self.show = show
        self.counts: Counter[str] = Counter()
        self.setFormatter(logging.Formatter("   [log] %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.levelname] += 1
        if sum(self.counts.values()) <= self.show:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()

    def install(self) -> FirstLogs:
        logging.getLogger().addHandler(self)
        return self

    def summary(self) -> str:
        if not self.counts:
            return "service log: no warnings or errors"
        counted = ", ".join(f"{n} {level}" for level, n in sorted(self.counts.items()))
        return f"service log: {counted} (the first {self.show} shown above)"


def misfits(stand_in: object, port: type) -> list[str]:
    """How a bench's stand-in fails to fit the port (a typing.Protocol) it stands in for:
    each method of the port that it lacks, or takes other parameters. Empty when it fits."""
    problems = []
    for klass in port.__mro__:
        if klass is object or not getattr(klass, "_is_protocol", False):
            continue
        for name, wanted in vars(klass).items():
            if name.startswith("_") or not callable(wanted):
                continue
            have = getattr(stand_in, name, None)
            if not callable(have):
                problems.append(f"{name}() is missing")
                continue
            expected = list(inspect.signature(wanted).parameters)[1:]  # without self
            actual = list(inspect.signature(have).parameters)
            if actual != expected:
                problems.append(f"{name}({', '.join(actual)}) should take ({', '.join(expected)})")
    return problems


def check_fits(stand_in: object, port: type) -> None:
    """Stop the bench, loudly, when its stand-in no longer fits the port: the figures would
    be taken with the service failing on every call to it."""
    problems = misfits(stand_in, port)
    if problems:
        raise SystemExit(
            f"bench: the stand-in {type(stand_in).__name__} no longer fits "
            f"{port.__module__}.{port.__qualname__}: {'; '.join(problems)}"
        )
