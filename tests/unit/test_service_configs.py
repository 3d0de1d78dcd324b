"""Each service's config loader over a dict environment: defaults, and one-line errors."""

from __future__ import annotations

import pytest

from services.common.config import ConfigError, ServerSettings, Tokens
from services.common.jobspec import is_valid_id
from services.jobs import config as jobs_config
from services.queue import config as queue_config
from services.queue.domain import RetryPolicy
from services.vms import config as vms_config
from services.worker import config as worker_config

ALL_TOKENS = {
    "BLIXARD_CLIENT_TOKEN": "c",
    "BLIXARD_WORKER_TOKEN": "w",
    "BLIXARD_ADMIN_TOKEN": "a",
}


def one_line_error(load, environ: dict[str, str]) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as caught:
        load(environ)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---- jobs --------------------------------------------------------------------------------


def test_jobs_defaults() -> None:
    config = jobs_config.load({})
    assert config.server == ServerSettings("127.0.0.1", 50051, 10.0)
    assert config.database_url == "sqlite:///var/jobs.sqlite3"
    assert config.queue_address == "127.0.0.1:50052"
    assert config.shared.tokens == Tokens()
    assert config.shared.log_level == "info"


def test_jobs_values() -> None:
    config = jobs_config.load(
        {
            "JOBS_GRPC_PORT": "6000",
            "JOBS_DATABASE_URL": "postgresql://db/jobs",
            "JOBS_QUEUE_ADDRESS": "queue:50052",
            "JOBS_SHUTDOWN_GRACE": "2.5",
            "QUEUE_GRPC_PORT": "not read by jobs",
        }
    )
    assert config.server.port == 6000
    assert config.server.grace_seconds == 2.5
    assert config.database_url == "postgresql://db/jobs"
    assert config.queue_address == "queue:50052"


def test_jobs_errors_name_every_setting_in_one_line() -> None:
    message = one_line_error(
        jobs_config.load,
        {
            "JOBS_GRPC_PORT": "abc",
            "JOBS_DATABSE_URL": "sqlite://",
            "BLIXARD_LOG_LEVEL": "loud",
            "JOBS_SHUTDOWN_GRACE": "-1",
        },
    )
    assert "JOBS_GRPC_PORT='abc' is not an integer" in message
    assert "JOBS_DATABSE_URL is not a known setting" in message
    assert "BLIXARD_LOG_LEVEL='loud'" in message
    assert "JOBS_SHUTDOWN_GRACE" in message


def test_jobs_public_bind_needs_tokens() -> None:
    message = one_line_error(jobs_config.load, {"JOBS_GRPC_HOST": "0.0.0.0"})
    assert "JOBS_GRPC_HOST=0.0.0.0" in message
    assert "BLIXARD_CLIENT_TOKEN" in message

    config = jobs_config.load({"JOBS_GRPC_HOST": "0.0.0.0", **ALL_TOKENS})
    assert config.server.host == "0.0.0.0"
    assert config.shared.tokens == Tokens("c", "w", "a")


# ---- queue -------------------------------------------------------------------------------


def test_queue_defaults() -> None:
    config = queue_config.load({})
    assert config.server == ServerSettings("127.0.0.1", 50052, 10.0, threads=256)
    assert config.database_url == "sqlite:///var/queue.sqlite3"
    assert config.jobs_address == "127.0.0.1:50051"
    assert config.retry == RetryPolicy(3, 1.0, 300.0)
    assert config.reap_interval == 1.0
    assert config.worker_timeout == 30.0


def test_queue_values() -> None:
    config = queue_config.load(
        {
            "QUEUE_DEFAULT_MAX_ATTEMPTS": "5",
            "QUEUE_RETRY_BASE_SECONDS": "0.5",
            "QUEUE_RETRY_CAP_SECONDS": "60",
            "QUEUE_REAP_INTERVAL": "0.05",
            "QUEUE_WORKER_TIMEOUT": "90",
            "QUEUE_GRPC_THREADS": "64",
        }
    )
    assert config.server.threads == 64
    assert config.retry == RetryPolicy(5, 0.5, 60.0)
    assert config.reap_interval == 0.05
    assert config.worker_timeout == 90.0


def test_queue_errors_name_every_setting_in_one_line() -> None:
    message = one_line_error(
        queue_config.load,
        {
            "QUEUE_DEFAULT_MAX_ATTEMPTS": "0",
            "QUEUE_REAP_INTERVAL": "0.01",
            "QUEUE_RETRY_CAP_SECONDS": "soon",
            "QUEUE_GRPC_HOST": "0.0.0.0",
            "QUEUE_MAX_ATTEMPTS": "3",
            "QUEUE_GRPC_THREADS": "4",
        },
    )
    assert "QUEUE_GRPC_THREADS=4 is below the minimum 8" in message
    assert "QUEUE_DEFAULT_MAX_ATTEMPTS=0 is below the minimum 1" in message
    assert "QUEUE_REAP_INTERVAL=0.01 is below the minimum 0.05" in message
    assert "QUEUE_RETRY_CAP_SECONDS='soon' is not a number" in message
    assert "QUEUE_GRPC_HOST=0.0.0.0" in message and "BLIXARD_ADMIN_TOKEN" in message
    assert "QUEUE_MAX_ATTEMPTS is not a known setting" in message


# ---- vms ---------------------------------------------------------------------------------


def test_vms_defaults() -> None:
    config = vms_config.load({})
    assert config.server == ServerSettings("127.0.0.1", 50053, 10.0)
    assert config.manager == "auto"
    assert config.skip_manager is False


