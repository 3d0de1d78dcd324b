"""blixctl against the real services: what a user types, what they see, the exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

from tests.deployment import ROOT, RUN_ID, RUN_LABEL, Deployment


def blixctl(
    deployment: Deployment, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if deployment.client_token:
        env["BLIXARD_CLIENT_TOKEN"] = deployment.client_token
    mine: tuple[str, ...] = ()
    if args[:1] == ("submit",):  # every job of this run carries its label and request ids
        mine = ("--label", "=".join(RUN_LABEL), "--request-id", f"{RUN_ID}-{uuid.uuid4()}")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            *args[:1],
            "--address",
            deployment.jobs,
            *mine,
            *args[1:],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_submit_wait_exits_zero_and_shows_the_output(deployment: Deployment) -> None:
    result = blixctl(deployment, "submit", "--wait", "--", "sh", "-c", "echo from blixctl")
    assert result.returncode == 0, result.stderr
    assert "state:     SUCCEEDED" in result.stdout
    assert "from blixctl" in result.stdout


def test_submit_wait_exits_one_when_the_job_fails(deployment: Deployment) -> None:
    result = blixctl(
        deployment, "submit", "--wait", "--max-attempts", "1", "--", "sh", "-c", "exit 7"
    )
    assert result.returncode == 1
    assert "exit code: 7" in result.stdout


def test_json_output_is_proto3_json_a_script_can_read(deployment: Deployment) -> None:
    # The README's example labels its jobs team=infra too: list by this run's label.
    run = f"{RUN_LABEL[0]}={RUN_ID}"
    submitted = blixctl(deployment, "submit", "--json", "--label", "team=infra", "--", "true")
    job = json.loads(submitted.stdout)
    assert job["state"] == "JOB_STATE_PENDING"
    assert job["spec"]["labels"] == {"team": "infra", RUN_LABEL[0]: RUN_ID}
    watched = blixctl(deployment, "watch", "--json", job["jobId"])
    last = json.loads(watched.stdout.strip().splitlines()[-1])
    assert last["state"] == "JOB_STATE_SUCCEEDED" and watched.returncode == 0
    listed = blixctl(deployment, "list", "--json", "--all", "--label", "team=infra", "--label", run)
    assert [json.loads(line)["jobId"] for line in listed.stdout.splitlines()] == [job["jobId"]]


def test_cancel_then_watch_exits_three(deployment: Deployment) -> None:
    job_id = blixctl(deployment, "submit", "--", "sleep", "60").stdout.strip()
    cancelled = blixctl(deployment, "cancel", job_id, "--reason", "not needed")
    assert cancelled.returncode == 0 and "state:     CANCELLED" in cancelled.stdout
    assert "not confirmed" not in cancelled.stderr  # the queue is up: it confirmed
    watched = blixctl(deployment, "watch", job_id)
    assert watched.returncode == 3
    events = blixctl(deployment, "events", job_id)
    assert "not needed" in events.stdout


def test_retry_starts_a_new_generation(deployment: Deployment) -> None:
    job_id = blixctl(
        deployment, "submit", "--max-attempts", "1", "--", "sh", "-c", "exit 1"
    ).stdout.strip()
    assert blixctl(deployment, "watch", job_id).returncode == 1
    retried = blixctl(deployment, "retry", "--json", job_id)
    assert json.loads(retried.stdout)["generation"] == 2
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job = json.loads(blixctl(deployment, "get", "--json", job_id).stdout)
        if job["state"] == "JOB_STATE_FAILED" and job["attempts"] == 2:
            break
        time.sleep(0.2)
    assert job["attempts"] == 2, job


def test_errors_are_one_clear_message_and_exit_four(deployment: Deployment) -> None:
    missing = blixctl(deployment, "get", "00000000-0000-0000-0000-000000000000")
    assert missing.returncode == 4
    assert missing.stderr.startswith("blixctl: NOT_FOUND: job")
    invalid = blixctl(deployment, "submit", "--priority", "5000", "--env", "1A=x", "--", "")
    assert invalid.returncode == 4
    for field in ("spec.command[0]", "spec.env[1A]", "spec.priority"):
        assert f"  {field}:" in invalid.stderr


def test_a_malformed_address_is_one_line_and_exit_two() -> None:
    env = {**os.environ, "BLIXCTL_ADDRESS": "127.0.0.1:5OO51"}
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "get", "j-1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert "BLIXCTL_ADDRESS" in line and "5OO51" in line and "not a number" in line


def test_usage_mistakes_exit_two(deployment: Deployment) -> None:
    assert blixctl(deployment, "submit").returncode == 2
    assert blixctl(deployment, "submit", "--env", "novalue", "--", "true").returncode == 2
    assert blixctl(deployment, "list", "--state", "sleeping").returncode == 2
