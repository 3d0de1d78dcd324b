"""The queue's schema migrations on real SQLite and PostgreSQL, with rows in the tables."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from blixard.common.v1 import job_spec_pb2
from google.protobuf import json_format
from sqlalchemy import Engine, text

from services.common import db, migrations
from services.queue.bootstrap import MIGRATIONS
from services.queue.domain import ItemState, Outcome
from services.queue.store import QueueStore
from tests.storage.queue_support import make_manager, new

FIRST = "ee5e85f3fdd7"  # 0001: specs stored as JSON text
SPEC_AS_PROTOBUF = "7c1f0e2a9b34"  # 0002
SPEC = job_spec_pb2.JobSpec(command=["sh", "-c", "echo hi"], env={"A": "1"}, priority=7)
SPEC.requirements.worker_types.append("process")


def alembic(engine: Engine, direction: str, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["version_table"] = "queue_alembic_version"
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        getattr(command, direction)(config, revision)


def insert_json_row(engine: Engine, job_id: str) -> None:
    spec_json = json_format.MessageToJson(
        SPEC, sort_keys=True, indent=None, preserving_proto_field_name=True
    )
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO items (job_id, generation, spec_json, state, priority, run_at, seq,"
                " max_attempts, attempt, worker_types, labels, lease_seconds, worker_id,"
                " version, cancel_requested, output_tail, error, report_seq, trace_context,"
                " created_at, updated_at) VALUES (:job_id, 1, :spec, 'WAITING', 7,"
                " '2026-11-01 00:00:00', 1, 3, 0, ',process,', '{}', 0, '', 1, false, '', '',"
                " 1, '{}', '2026-11-01 00:00:00', '2026-11-01 00:00:00')"
            ),
            {"job_id": job_id, "spec": spec_json},
        )


def test_items_stored_as_json_keep_their_spec_through_the_upgrade(database_url: str) -> None:
    engine = db.make_engine(database_url, setting="QUEUE_DATABASE_URL")
    alembic(engine, "upgrade", FIRST)
    for n in range(3):
        insert_json_row(engine, f"job-{n}")

    migrations.upgrade(engine, MIGRATIONS, "queue_alembic_version", "QUEUE_DATABASE_URL")

    store = QueueStore(engine)
    for n in range(3):
        item = store.get(f"job-{n}")
        assert item is not None
        assert job_spec_pb2.JobSpec.FromString(item.spec) == SPEC
        assert item.priority == 7 and item.worker_types == ("process",)


def test_the_upgrade_can_be_undone_without_losing_a_spec(database_url: str) -> None:
    engine = db.make_engine(database_url, setting="QUEUE_DATABASE_URL")
    alembic(engine, "upgrade", FIRST)
    insert_json_row(engine, "job-1")
    alembic(engine, "upgrade", "head")

    alembic(engine, "downgrade", FIRST)

    with engine.connect() as connection:
        stored = connection.execute(text("SELECT spec_json FROM items")).scalar_one()
    assert json_format.Parse(stored, job_spec_pb2.JobSpec()) == SPEC


def test_a_worker_draining_before_the_upgrade_stays_drained(database_url: str) -> None:
    engine = db.make_engine(database_url, setting="QUEUE_DATABASE_URL")
    alembic(engine, "upgrade", SPEC_AS_PROTOBUF)
    with engine.begin() as connection:
        for worker_id, state in (("w-drain", "DRAINING"), ("w-up", "ONLINE")):
            connection.execute(
                text(
                    "INSERT INTO workers (worker_id, worker_type, labels, slots, state,"
                    " last_seen) VALUES (:id, 'process', '{}', 1, :state, '2026-11-01 00:00:00')"
                ),
                {"id": worker_id, "state": state},
            )

    migrations.upgrade(engine, MIGRATIONS, "queue_alembic_version", "QUEUE_DATABASE_URL")

    drained = {w.worker_id: w.drained for w in QueueStore(engine).workers()}
    assert drained == {"w-drain": True, "w-up": False}
    alembic(engine, "downgrade", SPEC_AS_PROTOBUF)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM workers")).scalar_one() == 2


def test_undoing_0003_keeps_an_offline_drained_worker_draining(database_url: str) -> None:
    engine = db.make_engine(database_url, setting="QUEUE_DATABASE_URL")
    migrations.upgrade(engine, MIGRATIONS, "queue_alembic_version", "QUEUE_DATABASE_URL")
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO workers (worker_id, worker_type, labels, slots, state, last_seen,"
                " drained) VALUES ('w-1', 'process', '{}', 1, 'OFFLINE', '2026-11-01 00:00:00',"
                " true)"
            )
        )

    alembic(engine, "downgrade", SPEC_AS_PROTOBUF)

    with engine.connect() as connection:
        assert connection.execute(text("SELECT state FROM workers")).scalar_one() == "DRAINING"


WORKER_DRAINED = "3d9a6b1c5e20"  # 0003: output_tail and error still text


def test_text_kept_before_0004_comes_back_as_its_utf8_bytes(database_url: str) -> None:
    engine = db.make_engine(database_url, setting="QUEUE_DATABASE_URL")
    alembic(engine, "upgrade", WORKER_DRAINED)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO items (job_id, generation, spec, state, priority, run_at, seq,"
                " max_attempts, attempt, worker_types, labels, lease_seconds, worker_id,"
                " version, cancel_requested, exit_code, output_tail, error, report_seq,"
                " trace_context, created_at, updated_at) VALUES ('job-1', 1, :spec, 'FAILED',"
                " 0, '2026-11-01 00:00:00', 1, 1, 1, '', '{}', 0, 'w', 1, false, 2, :tail,"
                " :error, 1, '{}', '2026-11-01 00:00:00', '2026-11-01 00:00:00')"
            ),
            {"spec": SPEC.SerializeToString(), "tail": "h\u00e9 \\ \u2603\n", "error": "why\\0"},
        )

    migrations.upgrade(engine, MIGRATIONS, "queue_alembic_version", "QUEUE_DATABASE_URL")

    item = QueueStore(engine).get("job-1")
    assert item is not None
    assert (item.output_tail, item.error) == ("h\u00e9 \\ \u2603\n".encode(), "why\\0")


def test_undoing_0004_keeps_the_text_that_text_can_hold(database_url: str) -> None:
    manager = make_manager(database_url)
    manager.enqueue(new("job-1"))
    (lease,) = manager.claim("w-1", "process", {}, 1, 30.0, 0.0)
    manager.complete(lease.token, Outcome.FAILED, 1, b"ok \x00\xff\n", "e\x00rr \u00e9")

    alembic(manager.store.engine, "downgrade", WORKER_DRAINED)

    with manager.store.engine.connect() as connection:
        row = connection.execute(text("SELECT output_tail, error FROM items")).one()
    assert tuple(row) == ("ok \ufffd\n", "err \u00e9")


def test_undoing_0007_puts_a_held_next_generation_in_its_items_place(database_url: str) -> None:
    manager = make_manager(database_url)
    manager.enqueue(new("j-1"))
    manager.claim("w-1", "process", {}, 1, 30)
    manager.cancel("j-1", 1)
    manager.enqueue(new("j-1", generation=2))  # held while generation 1 holds its lease
    engine = manager.store.engine

    alembic(engine, "downgrade", "6e17bcc13aaf")  # 0004

    with engine.connect() as connection:
        row = connection.execute(
            text("SELECT generation, state, lease_token FROM items WHERE job_id = 'j-1'")
        ).one()
    assert (row.generation, row.state, row.lease_token) == (2, ItemState.WAITING.value, None)