def test_vms_values() -> None:
    config = vms_config.load({"VMS_MANAGER": "QEMU", "SKIP_VM_MANAGER": "1"})
    assert config.manager == "qemu"
    assert config.skip_manager is True


def test_vms_errors_name_every_setting_in_one_line() -> None:
    message = one_line_error(
        vms_config.load,
        {"VMS_MANAGER": "firecracker", "SKIP_VM_MANAGER": "maybe", "SKIP_VM_MANAGR": "1"},
    )
    assert "VMS_MANAGER='firecracker' is not one of auto, qemu, process, none" in message
    assert "SKIP_VM_MANAGER='maybe' is not a boolean" in message
    assert "SKIP_VM_MANAGR is not a known setting" in message


# ---- worker ------------------------------------------------------------------------------


def test_worker_defaults() -> None:
    config = worker_config.load({})
    assert config.worker_id
    assert config.worker_type == "process"
    assert config.slots == 2
    assert config.queue_address == "127.0.0.1:50052"
    assert config.lease_seconds == 30.0
    assert config.heartbeat_interval == 10.0
    assert config.poll_wait == 10.0
    assert config.drain_grace == 30.0
    assert config.default_timeout == 3600.0
    assert config.kill_grace == 5.0
    assert (config.mock_delay, config.mock_failure_rate, config.mock_seed) == (0.0, 0.0, 0)


def test_worker_default_ids_differ() -> None:
    assert worker_config.load({}).worker_id != worker_config.load({}).worker_id


def test_worker_values() -> None:
    config = worker_config.load(
        {
            "WORKER_ID": "w-1",
            "WORKER_TYPE": "Mock",
            "WORKER_SLOTS": "8",
            "WORKER_LEASE_SECONDS": "6",
            "WORKER_MOCK_FAILURE_RATE": "0.3",
            "WORKER_MOCK_SEED": "42",
        }
    )
    assert config.worker_id == "w-1"
    assert config.worker_type == "mock"
    assert config.slots == 8
    assert config.heartbeat_interval == 2.0
    assert config.mock_failure_rate == 0.3
    assert config.mock_seed == 42


def test_worker_errors_name_every_setting_in_one_line() -> None:
    message = one_line_error(
        worker_config.load,
        {
            "WORKER_SLOTS": "0",
            "WORKER_MOCK_FAILURE_RATE": "1.5",
            "WORKER_TYPE": "docker",
            "WORKER_LEASE": "30",
            "BLIXARD_TRACES": "jaeger",
        },
    )
    assert "WORKER_SLOTS=0 is below the minimum 1" in message
    assert "WORKER_MOCK_FAILURE_RATE=1.5 is above the maximum 1.0" in message
    assert "WORKER_TYPE='docker' is not one of process, mock" in message
    assert "WORKER_LEASE is not a known setting" in message
    assert "BLIXARD_TRACES='jaeger'" in message


# ---- peer addresses and the worker's id --------------------------------------------------


@pytest.mark.parametrize(
    ("load", "setting"),
    [
        (jobs_config.load, "JOBS_QUEUE_ADDRESS"),
        (queue_config.load, "QUEUE_JOBS_ADDRESS"),
        (worker_config.load, "WORKER_QUEUE_ADDRESS"),
        (worker_config.load, "WORKER_JOBS_ADDRESS"),
        (worker_config.load, "WORKER_VMS_ADDRESS"),
    ],
)
def test_a_peer_address_must_be_host_and_port(load, setting: str) -> None:  # type: ignore[no-untyped-def]
    message = one_line_error(load, {setting: "127.0.0.1:5OO52"})
    assert (
        message
        == f"{setting}='127.0.0.1:5OO52' is not host:port (the port '5OO52' is not a number)"
    )
    assert load({setting: "[::1]:50099"}) is not None


def test_worker_bad_addresses_and_id_are_named_at_once() -> None:
    message = one_line_error(
        worker_config.load,
        {
            "WORKER_ID": "my worker",
            "WORKER_QUEUE_ADDRESS": "queue:0",
            "WORKER_JOBS_ADDRESS": "jobs",
            "WORKER_SLOTS": "none",
        },
    )
    assert "WORKER_ID='my worker' is not a valid worker id: letters, digits and ._:@-" in message
    assert "WORKER_QUEUE_ADDRESS='queue:0' is not host:port (the port 0 is not" in message
    assert "WORKER_JOBS_ADDRESS='jobs' is not host:port (no port)" in message
    assert "WORKER_SLOTS='none' is not an integer" in message


@pytest.mark.parametrize("worker_id", ["my worker", "-w", "w/1", "w" * 129, "wörker"])
def test_worker_id_follows_the_queues_rule(worker_id: str) -> None:
    message = one_line_error(worker_config.load, {"WORKER_ID": worker_id})
    assert message.startswith(f"WORKER_ID={worker_id!r} is not a valid worker id")


@pytest.mark.parametrize("worker_id", ["w", "w-1", "host.example:42@a_b", "W" * 128])
def test_worker_ids_the_queue_takes_are_taken(worker_id: str) -> None:
    assert worker_config.load({"WORKER_ID": worker_id}).worker_id == worker_id


@pytest.mark.parametrize("hostname", ["", "-odd host name-", "h" * 300, "node_1.example.org"])
def test_the_default_worker_id_passes_the_queues_rule(
    hostname: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_config.socket, "gethostname", lambda: hostname)
    worker_id = worker_config.load({}).worker_id
    assert is_valid_id(worker_id), worker_id
