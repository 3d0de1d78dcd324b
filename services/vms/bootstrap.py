"""The one place that wires the VM service: settings -> manager -> servicer."""

from __future__ import annotations

import logging

from blixard.vms.v1 import vm_service_pb2_grpc as pb_grpc

from services.common import server
from services.vms import manager as managers
from services.vms.config import VmsConfig
from services.vms.servicer import POLICY, SERVICE_NAME, VmServicer

log = logging.getLogger(__name__)


def build(config: VmsConfig) -> server.Running:
    manager = managers.choose(config.manager, config.skip_manager)
    servicer = VmServicer(manager)
    running = server.create_server(
        config.server.address,
        register=lambda s: pb_grpc.add_VmServiceServicer_to_server(servicer, s),
        service_names=[SERVICE_NAME],
        tokens=config.shared.tokens,
        policy=POLICY,
        setting="VMS_GRPC_PORT",
    )
    info = manager.info()
    running.set_serving(SERVICE_NAME, info.available)
    if not info.available:
        log.warning("no VM manager: %s; VM calls answer UNAVAILABLE", info.reason)
    return running
