"""The tables of ``bench/e2e.py``: Blixard beside the peers (``../shared/peers/`` results, the
same JSON schema), the ratios, and issue 16's targets marked met or not met.

Every figure is "median [min-max]" over the runs, as the peers' ``summarize.py`` prints them:
enqueue over all runs, drain of the best setting by median, latency p50/p99 taken inside each
run and then the median of those. Pure functions over the JSON files: no suite is started here.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PEERS = ["celery", "rq", "procrastinate", "pgqueuer"]
LABEL = {
    "celery": "Celery + Redis",
    "rq": "RQ + Redis",
    "procrastinate": "procrastinate + PG",
    "pgqueuer": "PgQueuer + PG",
    "blixard-sqlite": "**Blixard**, SQLite",
    "blixard-postgresql": "**Blixard**, PostgreSQL",
}
STALE_S = 2 * 3600  # peers' results this much older than Blixard's are another window


# -- numbers ---------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """The peers' percentile (common.pct): linear between the two nearest ranks, q in 0..1."""
    s = sorted(values)
    if not s:
        return math.nan
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def fmt(values: Sequence[float], digits: int = 0) -> str:
    if not values:
        return "n/a"
    f = f"{{:,.{digits}f}}"
    m, lo, hi = med(values), min(values), max(values)
    if len(values) == 1:
        return f.format(m)
    return f"{f.format(m)} [{f.format(lo)}-{f.format(hi)}]"


def ratio_text(a: float, b: float) -> str:
    if math.isnan(a) or math.isnan(b) or b == 0:
        return "n/a"
    r = a / b
    if r >= 10:
        return f"{r:.0f}x"
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.3f}x"


# -- what one system's JSON says -------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """One system's headline figures (medians), NaN where it has none."""

    enqueue: list[float]
    bulk: list[float]
    best: str
    drain: list[float]
    latency: dict[str, dict[str, Any]]  # variant -> {"setting", "runs"}
    cpu_us: list[float]  # all processes per no-op job, Blixard only

    @property
    def enqueue_med(self) -> float:
        return med(self.enqueue)

    @property
    def bulk_med(self) -> float:
        return med(self.bulk)

    @property
    def drain_med(self) -> float:
        return med(self.drain)

    def started_p50(self, variant: str | None = None) -> float:
        runs = self._lat(variant)
        return med([pct(r["ran_ms"], 0.5) for r in runs])

    def done_p50(self, variant: str | None = None) -> float:
        runs = self._lat(variant)
        return med([pct(r["done_ms"], 0.5) for r in runs])

    def _lat(self, variant: str | None) -> list[dict[str, Any]]:
        if not self.latency:
            return []
        key = variant if variant in self.latency else next(iter(self.latency))
        return list(self.latency[key]["runs"])


def drains(setting: dict[str, Any]) -> list[float]:
    return [r["drain_rate"] for r in setting["runs"] if _finite(r.get("drain_rate"))]


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not math.isnan(x)


def total_cpu_us(run: dict[str, Any]) -> float:
    """CPU of every process of the suite per job, enqueue and drain (a `true` job's own
    process, the worker's children, apart)."""
    cpu = run["cpu_us_per_job"]
    return sum(cpu["enqueue"].values()) + sum(
        v for k, v in cpu["drain"].items() if k != "worker children"
    )


def figures(data: dict[str, Any]) -> Figures:
    settings = data.get("settings", {})
    enqueue = [r["enqueue_rate"] for s in settings.values() for r in s["runs"]]
    best, best_med = "n/a", -1.0
    for name, s in settings.items():
        d = drains(s)
        if d and med(d) > best_med:
            best, best_med = name, med(d)
    bulk = data.get("bulk_enqueue") or {}
    lat = data.get("latency") or {}
    variants = {"": lat} if "runs" in lat else lat
    runs = settings[best]["runs"] if best in settings else []
    cpu = [total_cpu_us(r) for r in runs if "cpu_us_per_job" in r]
    return Figures(
        enqueue=enqueue,
        bulk=list(bulk.get("rates") or []),
        best=best,
        drain=drains(settings[best]) if best in settings else [],
        latency=variants,
        cpu_us=cpu,
    )


