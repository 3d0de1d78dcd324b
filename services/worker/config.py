"""Worker settings: ``WORKER_*`` and the suite-wide ``BLIXARD_*``."""

from __future__ import annotations

import os
import re
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from services.common import config as common
from services.common.jobspec import ID_RULE, MAX_ID, is_valid_id
from services.worker.tracker import TrackerLimits

WORKER_TYPES = ("process", "mock", "vm")
DAY = 86400.0


@dataclass(frozen=True)
class WorkerConfig:
    shared: common.SharedSettings
    worker_id: str
    worker_type: str
    slots: int
    queue_address: str
    jobs_address: str
    vms_address: str
    lease_seconds: float
    poll_wait: float
    drain_grace: float
    default_timeout: float
    kill_grace: float
    mock_delay: float
    mock_failure_rate: float
    mock_seed: int
    tracker: TrackerLimits

    @property
    def heartbeat_interval(self) -> float:
        return self.lease_seconds / 3


def _default_id() -> str:
    """host-pid-random, the host name cut down to what a worker id may hold."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:100].strip("._-")
    return f"{host or 'worker'}-{os.getpid()}-{secrets.token_hex(2)}"


def _worker_id(env: common.EnvReader) -> str:
    """WORKER_ID, checked by the queue's own rule: one it would refuse is a config error
    here, not a registration retried for ever."""
    worker_id = env.text("ID", "")
    if not worker_id:
        return _default_id()
    if not is_valid_id(worker_id):
        env.problems.append(
            f"WORKER_ID={worker_id!r} is not a valid worker id: {ID_RULE.format(MAX_ID)}"
        )
    return worker_id


def load(environ: Mapping[str, str] | None = None) -> WorkerConfig:
    environ = os.environ if environ is None else environ
    env = common.EnvReader("WORKER_", environ)
    shared, shared_env = common.read_shared(environ)
    config = WorkerConfig(
        shared=shared,
        worker_id=_worker_id(env),
        worker_type=env.choice("TYPE", "process", WORKER_TYPES),
        slots=env.integer("SLOTS", 2, minimum=1, maximum=256),
        queue_address=env.address("QUEUE_ADDRESS", "127.0.0.1:50052"),
        jobs_address=env.address("JOBS_ADDRESS", "127.0.0.1:50051"),
        vms_address=env.address("VMS_ADDRESS", "127.0.0.1:50053"),
        lease_seconds=env.number("LEASE_SECONDS", 30.0, minimum=1.0, maximum=3600.0),
        poll_wait=env.number("POLL_WAIT", 10.0, minimum=0.0, maximum=60.0),
        drain_grace=env.number("DRAIN_GRACE", 30.0, minimum=0.0, maximum=86400.0),
        default_timeout=env.number("DEFAULT_TIMEOUT", 3600.0, minimum=1.0, maximum=7 * 86400.0),
        kill_grace=env.number("KILL_GRACE", 5.0, minimum=0.0, maximum=600.0),
        mock_delay=env.number("MOCK_DELAY", 0.0, minimum=0.0, maximum=3600.0),
        mock_failure_rate=env.number("MOCK_FAILURE_RATE", 0.0, minimum=0.0, maximum=1.0),
        mock_seed=env.integer("MOCK_SEED", 0),
        tracker=TrackerLimits(
            max_entries=env.integer("TRACKER_MAX_ENTRIES", 10_000, minimum=1, maximum=10_000_000),
            ttl_completed=env.number("TRACKER_TTL_COMPLETED", DAY, minimum=0.0, maximum=365 * DAY),
            ttl_failed=env.number("TRACKER_TTL_FAILED", DAY, minimum=0.0, maximum=365 * DAY),
            ttl_cancelled=env.number(
                "TRACKER_TTL_CANCELLED", 3600.0, minimum=0.0, maximum=365 * DAY
            ),
            cleanup_interval=env.number(
                "TRACKER_CLEANUP_INTERVAL", 3600.0, minimum=0.01, maximum=DAY
            ),
        ),
    )
    common.finish(env, shared_env)
    return config
