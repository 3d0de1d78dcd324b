"""`make run` (tools/run_suite.py as a real process) on ports of one's own: every address
between the services follows the ports chosen, so a job runs to its end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
from blixard.common.v1 import job_spec_pb2
from blixard.jobs.v1 import jobs_service_pb2 as pb
from blixard.jobs.v1 import jobs_service_pb2_grpc as pb_grpc

from tests.conftest import free_port
from tests.deployment import ROOT, wait_healthy
from tests.system.test_end_to_end import wait_for_end


def test_make_run_on_other_ports_runs_a_job_to_success(tmp_path: Path) -> None:
    jobs_port, queue_port, vms_port = free_port(), free_port(), free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JOBS_", "QUEUE_", "VMS_", "WORKER_", "BLIXARD_"))
    }
    env.update(
        JOBS_GRPC_PORT=str(jobs_port),
        QUEUE_GRPC_PORT=str(queue_port),
        VMS_GRPC_PORT=str(vms_port),
        JOBS_DATABASE_URL=f"sqlite:///{tmp_path}/jobs.sqlite3",
        QUEUE_DATABASE_URL=f"sqlite:///{tmp_path}/queue.sqlite3",
        VMS_DATABASE_URL=f"sqlite:///{tmp_path}/vms.sqlite3",
        VMS_STATE_DIR=f"{tmp_path}/vms",
        VMS_MANAGER="none",
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
        for port in (jobs_port, queue_port, vms_port):
            wait_healthy(f"127.0.0.1:{port}", timeout=60)
        with grpc.insecure_channel(f"127.0.0.1:{jobs_port}") as channel:
            stub = pb_grpc.JobServiceStub(channel)
            request = pb.SubmitJobRequest(
                request_id=f"run-suite-{uuid.uuid4()}",
                spec=job_spec_pb2.JobSpec(command=["sh", "-c", "echo on my ports"]),
            )
            job = stub.SubmitJob(request, timeout=10).job
            done = wait_for_end(stub, job.job_id, timeout=60)
        assert pb.JobState.Name(done.state) == "JOB_STATE_SUCCEEDED", done
        assert done.output_tail == "on my ports\n"
    finally:
        suite.send_signal(signal.SIGINT)  # Ctrl-C
        output, _ = suite.communicate(timeout=90)
    assert suite.returncode == 0, output
    assert f"jobs   127.0.0.1:{jobs_port}" in output
    assert f"queue  127.0.0.1:{queue_port}" in output
    assert "Blixard stopped." in output
