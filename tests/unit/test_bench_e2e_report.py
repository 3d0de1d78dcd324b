"""bench/e2e_report.py: the issue 16 targets are judged from the peers' JSON schema."""

from __future__ import annotations

from typing import Any

from bench.e2e import Setting
from bench.e2e_report import figures, pct, targets


def result(enqueue: float, drain: float, ran_ms: list[float], **extra: Any) -> dict[str, Any]:
    run = {"enqueue_rate": enqueue, "drain_rate": drain}
    return {
        "settings": {"a": {"runs": [run]}, "slow": {"runs": [{**run, "drain_rate": drain / 2}]}},
        "latency": {"setting": "x", "runs": [{"ran_ms": ran_ms, "done_ms": ran_ms}]},
        **extra,
    }


def blixard(**extra: Any) -> dict[str, Any]:
    cpu = {"enqueue": {"jobs": 60.0, "queue": 20.0}, "drain": {"jobs": 50.0, "workers": 20.0}}
    data = result(400.0, 500.0, [10.0, 12.0, 14.0], **extra)
    for s in data["settings"].values():
        s["runs"][0]["cpu_us_per_job"] = cpu
    return data


def verdicts(found: list[Any]) -> dict[str, bool | None]:
    return {t.text: t.met for t in found}


def test_the_peers_percentile() -> None:
    assert pct([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert pct([5.0], 0.99) == 5.0


def test_best_drain_setting_and_cpu_of_every_process() -> None:
    f = figures(blixard())
    assert (f.best, f.drain_med) == ("a", 500.0)
    assert f.cpu_us == [150.0]
    assert f.started_p50() == 12.0


def test_targets_against_celery_and_pgqueuer() -> None:
    celery = result(700.0, 450.0, [4.0, 5.0, 6.0])
    pgqueuer = result(900.0, 3700.0, [3.0])
    got = verdicts(targets(blixard(bulk_enqueue={"rates": [6000.0]}), celery, pgqueuer))
    assert got["drain ≥ Celery's"] is True  # 500 >= 450
    assert got["single enqueue ≥ 0.5x Celery's"] is True  # 400 >= 350
    assert got["single enqueue ≥ Celery's"] is False
    assert got["submit→started p50 ≤ 3x Celery's"] is True  # 12 <= 15
    assert got["submit→started p50 ≤ 2x Celery's"] is False  # 12 > 10
    assert got["bulk ≥ 5,000 jobs/s"] is True
    assert got["bulk ≥ 15,000 jobs/s"] is False
    assert got["drain ≥ PgQueuer's"] is False
    assert got["all processes ≤ 250 µs CPU per no-op job"] is True
    assert got["≤ 100 µs CPU per job"] is False


def test_without_peer_results_the_ratio_targets_are_not_judged() -> None:
    got = verdicts(targets(blixard(), None, None))
    assert got["drain ≥ Celery's"] is None
    assert got["bulk ≥ 5,000 jobs/s"] is None  # no bulk figure at all
    assert got["cancel → process gone ≤ 1 s"] is None


def test_true_commands_against_the_fork_exec_loop() -> None:
    true = {
        "workers": 2,
        "slots": 16,
        "runs": [{"drain_rate": 850.0}],
        "fork_exec_baseline": {"drain_rate": 1000.0},
    }
    got = verdicts(targets(blixard(true_commands={"true-2x16": true}), None, None))
    assert got["`true` ≥ 80% of a bare fork/exec loop"] is True


def test_setting_names() -> None:
    assert Setting.parse("true-2x16") == Setting("true-2x16", "process", 2, 16)
    assert Setting.parse("mock-1x2").worker_type == "mock"
