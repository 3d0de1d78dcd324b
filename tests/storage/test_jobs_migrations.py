"""The jobs service's schema migrations on real SQLite and PostgreSQL, with rows in the tables."""

from __future__ import annotations

from datetime import UTC, datetime

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, inspect, text

from services.common import db, migrations
from services.jobs.bootstrap import MIGRATIONS
from services.jobs.domain import Job, JobEvent, JobState, SpecIndex
from services.jobs.store import JobStore

JOB_OUTPUT = "0ac222120c8f"  # 0002: output_tail, error and events' reasons still text
NOW = datetime(2026, 11, 1, tzinfo=UTC)


def alembic(engine: Engine, direction: str, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["version_table"] = "jobs_alembic_version"
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        getattr(command, direction)(config, revision)


def upgrade(engine: Engine) -> None:
    migrations.upgrade(engine, MIGRATIONS, "jobs_alembic_version", "JOBS_DATABASE_URL")


def test_text_kept_before_0004_comes_back_whole(database_url: str) -> None:
    engine = db.make_engine(database_url, setting="JOBS_DATABASE_URL")
    alembic(engine, "upgrade", JOB_OUTPUT)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO jobs (job_id, request_id, spec_json, spec_hash, state, generation,"
                " attempts, attempts_base, exit_code, output_tail, error, worker_id, created_at,"
                " updated_at, last_sequence, trace_context, worker_types, output_bytes) VALUES"
                " ('job-1', 'r-1', '{}', 'h', 'FAILED', 1, 1, 0, 2, :tail, :error, 'w',"
                " '2026-11-01 00:00:00', '2026-11-01 00:00:00', 3, '{}', '', 5)"
            ),
            {"tail": "h\u00e9 \\ \u2603\n", "error": "why\\0"},
        )
        connection.execute(
            text(
                "INSERT INTO job_events (job_id, generation, state, at, actor, reason) VALUES"
                " ('job-1', 1, 'FAILED', '2026-11-01 00:00:00', 'queue', :reason)"
            ),
            {"reason": "attempt 1: \u00e9"},
        )

    upgrade(engine)

    store = JobStore(engine)
    job = store.get("job-1")
    assert job is not None
    assert (job.output_tail, job.error) == ("h\u00e9 \\ \u2603\n".encode(), "why\\0")
    assert [e.reason for e in store.events("job-1")] == ["attempt 1: \u00e9"]
    # The tables rebuilt on SQLite keep their keys and indexes.
    schema = inspect(engine)
    assert {i["name"] for i in schema.get_indexes("jobs")} >= {
        "ix_jobs_created",
        "ix_jobs_state_created",
    }
    assert [u["column_names"] for u in schema.get_unique_constraints("jobs")] == [["request_id"]]
    assert {i["name"] for i in schema.get_indexes("job_events")} == {"ix_job_events_job_id"}


def test_undoing_0004_keeps_the_text_that_text_can_hold(database_url: str) -> None:
    engine = db.make_engine(database_url, setting="JOBS_DATABASE_URL")
    upgrade(engine)
    store = JobStore(engine)
    job = Job("job-1", None, "{}", "h", JobState.FAILED, NOW, NOW)
    job.output_tail, job.error = b"ok \x00\xff\n", "e\x00rr \u00e9"
    with store.transaction() as tx:
        tx.add(job, SpecIndex())
        tx.record(JobEvent("job-1", 1, JobState.FAILED, NOW, "queue", "quoted: \x00!"))

    alembic(engine, "downgrade", JOB_OUTPUT)

    with engine.connect() as connection:
        row = connection.execute(text("SELECT output_tail, error FROM jobs")).one()
        reason = connection.execute(text("SELECT reason FROM job_events")).scalar_one()
    assert (tuple(row), reason) == (("ok \ufffd\n", "err \u00e9"), "quoted: !")
