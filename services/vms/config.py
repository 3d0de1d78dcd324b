"""VM service settings: ``VMS_*``, ``SKIP_VM_MANAGER`` and the suite-wide ``BLIXARD_*``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from services.common import config as common


@dataclass(frozen=True)
class VmsConfig:
    server: common.ServerSettings
    shared: common.SharedSettings
    manager: str
    skip_manager: bool


def load(environ: Mapping[str, str] | None = None) -> VmsConfig:
    environ = os.environ if environ is None else environ
    env = common.EnvReader("VMS_", environ)
    shared, shared_env = common.read_shared(environ)
    skip_env = common.EnvReader("SKIP_VM_", environ)
    server = common.read_server(env, default_port=50053)
    config = VmsConfig(
        server=server,
        shared=shared,
        manager=env.choice("MANAGER", "auto", ("auto", "qemu", "process", "none")),
        skip_manager=skip_env.flag("MANAGER", False),
    )
    common.check_auth_binding(env, server, shared.tokens)
    common.finish(env, shared_env, skip_env)
    return config
