from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.deployment import Deployment


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    given = Deployment.from_environment()
    if given is not None:
        yield given
        return
    workdir: Path = tmp_path_factory.mktemp("suite")
    running = Deployment.start(workdir)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def jobs_channel(deployment: Deployment) -> Iterator[grpc.Channel]:
    channel = deployment.channel(deployment.jobs)
    yield channel
    channel.close()
