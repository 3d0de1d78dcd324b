"""Queue service settings: ``QUEUE_*`` and the suite-wide ``BLIXARD_*``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.common import config as common
from services.queue.domain import RetryPolicy


@dataclass(frozen=True)
class QueueConfig:
    server: common.ServerSettings
    shared: common.SharedSettings
    database_url: str
    jobs_address: str
    retry: RetryPolicy
    reap_interval: float
    worker_timeout: float
    cache_sync_interval: float
    worker_retention: float


def load(environ: Mapping[str, str] | None = None) -> QueueConfig:
    env = common.EnvReader("QUEUE_", environ)
    shared, shared_env = common.read_shared(environ)
    server = common.read_server(env, default_port=50052)
    config = QueueConfig(
        server=server,
        shared=shared,
        database_url=common.database_url(env, "queue"),
        jobs_address=env.address("JOBS_ADDRESS", "127.0.0.1:50051"),
        retry=RetryPolicy(
            default_max_attempts=env.integer("DEFAULT_MAX_ATTEMPTS", 3, minimum=1, maximum=100),
            base_seconds=env.number("RETRY_BASE_SECONDS", 1.0, minimum=0.0, maximum=3600.0),
            cap_seconds=env.number("RETRY_CAP_SECONDS", 300.0, minimum=0.0, maximum=86400.0),
        ),
        reap_interval=env.number("REAP_INTERVAL", 1.0, minimum=0.05, maximum=600.0),
        worker_timeout=env.number("WORKER_TIMEOUT", 30.0, minimum=1.0, maximum=86400.0),
        cache_sync_interval=env.number("CACHE_SYNC_INTERVAL", 30.0, minimum=1.0, maximum=86400.0),
        # Seconds a worker may stay offline before it is deleted (0: kept for ever).
        worker_retention=env.number(
            "WORKER_RETENTION", 7 * 86400.0, minimum=0.0, maximum=10 * 365 * 86400.0
        ),
    )
    if config.retry.base_seconds > config.retry.cap_seconds:
        env.problems.append(
            f"QUEUE_RETRY_BASE_SECONDS={config.retry.base_seconds:g} is above "
            f"QUEUE_RETRY_CAP_SECONDS={config.retry.cap_seconds:g}"
        )
    common.check_auth_binding(env, server, shared.tokens)
    common.finish(env, shared_env)
    return config
