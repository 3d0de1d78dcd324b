"""The docker compose stack, built and started by the test run, torn down with its
volumes afterwards (also on failure). Skipped with a reason where there is no Docker
engine; required in CI. CI sets BASE_IMAGE and POSTGRES_IMAGE to images it built from
Debian packages (deploy/ci/build-base-images.sh), since nothing can be pulled there."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import free_port, require
from tests.deployment import ROOT, Deployment


def docker_engine_works() -> bool:
    docker = shutil.which("docker")
    return (
        bool(docker)
        and subprocess.run(
            [docker, "info"],
            capture_output=True,
            timeout=30,  # type: ignore[list-item]
        ).returncode
        == 0
    )


@dataclass
class Stack:
    project: str
    env: dict[str, str]
    deployment: Deployment

    def compose(
        self, *args: str, timeout: float = 600, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "tools.compose", "-p", self.project, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"compose {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def container_ids(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service).stdout.split()


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    require(docker_engine_works(), "no Docker engine here (docker info fails)")
    ports = (free_port(), free_port(), free_port())
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("JOBS_", "QUEUE_", "VMS_", "WORKER_", "BLIXARD_"))
        },
        "BLIXARD_CLIENT_TOKEN": secrets.token_urlsafe(16),
        "BLIXARD_WORKER_TOKEN": secrets.token_urlsafe(16),
        "BLIXARD_ADMIN_TOKEN": secrets.token_urlsafe(16),
        "POSTGRES_PASSWORD": secrets.token_urlsafe(16),
        "JOBS_PORT": str(ports[0]),
        "QUEUE_PORT": str(ports[1]),
        "VMS_PORT": str(ports[2]),
        # quicker recovery from the faults the tests inject
        "WORKER_LEASE_SECONDS": "6",
        "QUEUE_WORKER_TIMEOUT": "10",
        "VMS_PRE_WARM_COUNT": "0",  # a warm microVM would take a core for the whole run
    }
    stack = Stack(
        f"blixard-test-{secrets.token_hex(3)}",
        env,
        Deployment(
            jobs=f"127.0.0.1:{ports[0]}",
            queue=f"127.0.0.1:{ports[1]}",
            vms=f"127.0.0.1:{ports[2]}",
            client_token=env["BLIXARD_CLIENT_TOKEN"],
        ),
    )
    try:
        stack.compose("up", "-d", "--build", "--wait", "--scale", "worker=2", timeout=900)
        yield stack
    except BaseException:
        print(stack.compose("logs", "--no-color", "--tail=100", check=False).stdout)
        raise
    finally:
        stack.compose("down", "-v", "--remove-orphans", "--timeout", "20", check=False)
