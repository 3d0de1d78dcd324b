"""Operator mistakes end with one line naming the setting and a non-zero exit, no
traceback; SIGTERM stops every process cleanly with exit code 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.deployment import ROOT, start_service, stop_process, wait_healthy

SERVICES = {"jobs": "JOBS_", "queue": "QUEUE_", "vms": "VMS_"}


def run_to_exit(
    module: str, env: dict[str, str], timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JOBS_", "QUEUE_", "VMS_", "WORKER_", "BLIXARD_"))
    }
    return subprocess.run(
        [sys.executable, "-m", module],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_a_malformed_port_names_the_setting(service: str, tmp_path: Path) -> None:
    prefix = SERVICES[service]
    result = run_to_exit(f"services.{service}", {f"{prefix}GRPC_PORT": "fifty"})
    assert_one_line(result, f"{prefix}GRPC_PORT", "not an integer")
    assert result.returncode == 2


def test_every_problem_is_named_at_once() -> None:
    result = run_to_exit(
        "services.jobs",
        {
            "JOBS_GRPC_PORT": "99999",
            "JOBS_DATABSE_URL": "sqlite:///x.db",
            "BLIXARD_LOG_LEVEL": "loud",
        },
    )
    assert_one_line(
        result,
        "JOBS_GRPC_PORT=99999 is above the maximum 65535",
        "JOBS_DATABSE_URL is not a known setting",
        "BLIXARD_LOG_LEVEL",
    )


def test_the_worker_rejects_an_unknown_type() -> None:
    result = run_to_exit("services.worker", {"WORKER_TYPE": "gpu"})
    assert_one_line(result, "WORKER_TYPE='gpu' is not one of")


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_a_port_in_use_is_one_line(service: str, busy_port: int, tmp_path: Path) -> None:
    prefix = SERVICES[service]
    env = {
        f"{prefix}GRPC_PORT": str(busy_port),
        f"{prefix}DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3",
    }
    if service == "vms":
        env.pop("VMS_DATABASE_URL")
    result = run_to_exit(f"services.{service}", env)
    assert_one_line(result, f"{prefix}GRPC_PORT", str(busy_port), "in use")
    assert result.returncode == 1


@pytest.mark.parametrize(
    "url, cause",
    [
        ("postgresql://blixard:secret@127.0.0.1:{port}/jobs", "cannot open the database"),
        ("sqlite:////proc/no-such-dir/jobs.sqlite3", "JOBS_DATABASE_URL"),
        ("mysql://x@y/z", "unsupported database"),
        ("not a url", "is not a database URL"),
    ],
)
def test_a_database_that_cannot_be_opened_is_one_line(url: str, cause: str) -> None:
    result = run_to_exit(
        "services.jobs",
        {"JOBS_GRPC_PORT": str(free_port()), "JOBS_DATABASE_URL": url.format(port=free_port())},
    )
    assert_one_line(result, "JOBS_DATABASE_URL", cause)
    assert "secret" not in result.stderr


def test_a_public_bind_without_tokens_is_refused() -> None:
    result = run_to_exit(
        "services.queue", {"QUEUE_GRPC_HOST": "0.0.0.0", "QUEUE_GRPC_PORT": str(free_port())}
    )
    assert_one_line(result, "QUEUE_GRPC_HOST=0.0.0.0", "BLIXARD_ADMIN_TOKEN")


@pytest.mark.parametrize("service", ["jobs", "queue", "vms"])
def test_sigterm_stops_a_service_with_exit_code_zero(service: str, tmp_path: Path) -> None:
    prefix = SERVICES[service]
    port = free_port()
    env = {f"{prefix}GRPC_PORT": str(port)}
    env[f"{prefix}DATABASE_URL"] = f"sqlite:///{tmp_path}/db.sqlite3"
    if service == "vms":  # no microVM booting here (that shutdown is tests/system/test_vm_qemu)
        env.update(VMS_MANAGER="none", VMS_STATE_DIR=str(tmp_path / "vms"))
    process = start_service(f"services.{service}", env, tmp_path / "log")
    try:
        wait_healthy(f"127.0.0.1:{port}", process=process)
    finally:
        code = stop_process(process, timeout=30)
    assert code == 0, (tmp_path / "log").read_text()
    assert "Traceback" not in (tmp_path / "log").read_text()


def test_sigterm_stops_an_idle_worker_with_exit_code_zero(tmp_path: Path) -> None:
    # No queue listens there: the worker keeps retrying with backoff, and still stops.
    process = start_service(
        "services.worker", {"WORKER_QUEUE_ADDRESS": f"127.0.0.1:{free_port()}"}, tmp_path / "log"
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=2)  # it does not give up on its own
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    finally:
        stop_process(process)
    assert code == 0, (tmp_path / "log").read_text()
