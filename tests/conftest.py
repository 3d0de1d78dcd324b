"""Shared test plumbing.

``require(condition, reason)``: a test that needs something a user's machine may lack
(Docker, QEMU, PostgreSQL binaries) skips with a one-line reason locally, and FAILS when
``CI=true``, so nothing silently stops being tested in CI.
"""

from __future__ import annotations

import os
import socket

import pytest

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
