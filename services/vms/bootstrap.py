"""The one place that wires the VM service: engine -> store -> backend -> manager -> servicer.

The service always starts. When the configured backend cannot run here (no QEMU, no
guest image, no guest boots, the state directory taken by another service) it runs with
``NoManager``: every VM call answers UNAVAILABLE and health says NOT_SERVING for the VM
service, with the reason in GetManagerInfo.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from blixard.vms.v1 import vm_service_pb2_grpc as pb_grpc

from services.common import db, migrations, server
from services.common.clock import SYSTEM_CLOCK, Clock
from services.vms.backend import Backend, Step, no_faults
from services.vms.config import VmsConfig
from services.vms.manager import NoManager, PoolManager, StateDirBusy, VmManager
from services.vms.process_backend import ProcessBackend
from services.vms.qemu import QEMU, Image, QemuBackend
from services.vms.servicer import POLICY, SERVICE_NAME, VmServicer
from services.vms.store import VmStore

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"


def choose_backend(config: VmsConfig) -> Backend | str:
    """The backend the settings ask for, or why there is none."""
    if config.skip_manager:
        return "SKIP_VM_MANAGER=1 is set"
    if config.manager == "none":
        return "VMS_MANAGER=none is set"
    image = Image(config.image_dir)
    if config.manager == "process":
        return ProcessBackend(image.agent)
    if config.manager == "auto" and shutil.which(QEMU) is None:
        return (
            f"VMS_MANAGER=auto found no {QEMU} on this machine (apt-get install "
            f"qemu-system-x86; or VMS_MANAGER=process runs VM jobs as local processes)"
        )
    return QemuBackend(image, accel=config.accel, state_dir=config.state_dir)


def build_manager(
    config: VmsConfig,
    store: VmStore,
    *,
    clock: Clock = SYSTEM_CLOCK,
    backend: Backend | None = None,
    faults: Step = no_faults,
) -> VmManager:
    chosen = backend if backend is not None else choose_backend(config)
    if isinstance(chosen, str):
        return NoManager(chosen)
    why_not = chosen.check()
    if why_not:
        return NoManager(f"VMS_MANAGER={config.manager}: the {chosen.name} backend: {why_not}")
    manager = PoolManager(chosen, store, clock, config.limits, config.state_dir, faults=faults)
    try:
        manager.lock_state_dir()
    except (StateDirBusy, OSError) as exc:
        return NoManager(f"the {chosen.name} backend cannot start: {exc}")
    try:
        manager.start()
    except Exception as exc:
        log.exception("the VM manager could not recover its VMs")
        manager.close()
        return NoManager(f"the {chosen.name} backend cannot start: {exc}")
    return manager


def build_with_manager(
    config: VmsConfig,
    *,
    clock: Clock = SYSTEM_CLOCK,
    backend: Backend | None = None,
    faults: Step = no_faults,
) -> tuple[server.Running, VmManager]:
    # A port in use is said before any work is done (no migration, no VM booted).
    server.check_bindable(config.server.address, "VMS_GRPC_PORT")
    engine = db.make_engine(config.database_url, setting="VMS_DATABASE_URL")
    migrations.upgrade(engine, MIGRATIONS, "vms_alembic_version", "VMS_DATABASE_URL")
    store = VmStore(engine)
    manager = build_manager(config, store, clock=clock, backend=backend, faults=faults)
    servicer = VmServicer(manager)
    try:
        running = server.create_server(
            config.server.address,
            register=lambda s: pb_grpc.add_VmServiceServicer_to_server(servicer, s),
            service_names=[SERVICE_NAME],
            tokens=config.shared.tokens,
            policy=POLICY,
            max_workers=config.server.threads,
            setting="VMS_GRPC_PORT",
        )
    except BaseException:
        manager.close()
        engine.dispose()
        raise
    info = manager.info()
    running.set_serving(SERVICE_NAME, info.available)
    if info.available:
        log.info(
            "VM manager: %s backend (accelerator %s), up to %d VMs, %d kept warm",
            info.backend,
            info.accelerator,
            info.max_vms,
            info.pre_warm_count,
        )
    else:
        log.warning("no VM manager: %s; VM calls answer UNAVAILABLE", info.reason)
    running.on_stop.extend([manager.close, engine.dispose])
    return running, manager


def build(config: VmsConfig, *, clock: Clock = SYSTEM_CLOCK) -> server.Running:
    return build_with_manager(config, clock=clock)[0]
