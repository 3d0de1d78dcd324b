"""Jobs service settings: ``JOBS_*`` and the suite-wide ``BLIXARD_*``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.common import config as common


@dataclass(frozen=True)
class JobsConfig:
    server: common.ServerSettings
    shared: common.SharedSettings
    database_url: str
    queue_address: str
    cancel_timeout: float


def load(environ: Mapping[str, str] | None = None) -> JobsConfig:
    env = common.EnvReader("JOBS_", environ)
    shared, shared_env = common.read_shared(environ)
    server = common.read_server(env, default_port=50051)
    config = JobsConfig(
        server=server,
        shared=shared,
        database_url=common.database_url(env, "jobs"),
        queue_address=env.address("QUEUE_ADDRESS", "127.0.0.1:50052"),
        # How long CancelJob waits for the queue to confirm (then the outbox sends it).
        cancel_timeout=env.number("CANCEL_TIMEOUT", 1.0, minimum=0.05, maximum=30.0),
    )
    common.check_auth_binding(env, server, shared.tokens)
    common.finish(env, shared_env)
    return config
