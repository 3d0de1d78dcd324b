"""`make migration SERVICE=jobs MESSAGE="add x"`: autogenerate an Alembic revision for a
service from the difference between its models and its newest revision (on a scratch
SQLite database). Read and edit the generated file before committing it."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine

ROOT = Path(__file__).resolve().parent.parent


def main(service: str, message: str) -> int:
    migrations = ROOT / "services" / service / "migrations"
    if not migrations.is_dir():
        print(f"migration: no migrations folder at {migrations}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        engine = create_engine(f"sqlite:///{scratch}/scratch.sqlite3")
        config = Config()
        config.set_main_option("script_location", str(migrations))
        config.attributes["version_table"] = f"{service}_alembic_version"
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            command.revision(config, message=message, autogenerate=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python -m tools.new_migration SERVICE MESSAGE", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
