"""The one place that wires the jobs service: engine -> store -> manager -> servicer."""

from __future__ import annotations

from pathlib import Path

from blixard.jobs.v1 import jobs_service_pb2_grpc as pb_grpc

from services.common import client, db, migrations, server
from services.common.clock import SYSTEM_CLOCK, Clock
from services.common.outbox import Relay
from services.jobs.config import JobsConfig
from services.jobs.manager import JobManager
from services.jobs.queue_client import GrpcQueue
from services.jobs.relay import QueueDelivery, QueuePort
from services.jobs.servicer import POLICY, SERVICE_NAME, JobServicer
from services.jobs.store import JobStore

MIGRATIONS = Path(__file__).parent / "migrations"


def build(
    config: JobsConfig, *, clock: Clock = SYSTEM_CLOCK, queue: QueuePort | None = None
) -> server.Running:
    # A port in use is said before any work is done (no migration, no connection).
    server.check_bindable(config.server.address, "JOBS_GRPC_PORT")
    engine = db.make_engine(config.database_url, setting="JOBS_DATABASE_URL")
    migrations.upgrade(engine, MIGRATIONS, "jobs_alembic_version", "JOBS_DATABASE_URL")
    store = JobStore(engine)
    if queue is None:
        channel = client.open_channel(config.queue_address, config.shared.tokens.admin)
        queue = GrpcQueue(channel)
    manager = JobManager(store, clock, queue=queue, cancel_timeout=config.cancel_timeout)
    delivery = QueueDelivery(store, queue)
    relay = Relay(
        "jobs-outbox-relay",
        store.outbox,
        delivery,
        clock,
        manager.feed,
        deliver_many=delivery.many,
    )
    servicer = JobServicer(manager, server.WaitSlots(config.server.threads, "JOBS_GRPC_THREADS"))
    running = server.create_server(
        config.server.address,
        register=lambda s: pb_grpc.add_JobServiceServicer_to_server(servicer, s),
        service_names=[SERVICE_NAME],
        tokens=config.shared.tokens,
        policy=POLICY,
        max_workers=config.server.threads,
        setting="JOBS_GRPC_PORT",
    )
    relay.start()
    running.on_stop.append(relay.stop)
    running.on_stop.append(engine.dispose)
    return running
