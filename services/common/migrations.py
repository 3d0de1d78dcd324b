"""Schema migrations with Alembic, applied at start-up.

Each service keeps its revisions in its own ``migrations`` package and its own version
table, so two services may even share one database. On PostgreSQL an advisory lock makes
replicas that start together migrate one at a time.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, MetaData, text
from sqlalchemy.exc import SQLAlchemyError

from services.common.startup import StartupError

log = logging.getLogger(__name__)


def upgrade(engine: Engine, migrations_dir: Path, version_table: str, setting: str) -> None:
    """Bring the database to the newest revision; a failure is a one-line StartupError."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir))
    config.attributes["version_table"] = version_table
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                lock = zlib.crc32(version_table.encode())
                connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock})
            config.attributes["connection"] = connection
            before = _revision(connection, version_table)
            _check_known(config, before, setting)
            command.upgrade(config, "head")
            after = _revision(connection, version_table)
        if before != after:
            log.info("%s: schema migrated from %s to %s", setting, before or "empty", after)
    except (SQLAlchemyError, CommandError) as exc:  # CommandError: Alembic's own refusals
        cause = str(getattr(exc, "orig", exc)).strip().splitlines()
        raise StartupError(
            f"{setting}: cannot migrate the schema: {cause[0] if cause else type(exc).__name__}"
        ) from None


def _check_known(config: Config, revision: str | None, setting: str) -> None:
    """Refuse a database at a revision this release does not have: a newer release (or
    something else) migrated it, and this code would misread its tables."""
    if revision is None:
        return
    scripts = ScriptDirectory.from_config(config)
    if revision in {script.revision for script in scripts.walk_revisions()}:
        return
    raise StartupError(
        f"{setting}: the database's schema (revision {revision!r}) is newer than this release "
        f"or unknown to it (this release's newest is {scripts.get_current_head()!r}); run the "
        f"release that migrated it, or use another database"
    )


def _revision(connection: Connection, version_table: str) -> str | None:
    return MigrationContext.configure(
        connection, opts={"version_table": version_table}
    ).get_current_revision()


def run_env(context: Any, metadata: MetaData) -> None:
    """The body of every service's migrations/env.py."""
    attributes = context.config.attributes
    context.configure(
        connection=attributes["connection"],
        target_metadata=metadata,
        version_table=attributes["version_table"],
        render_as_batch=True,  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
