"""The one place that wires the queue service: engine -> store -> manager -> servicer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from blixard.queue.v1 import queue_service_pb2_grpc as pb_grpc

from services.common import client, db, migrations, server
from services.common.clock import SYSTEM_CLOCK, Clock
from services.common.outbox import Message, Relay
from services.queue.config import QueueConfig
from services.queue.manager import QueueManager, Reaper
from services.queue.reporter import JobsReporter
from services.queue.servicer import POLICY, SERVICE_NAME, QueueServicer
from services.queue.store import QueueStore

MIGRATIONS = Path(__file__).parent / "migrations"


def build(
    config: QueueConfig,
    *,
    clock: Clock = SYSTEM_CLOCK,
    jobs: Callable[[Message], None] | None = None,
) -> server.Running:
    # A port in use is said before any work is done (no migration, no connection).
    server.check_bindable(config.server.address, "QUEUE_GRPC_PORT")
    engine = db.make_engine(config.database_url, setting="QUEUE_DATABASE_URL")
    migrations.upgrade(engine, MIGRATIONS, "queue_alembic_version", "QUEUE_DATABASE_URL")
    store = QueueStore(engine)
    manager = QueueManager(
        store,
        clock,
        policy=config.retry,
        worker_timeout=config.worker_timeout,
        worker_retention=config.worker_retention,
    )
    deliver_many = None
    if jobs is None:
        reporter = JobsReporter(
            client.open_channel(config.jobs_address, config.shared.tokens.admin)
        )
        jobs, deliver_many = reporter, reporter.many
    relay = Relay(
        "queue-outbox-relay",
        store.outbox,
        jobs,
        clock,
        store.reports,
        deliver_many=deliver_many,
    )
    reaper = Reaper(manager, config.reap_interval, config.cache_sync_interval)
    servicer = QueueServicer(manager, server.WaitSlots(config.server.threads, "QUEUE_GRPC_THREADS"))
    running = server.create_server(
        config.server.address,
        register=lambda s: pb_grpc.add_QueueServiceServicer_to_server(servicer, s),
        service_names=[SERVICE_NAME],
        tokens=config.shared.tokens,
        policy=POLICY,
        max_workers=config.server.threads,
        setting="QUEUE_GRPC_PORT",
    )
    relay.start()
    reaper.start()
    running.before_stop.append(manager.stop)
    running.on_stop.extend([reaper.stop, relay.stop, engine.dispose])
    return running
