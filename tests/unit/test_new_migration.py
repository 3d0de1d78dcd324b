"""`make migration` (tools/new_migration.py) writes a revision that `make lint` accepts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.deployment import ROOT
from tools import new_migration


def test_a_generated_revision_passes_ruff_as_make_lint_runs_it(tmp_path: Path) -> None:
    # A copy of the jobs service's migrations, laid out as in the checkout, so ruff's
    # settings for services/*/migrations/versions apply to the copy as they would.
    copy = tmp_path / "services" / "jobs" / "migrations"
    shutil.copytree(ROOT / "services" / "jobs" / "migrations", copy)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")

    path = new_migration.generate(copy, "jobs_alembic_version", "nothing changed")
    new_migration.tidy(path)

    assert path.parent == copy / "versions" and path.exists()
    ruff = [sys.executable, "-m", "ruff"]
    for check in (["check"], ["format", "--check"]):
        result = subprocess.run(
            [*ruff, *check, str(path)], cwd=tmp_path, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr
