"""Shared test plumbing.

``require(condition, reason)``: a test that needs something a user's machine may lack
(Docker, QEMU, PostgreSQL binaries) skips with a one-line reason locally, and FAILS when
``CI=true``, so nothing silently stops being tested in CI.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.postgres import Cluster

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI but missing: {reason}", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster]:
    """A throwaway PostgreSQL cluster for the session (storage and gRPC tiers alike)."""
    from tests.postgres import Cluster, find_bindir  # it imports this module

    bindir = find_bindir()
    require(bindir is not None, "PostgreSQL server binaries not found (apt-get install postgresql)")
    assert bindir is not None
    cluster = Cluster(bindir)
    cluster.start()
    yield cluster
    cluster.stop()


_EXIT_STATUS = 0


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _EXIT_STATUS
    _EXIT_STATUS = int(exitstatus)


def pytest_unconfigure(config: pytest.Config) -> None:
    """A thread a test left blocked (a server call that never returns) would keep the
    interpreter from exiting after the summary, and CI would wait for it until its time
    runs out. Name such threads, then exit with pytest's own status."""
    import sys
    import threading
    import time

    deadline = time.monotonic() + 10
    while True:
        stuck = [
            t
            for t in threading.enumerate()
            if t is not threading.main_thread() and not t.daemon and t.is_alive()
        ]
        if not stuck or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if stuck:
        names = ", ".join(sorted(t.name for t in stuck))
        print(f"\nwarning: threads still running after the tests: {names}", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(_EXIT_STATUS)
