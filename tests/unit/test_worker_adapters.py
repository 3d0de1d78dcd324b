"""services.worker.adapters: the output tail, the mock adapter's rate, local processes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.worker.adapters import (
    TAIL_BYTES,
    MockAdapter,
    OutputTail,
    ProcessAdapter,
    StartFailed,
    Task,
)

# ---- OutputTail ---------------------------------------------------------------------------


@given(st.lists(st.binary(max_size=50), max_size=40), st.integers(1, 120))
def test_tail_keeps_exactly_the_last_limit_bytes(chunks: list[bytes], limit: int) -> None:
    """Any bytes, NUL and invalid UTF-8 included, come back as written."""
    tail = OutputTail(limit)
    for chunk in chunks:
        tail.add(chunk)
    data = b"".join(chunks)
    assert tail.total == len(data)
    assert tail.data() == data[-limit:]


def test_tail_default_limit_and_large_output() -> None:
    tail = OutputTail()
    assert tail.limit == TAIL_BYTES
    for i in range(100):
        tail.add(f"{i:04d}".encode() * 1024)  # 4 KiB per chunk
    assert tail.total == 400 * 1024
    kept = tail.data()
    assert len(kept) == TAIL_BYTES
    assert kept.endswith(b"0099") and kept.startswith(b"0084")


def test_tail_with_limit_zero_keeps_nothing() -> None:
    tail = OutputTail(0)
    tail.add(b"hello")
    assert tail.total == 5
    assert tail.data() == b""


# ---- MockAdapter --------------------------------------------------------------------------

TASK = Task(command=["true"], env={}, working_directory="")


def outcomes(adapter: MockAdapter, count: int) -> list[int | None]:
    codes = []
    for _ in range(count):
        execution = adapter.start(TASK)
        assert execution.wait(5)
        codes.append(execution.result().exit_code)
    return codes


def test_mock_failure_rate_is_a_rate() -> None:
    codes = outcomes(MockAdapter(delay=0.0, failure_rate=0.3, seed=1234), 2000)
    assert set(codes) == {0, 1}
    fraction = codes.count(1) / len(codes)
    assert 0.25 <= fraction <= 0.35, fraction


def test_mock_same_seed_same_sequence() -> None:
    first = outcomes(MockAdapter(0.0, 0.5, seed=7), 200)
    second = outcomes(MockAdapter(0.0, 0.5, seed=7), 200)
    other = outcomes(MockAdapter(0.0, 0.5, seed=8), 200)
    assert first == second
    assert first != other


@pytest.mark.parametrize(("rate", "code"), [(0.0, 0), (1.0, 1)])
def test_mock_rate_extremes(rate: float, code: int) -> None:
    assert set(outcomes(MockAdapter(0.0, rate, seed=3), 200)) == {code}


def test_mock_results_and_stop() -> None:
    ok = MockAdapter(0.0, 0.0, seed=0).start(TASK)
    assert ok.wait(5)
    assert (ok.result().exit_code, ok.result().output_tail, ok.result().error) == (
        0,
        b"mock success\n",
        "",
    )
    failed = MockAdapter(0.0, 1.0, seed=0).start(TASK)
    assert failed.wait(5)
    assert (failed.result().exit_code, failed.result().error) == (1, "mock failure")

    slow = MockAdapter(delay=60.0, failure_rate=0.0, seed=0).start(TASK)
    assert not slow.wait(0.05)
    slow.stop(grace=1.0)
    assert slow.wait(0)
    assert (slow.result().exit_code, slow.result().error) == (137, "stopped")


# ---- ProcessAdapter -----------------------------------------------------------------------


def run(command: list[str], **task: object) -> tuple[int | None, bytes, str, int]:
    execution = ProcessAdapter().start(
        Task(command=command, env=task.get("env", {}), working_directory=task.get("cwd", ""))  # type: ignore[arg-type]
    )
    assert execution.wait(30)
    result = execution.result()
    return result.exit_code, result.output_tail, result.error, result.total_bytes


def test_process_exit_code() -> None:
    assert run(["sh", "-c", "exit 3"])[:3] == (3, b"", "")
    assert run(["true"])[0] == 0


def test_process_output_is_captured_with_stderr() -> None:
    code, tail, _, total = run(["sh", "-c", "printf out; printf err >&2"])
    assert code == 0
    assert sorted([tail[:3], tail[3:]]) == [b"err", b"out"]
    assert total == 6


def test_process_env_is_only_the_base_and_the_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIXARD_TEST_SECRET", "leak")
    _, tail, _, _ = run(
        ["sh", "-c", 'echo "[$GREETING][$BLIXARD_TEST_SECRET]"'], env={"GREETING": "hi"}
    )
    assert tail == b"[hi][]\n"


def test_process_working_directory(tmp_path: Path) -> None:
    _, tail, _, _ = run(["pwd"], cwd=str(tmp_path))
    assert tail.strip() == str(tmp_path.resolve()).encode()


def test_process_that_cannot_start() -> None:
    with pytest.raises(StartFailed, match="no-such-program-xyz"):
        ProcessAdapter().start(Task(["no-such-program-xyz"], {}, ""))
    with pytest.raises(StartFailed):
        ProcessAdapter().start(Task(["true"], {}, "/no/such/directory"))


def gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_until(condition, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def group_alive(pgid: int) -> bool:
    """True while any process of the group runs (zombies do not count)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def test_stop_ends_a_long_process_politely() -> None:
    execution = ProcessAdapter().start(Task(["sleep", "300"], {}, ""))
    pid = execution.process.pid  # type: ignore[attr-defined]
    assert not execution.wait(0.1)
    started = time.monotonic()
    execution.stop(grace=5.0)
    assert time.monotonic() - started < 4.0
    assert execution.wait(0)
    result = execution.result()
    assert (result.exit_code, result.error) == (143, "killed by SIGTERM")
    assert not group_alive(pid)


def test_stop_kills_a_process_group_that_ignores_sigterm() -> None:
    script = 'trap "" TERM; sleep 300 & echo $!; wait'
    execution = ProcessAdapter().start(Task(["sh", "-c", script], {}, ""))
    pid = execution.process.pid  # type: ignore[attr-defined]
    assert wait_until(lambda: execution.tail.data().strip().isdigit())  # type: ignore[attr-defined]
    child = int(execution.tail.data())  # type: ignore[attr-defined]
    execution.stop(grace=0.3)
    result = execution.result()
    assert (result.exit_code, result.error) == (137, "killed by SIGKILL")
    assert wait_until(lambda: gone(child))
    assert wait_until(lambda: not group_alive(pid))


def test_stop_kills_children_that_outlive_their_leader() -> None:
    script = '(trap "" TERM; exec sleep 300) & echo $!; exec sleep 300'
    execution = ProcessAdapter().start(Task(["sh", "-c", script], {}, ""))
    pid = execution.process.pid  # type: ignore[attr-defined]
    assert wait_until(lambda: execution.tail.data().strip().isdigit())  # type: ignore[attr-defined]
    child = int(execution.tail.data())  # type: ignore[attr-defined]
    started = time.monotonic()
    execution.stop(grace=5.0)
    assert time.monotonic() - started < 4.0
    assert execution.result().exit_code == 143
    assert wait_until(lambda: gone(child))
    assert wait_until(lambda: not group_alive(pid))
