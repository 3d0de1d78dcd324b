"""VM service settings: ``VMS_*``, ``SKIP_VM_MANAGER`` and the suite-wide ``BLIXARD_*``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.common import config as common
from services.vms.manager import MIN_MEMORY_MB, Limits

MANAGERS = ("auto", "qemu", "process", "none")
ACCELERATORS = ("auto", "kvm", "tcg")


@dataclass(frozen=True)
class VmsConfig:
    server: common.ServerSettings
    shared: common.SharedSettings
    manager: str
    skip_manager: bool
    database_url: str
    state_dir: Path
    image_dir: Path
    accel: str
    limits: Limits


def load(environ: Mapping[str, str] | None = None) -> VmsConfig:
    environ = os.environ if environ is None else environ
    env = common.EnvReader("VMS_", environ)
    shared, shared_env = common.read_shared(environ)
    skip_env = common.EnvReader("SKIP_VM_", environ)
    server = common.read_server(env, default_port=50053)
    max_vms = env.integer("MAX_VMS", 4, minimum=1, maximum=1024)
    max_vcpus = env.integer("MAX_VCPUS", max(1, os.cpu_count() or 1), minimum=1, maximum=256)
    max_memory = env.integer("MAX_MEMORY_MB", 2048, minimum=MIN_MEMORY_MB, maximum=1 << 20)
    limits = Limits(
        max_vms=max_vms,
        default_vcpus=env.integer("DEFAULT_VCPUS", 1, minimum=1, maximum=256),
        default_memory_mb=env.integer(
            "DEFAULT_MEMORY_MB", 256, minimum=MIN_MEMORY_MB, maximum=1 << 20
        ),
        max_vcpus=max_vcpus,
        max_memory_mb=max_memory,
        pre_warm_count=env.integer("PRE_WARM_COUNT", 1, minimum=0, maximum=1024),
        reuse_jobs=env.integer("REUSE_JOBS", 1, minimum=1, maximum=1_000_000),
        max_uptime=env.number("MAX_UPTIME", 3600.0, minimum=0.0, maximum=365 * 86400.0),
        boot_timeout=env.number("BOOT_TIMEOUT", 60.0, minimum=1.0, maximum=3600.0),
        ping_interval=env.number("PING_INTERVAL", 5.0, minimum=0.05, maximum=3600.0),
        ping_failures=env.integer("PING_FAILURES", 3, minimum=1, maximum=1000),
        stop_timeout=env.number("STOP_TIMEOUT", 10.0, minimum=0.0, maximum=3600.0),
    )
    config = VmsConfig(
        server=server,
        shared=shared,
        manager=env.choice("MANAGER", "auto", MANAGERS),
        skip_manager=skip_env.flag("MANAGER", False),
        database_url=common.database_url(env, "vms"),
        state_dir=Path(env.text("STATE_DIR", "var/vms")).absolute(),
        image_dir=Path(env.text("IMAGE_DIR", "var/vm-image")).absolute(),
        accel=env.choice("ACCEL", "auto", ACCELERATORS),
        limits=limits,
    )
    if limits.pre_warm_count > limits.max_vms:
        env.problems.append(
            f"VMS_PRE_WARM_COUNT={limits.pre_warm_count} is above VMS_MAX_VMS={limits.max_vms}"
        )
    if limits.default_vcpus > limits.max_vcpus:
        env.problems.append(
            f"VMS_DEFAULT_VCPUS={limits.default_vcpus} is above VMS_MAX_VCPUS={limits.max_vcpus}"
        )
    if limits.default_memory_mb > limits.max_memory_mb:
        env.problems.append(
            f"VMS_DEFAULT_MEMORY_MB={limits.default_memory_mb} is above "
            f"VMS_MAX_MEMORY_MB={limits.max_memory_mb}"
        )
    common.check_auth_binding(env, server, shared.tokens)
    common.finish(env, shared_env, skip_env)
    return config
