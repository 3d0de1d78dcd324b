"""`make migration SERVICE=jobs MESSAGE="add x"`: autogenerate an Alembic revision for a
service from the difference between its models and its newest revision (on a scratch
SQLite database), then format it as `make fmt` does, so `make lint` passes on it. Read and
edit the generated file before committing it (and run `make fmt` after editing)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import Script
from sqlalchemy import create_engine

ROOT = Path(__file__).resolve().parent.parent


def generate(migrations: Path, version_table: str, message: str) -> Path:
    """The new revision's file, in ``migrations``/versions."""
    with tempfile.TemporaryDirectory() as scratch:
        engine = create_engine(f"sqlite:///{scratch}/scratch.sqlite3")
        config = Config()
        config.set_main_option("script_location", str(migrations))
        config.attributes["version_table"] = version_table
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            script = command.revision(config, message=message, autogenerate=True)
        engine.dispose()
    assert isinstance(script, Script), script
    return Path(script.path)


def tidy(path: Path) -> None:
    """`make fmt` on one file: ruff's fixes (an unused import in an empty revision), then
    its formatter, with the project's settings."""
    settings = ["--config", str(ROOT / "pyproject.toml")]
    ruff = [sys.executable, "-m", "ruff"]
    subprocess.run([*ruff, "check", "--fix", "--quiet", *settings, str(path)], check=False)
    subprocess.run([*ruff, "format", "--quiet", *settings, str(path)], check=True)


def main(service: str, message: str) -> int:
    migrations = ROOT / "services" / service / "migrations"
    if not migrations.is_dir():
        print(f"migration: no migrations folder at {migrations}", file=sys.stderr)
        return 2
    path = generate(migrations, f"{service}_alembic_version", message)
    tidy(path)
    print(f"migration: wrote {path.relative_to(ROOT)}; read it, edit it, then `make fmt`")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python -m tools.new_migration SERVICE MESSAGE", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
