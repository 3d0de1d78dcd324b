from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.postgres import Cluster, find_bindir


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster]:
    bindir = find_bindir()
    require(bindir is not None, "PostgreSQL server binaries not found (apt-get install postgresql)")
    assert bindir is not None
    cluster = Cluster(bindir)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each storage test runs on a real SQLite file and on a real PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/test.sqlite3"
    cluster: Cluster = request.getfixturevalue("postgres_cluster")
    return cluster.new_database()
