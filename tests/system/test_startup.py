"""Operator mistakes end with one line naming the setting and a non-zero exit, no
traceback; SIGTERM stops every process cleanly with exit code 0."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from contextlib import closing
from pathlib import Path
from typing import Any

import grpc
import pytest
from blixard.queue.v1 import queue_service_pb2_grpc

from services.common.errors import InvalidArgument, abort
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


# ---- a schema from a newer release -------------------------------------------------------


def _database_at(path: Path, service: str, *revisions: str) -> str:
    """A SQLite database whose version table says ``revisions`` (as a newer release left it)."""
    with closing(sqlite3.connect(path)) as connection, connection:
        connection.execute(
            f"CREATE TABLE {service}_alembic_version (version_num VARCHAR(32) PRIMARY KEY)"
        )
        connection.executemany(
            f"INSERT INTO {service}_alembic_version VALUES (?)", [(r,) for r in revisions]
        )
    return f"sqlite:///{path}"


def _service_env(service: str, tmp_path: Path, url: str) -> dict[str, str]:
    prefix = SERVICES[service]
    env = {f"{prefix}GRPC_PORT": str(free_port()), f"{prefix}DATABASE_URL": url}
    if service == "vms":
        env.update(VMS_MANAGER="none", VMS_STATE_DIR=str(tmp_path / "vms"))
    return env


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_a_database_migrated_by_a_newer_release_is_one_line(service: str, tmp_path: Path) -> None:
    url = _database_at(tmp_path / "db.sqlite3", service, "9999_future")
    result = run_to_exit(f"services.{service}", _service_env(service, tmp_path, url))
    assert_one_line(
        result,
        f"{SERVICES[service]}DATABASE_URL",
        "'9999_future'",
        "newer than this release or unknown to it",
    )
    assert result.returncode == 1


def test_a_version_table_alembic_cannot_read_is_one_line(tmp_path: Path) -> None:
    url = _database_at(tmp_path / "db.sqlite3", "jobs", "9999_future", "9998_other")
    result = run_to_exit("services.jobs", _service_env("jobs", tmp_path, url))
    assert_one_line(result, "JOBS_DATABASE_URL", "cannot migrate the schema")
    assert result.returncode == 1


# ---- the worker's id and its registration ------------------------------------------------


def test_the_worker_rejects_a_malformed_id() -> None:
    result = run_to_exit(
        "services.worker",
        {"WORKER_ID": "my worker", "WORKER_QUEUE_ADDRESS": f"127.0.0.1:{free_port()}"},
        timeout=15,
    )
    assert_one_line(result, "WORKER_ID='my worker' is not a valid worker id")
    assert result.returncode == 2


@pytest.fixture(scope="module")
def guarded_queue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real queue service that wants tokens: worker ``w``, client ``c``, admin ``a``."""
    workdir = tmp_path_factory.mktemp("guarded-queue")
    port = free_port()
    process = start_service(
        "services.queue",
        {
            "QUEUE_GRPC_PORT": str(port),
            "QUEUE_DATABASE_URL": f"sqlite:///{workdir}/queue.sqlite3",
            "BLIXARD_WORKER_TOKEN": "w",
            "BLIXARD_CLIENT_TOKEN": "c",
            "BLIXARD_ADMIN_TOKEN": "a",
        },
        workdir / "log",
    )
    try:
        wait_healthy(f"127.0.0.1:{port}", process=process)
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(process)


@pytest.mark.parametrize(
    "token, code",
    [(None, "UNAUTHENTICATED"), ("nonsense", "UNAUTHENTICATED"), ("c", "PERMISSION_DENIED")],
)
def test_a_worker_the_queue_refuses_names_its_token(
    guarded_queue: str, token: str | None, code: str
) -> None:
    env = {"WORKER_QUEUE_ADDRESS": guarded_queue}
    if token is not None:
        env["BLIXARD_WORKER_TOKEN"] = token
    result = run_to_exit("services.worker", env, timeout=15)
    assert_one_line(result, "BLIXARD_WORKER_TOKEN", code, guarded_queue)
    assert result.returncode == 1


class _StricterQueue(queue_service_pb2_grpc.QueueServiceServicer):
    """A queue (of another release, say) that refuses this worker's id."""

    def RegisterWorker(self, request: Any, context: grpc.ServicerContext) -> Any:
        abort(
            context,
            InvalidArgument(
                "the request has 1 problem: worker_id: at most 8 characters",
                violations=[("worker_id", "at most 8 characters")],
            ),
        )


@pytest.fixture
def stricter_queue() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    queue_service_pb2_grpc.add_QueueServiceServicer_to_server(_StricterQueue(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_a_worker_registration_refused_as_invalid_names_the_setting(stricter_queue: str) -> None:
    result = run_to_exit(
        "services.worker",
        {"WORKER_QUEUE_ADDRESS": stricter_queue, "WORKER_ID": "a-long-worker-name"},
        timeout=15,
    )
    assert_one_line(result, "WORKER_ID", "INVALID_ARGUMENT", "worker_id: at most 8 characters")
    assert result.returncode == 1


# ---- peer addresses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "module, setting",
    [
        ("services.jobs", "JOBS_QUEUE_ADDRESS"),
        ("services.queue", "QUEUE_JOBS_ADDRESS"),
        ("services.worker", "WORKER_QUEUE_ADDRESS"),
        ("services.worker", "WORKER_JOBS_ADDRESS"),
        ("services.worker", "WORKER_VMS_ADDRESS"),
    ],
)
def test_a_malformed_peer_address_names_the_setting(
    module: str, setting: str, tmp_path: Path
) -> None:
    # Should it start after all: not on the default ports, nor on a real database.
    service = module.rsplit(".", 1)[1]
    if service in SERVICES:
        env = _service_env(service, tmp_path, f"sqlite:///{tmp_path}/db.sqlite3")
    else:
        env = {"WORKER_QUEUE_ADDRESS": f"127.0.0.1:{free_port()}"}
    env[setting] = "127.0.0.1:5OO52"  # letter O, not zero
    result = run_to_exit(module, env, timeout=15)
    assert_one_line(result, f"{setting}='127.0.0.1:5OO52' is not host:port", "'5OO52'")
    assert result.returncode == 2


def test_every_bad_worker_setting_is_named_at_once() -> None:
    result = run_to_exit(
        "services.worker",
        {
            "WORKER_ID": "my worker",
            "WORKER_QUEUE_ADDRESS": "queue",
            "WORKER_JOBS_ADDRESS": "::1:50051",
            "WORKER_VMS_ADDRESS": "unix:/run/vms.sock",
        },
        timeout=15,
    )
    assert_one_line(
        result,
        "WORKER_ID='my worker'",
        "WORKER_QUEUE_ADDRESS='queue' is not host:port (no port)",
        "WORKER_JOBS_ADDRESS='::1:50051' is not host:port (an IPv6 address goes in brackets",
        "WORKER_VMS_ADDRESS='unix:/run/vms.sock' is not host:port",
    )
    assert result.returncode == 2