def load(results: Path, backends: Sequence[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for name in PEERS + [f"blixard-{b}" for b in backends]:
        path = results / f"{name}.json"
        if path.exists():
            data = json.loads(path.read_text())
            data["_mtime"] = path.stat().st_mtime
            out[name] = data
    return out


def write_result(results: Path, system: str, data: dict[str, Any], knobs: Any) -> Path:
    """The peers' schema (common.write_result) plus Blixard's own keys."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{system}.json"
    payload = {
        "system": system,
        "n_jobs": knobs.n,
        "reps": knobs.reps,
        "n_latency": knobs.lat_n,
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **data,
    }
    path.write_text(json.dumps(payload, indent=2))
    return path


# -- targets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    kind: str  # must | aim
    text: str
    value: str
    met: bool | None  # None: not measured here, or no peer result to compare with

    @property
    def verdict(self) -> str:
        return {True: "met", False: "**not met**", None: "n/a"}[self.met]


def _ge(value: float, bound: float) -> bool | None:
    return None if math.isnan(value) or math.isnan(bound) else value >= bound


def _le(value: float, bound: float) -> bool | None:
    return None if math.isnan(value) or math.isnan(bound) else value <= bound


def targets(
    blixard: dict[str, Any], celery: dict[str, Any] | None, pgqueuer: dict[str, Any] | None
) -> list[Target]:
    """Issue 16's targets for one Blixard result (mock workers; the issue judges SQLite)."""
    nan = math.nan
    b = figures(blixard)
    c = figures(celery) if celery else None
    p = figures(pgqueuer) if pgqueuer else None
    c_drain = c.drain_med if c else nan
    c_enq = c.enqueue_med if c else nan
    c_started = c.started_p50() if c else nan
    p_drain = p.drain_med if p else nan
    started = b.started_p50()
    cpu = med(b.cpu_us)
    cancel = (blixard.get("cancel") or {}).get("gone_ms") or []
    cancel_max = max(cancel) if cancel else nan
    true_ratio, true_text = nan, "n/a"
    for name, s in (blixard.get("true_commands") or {}).items():
        base = (s.get("fork_exec_baseline") or {}).get("drain_rate", nan)
        r = med(drains(s)) / base if base else nan
        if not math.isnan(r) and (math.isnan(true_ratio) or r > true_ratio):
            true_ratio = r
            true_text = (
                f"{med(drains(s)):,.0f}/s = {r:.0%} of {base:,.0f}/s "
                f"({name}, {s['workers'] * s['slots']} at once)"
            )

    def vs(value: float, peer: float, unit: str, digits: int = 0) -> str:
        if math.isnan(value):
            return "n/a"
        f = f"{{:,.{digits}f}}"
        if math.isnan(peer):
            return f"{f.format(value)}{unit} (no peer result)"
        return f"{f.format(value)}{unit} = {ratio_text(value, peer)} ({f.format(peer)}{unit})"

    def ratio_ok(value: float, peer: float, factor: float, cmp: str) -> bool | None:
        bound = peer * factor
        return _ge(value, bound) if cmp == "ge" else _le(value, bound)

    drain_s = vs(b.drain_med, c_drain, "/s")
    enq_s = vs(b.enqueue_med, c_enq, "/s")
    started_s = vs(started, c_started, " ms", 1)
    cancel_s = f"max {cancel_max:,.0f} ms of {len(cancel)}" if cancel else "n/a"
    cpu_s = f"{cpu:,.0f} µs" if not math.isnan(cpu) else "n/a"
    bulk_s = f"{b.bulk_med:,.0f}/s" if b.bulk else "n/a"
    must, aim = "must", "aim"
    return [
        Target(must, "drain ≥ Celery's", drain_s, ratio_ok(b.drain_med, c_drain, 1, "ge")),
        Target(
            must, "single enqueue ≥ 0.5x Celery's", enq_s, ratio_ok(b.enqueue_med, c_enq, 0.5, "ge")
        ),
        Target(
            must,
            "submit→started p50 ≤ 3x Celery's",
            started_s,
            ratio_ok(started, c_started, 3, "le"),
        ),
        Target(must, "bulk ≥ 5,000 jobs/s", bulk_s, _ge(b.bulk_med, 5000)),
        Target(must, "cancel → process gone ≤ 1 s", cancel_s, _le(cancel_max, 1000)),
        Target(must, "all processes ≤ 250 µs CPU per no-op job", cpu_s, _le(cpu, 250)),
        Target(
            aim,
            "drain ≥ PgQueuer's",
            vs(b.drain_med, p_drain, "/s"),
            ratio_ok(b.drain_med, p_drain, 1, "ge"),
        ),
        Target(aim, "single enqueue ≥ Celery's", enq_s, ratio_ok(b.enqueue_med, c_enq, 1, "ge")),
        Target(
            aim,
            "submit→started p50 ≤ 2x Celery's",
            started_s,
            ratio_ok(started, c_started, 2, "le"),
        ),
        Target(aim, "bulk ≥ 15,000 jobs/s", bulk_s, _ge(b.bulk_med, 15000)),
        Target(aim, "`true` ≥ 80% of a bare fork/exec loop", true_text, _ge(true_ratio, 0.8)),
        Target(aim, "≤ 100 µs CPU per job", cpu_s, _le(cpu, 100)),
    ]


# -- tables ----------------------------------------------------------------------------------


def lat_cells(runs: list[dict[str, Any]], key: str) -> str:
    if not runs:
        return "n/a"
    p50 = [pct(r[key], 0.5) for r in runs]
    p99 = [pct(r[key], 0.99) for r in runs]
    d = 1 if max(p99) < 100 else 0
    return f"{fmt(p50, d)} / {fmt(p99, d)}"


def main_table(data: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| system | enqueue jobs/s (single calls) | bulk enqueue jobs/s | best drain setting "
        "| drain jobs/s | submit→done p50 / p99 ms | submit→started p50 / p99 ms "
        "| CPU µs/job (all processes) | latency setting |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, d in data.items():
        f = figures(d)
        bulk = d.get("bulk_enqueue")
        bulk_s = fmt(f.bulk) if bulk else "n/a"
        if bulk and name.startswith("blixard") and "concurrent" in str(bulk.get("api")):
            bulk_s += " (no batch RPC: 8 concurrent clients)"
        for i, (vname, v) in enumerate(f.latency.items() or [("", {"setting": "n/a"})]):
            label = LABEL.get(name, name) + (f" ({vname})" if vname and len(f.latency) > 1 else "")
            same = "(same)"
            cells = [
                fmt(f.enqueue) if i == 0 else same,
                bulk_s if i == 0 else same,
                f.best if i == 0 else same,
                fmt(f.drain) if i == 0 else same,
                lat_cells(v.get("runs", []), "done_ms"),
                lat_cells(v.get("runs", []), "ran_ms"),
                (fmt(f.cpu_us) if f.cpu_us else "n/a") if i == 0 else same,
                str(v.get("setting", "")),
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def ratio_table(data: dict[str, dict[str, Any]]) -> list[str]:
    peers = [p for p in ("celery", "pgqueuer") if p in data]
    ours = [n for n in data if n.startswith("blixard")]
    if not peers or not ours:
        return ["(no Celery or PgQueuer results beside Blixard's: no ratios)"]
    lines = [
        "| Blixard vs | enqueue | bulk | drain | submit→done p50 | submit→started p50 |",
        "|---|---|---|---|---|---|",
    ]
    for o in ours:
        b = figures(data[o])
        for p in peers:
            f = figures(data[p])
            variant = "defaults" if "defaults" in f.latency else None
            bulk = ratio_text(b.bulk_med, f.bulk_med) if f.bulk else "n/a (peer has none)"
            lines.append(
                f"| {LABEL[o]} vs {LABEL[p]} | {ratio_text(b.enqueue_med, f.enqueue_med)} | "
                f"{bulk} | {ratio_text(b.drain_med, f.drain_med)} | "
                f"{ratio_text(b.done_p50(), f.done_p50(variant))} | "
                f"{ratio_text(b.started_p50(), f.started_p50(variant))} |"
            )
    lines.append("")
    lines.append(
        "Enqueue, bulk and drain: higher is better (Blixard's rate / the peer's); "
        "latency: lower is better (Blixard's time / the peer's; PgQueuer's `defaults` variant)."
    )
    return lines


def detail_table(data: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| Blixard | setting | drain jobs/s | worker start → first job, s | enqueue jobs/s "
        "| relay lag, s | CPU µs/job: enqueue (jobs / queue / pg) | drain (jobs / queue / "
        "workers / pg) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, d in data.items():
        if not name.startswith("blixard"):
            continue
        for kind in ("settings", "true_commands"):
            for sname, s in (d.get(kind) or {}).items():
                runs = s["runs"]

                def cpu(phase: str, key: str, runs: list[dict[str, Any]] = runs) -> str:
                    vals = [r["cpu_us_per_job"][phase].get(key) for r in runs]
                    vals = [v for v in vals if v is not None]
                    return f"{med(vals):,.0f}" if vals else "-"

                enq = " / ".join(cpu("enqueue", k) for k in ("jobs", "queue", "postgres"))
                drn = " / ".join(cpu("drain", k) for k in ("jobs", "queue", "workers", "postgres"))
                if kind == "true_commands":
                    drn += f" (+ `true` itself {cpu('drain', 'worker children')})"
                lines.append(
                    f"| {LABEL[name]} | {sname} ({s['workers']}x{s['slots']}) | {fmt(drains(s))} | "
                    f"{fmt([r['startup_s'] for r in runs], 2)} | "
                    f"{fmt([r['enqueue_rate'] for r in runs])} | "
                    f"{fmt([r['relay_s'] for r in runs], 2)} | {enq} | {drn} |"
                )
                base = s.get("fork_exec_baseline")
                if base:
                    lines.append(
                        f"| {LABEL[name]} | bare fork/exec loop, {base['concurrency']} threads | "
                        f"{base['drain_rate']:,.0f} | | | | | |"
                    )
        cancel = d.get("cancel")
        if cancel and cancel.get("gone_ms"):
            g = cancel["gone_ms"]
            lines.append(
                f"| {LABEL[name]} | CancelJob → process gone ({cancel['setting']}, "
                f"{len(g)} samples) | p50 {pct(g, 0.5):,.0f} ms, max {max(g):,.0f} ms | | | | | |"
            )
    return lines


def target_table(data: dict[str, dict[str, Any]], backends: Sequence[str]) -> list[str]:
    ours = [f"blixard-{b}" for b in backends if f"blixard-{b}" in data]
    if not ours:
        return []
    per = {o: targets(data[o], data.get("celery"), data.get("pgqueuer")) for o in ours}
    head = "| | target | " + " | ".join(f"{LABEL[o]} | verdict" for o in ours) + " |"
    lines = [head, "|---|---|" + "---|---|" * len(ours)]
    for i, t in enumerate(per[ours[0]]):
        cells = []
        for o in ours:
            tt = per[o][i]
            cells += [tt.value, tt.verdict]
        lines.append(f"| {t.kind} | {t.text} | " + " | ".join(cells) + " |")
    return lines


def render(results: Path, backends: Sequence[str], since: float | None = None) -> str:
    data = load(results, backends)
    if not any(n.startswith("blixard") for n in data):
        return f"no Blixard results in {results}"
    ours = [d for n, d in data.items() if n.startswith("blixard")]
    newest = max(d["_mtime"] for d in ours)
    notes = []
    for p in PEERS:
        if p in data and newest - data[p]["_mtime"] > STALE_S:
            age = (newest - data[p]["_mtime"]) / 3600
            notes.append(
                f"NOTE: {p}'s results are {age:.0f} h older than Blixard's: another window of "
                "this shared machine, so the ratios mislead (run `make bench-peers`)."
            )
    n = ours[0]["n_jobs"]
    reps = ours[0]["reps"]
    out = [
        f"### Job queues end to end: N={n} no-op jobs, {reps} run(s) each, median "
        "[min-max] (results in " + str(results) + ")",
        "",
        *notes,
        *main_table(data),
        "",
        "#### Ratios",
        "",
        *ratio_table(data),
        "",
        "#### Blixard by setting (drain: first job started → last job started)",
        "",
        *detail_table(data),
        "",
        "#### Issue 16's targets (mock workers; the issue judges SQLite)",
        "",
        *target_table(data, backends),
    ]
    text = "\n".join(out) + "\n"
    (results / "summary-e2e.md").write_text(text)
    return text


# -- py-spy ----------------------------------------------------------------------------------


def top_frames(path: Path, limit: int = 12) -> str:
    """The busiest functions (own samples) of a py-spy ``--format raw`` file, by share, and
    the same samples grouped by the package or service module the function lives in."""
    own: Counter[str] = Counter()
    where: Counter[str] = Counter()
    inside: Counter[str] = Counter()  # samples with a Blixard function anywhere on the stack
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        total += int(count)
        frames = stack.split(";")
        own[frames[-1]] += int(count)
        where[frame_home(frames[-1])] += int(count)
        for name in {f.rpartition(":")[0] for f in frames if "services/" in f}:
            inside[name] += int(count)
    lines = [f"py-spy {path.name}: {total} samples (own time of the function on top)"]
    for frame, k in own.most_common(limit):
        lines.append(f"  {k / max(total, 1):6.1%}  {frame}")
    lines.append("  by where the code lives (own time):")
    for home, k in where.most_common(limit):
        lines.append(f"  {k / max(total, 1):6.1%}  {home}")
    lines.append(
        "  Blixard functions, with everything they call (a sample counts once per function):"
    )
    for name, k in inside.most_common(limit):
        lines.append(f"  {k / max(total, 1):6.1%}  {name})")
    return "\n".join(lines)


def frame_home(frame: str) -> str:
    """``name (path:line)`` -> the package (``sqlalchemy``), the service module
    (``services/jobs/store``) or the stdlib module the function lives in."""
    path = frame.rpartition(" (")[2].rstrip(")").rpartition(":")[0]
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    if "/services/" in path:
        path = "services/" + path.split("/services/", 1)[1]
    if path.startswith("services/"):
        return path.removesuffix(".py")
    if path.startswith("<frozen"):
        return "importlib"
    return path.split("/", 1)[0].removesuffix(".py") if path else frame
