"""The jobs outbox: with the queue killed during submits, every submit still succeeds, and
once the queue is back every job is enqueued exactly once and runs."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from pathlib import Path

import grpc
from blixard.common.v1 import job_spec_pb2
from blixard.jobs.v1 import jobs_service_pb2 as pb
from blixard.jobs.v1 import jobs_service_pb2_grpc as pb_grpc
from blixard.queue.v1 import queue_service_pb2 as qpb
from blixard.queue.v1 import queue_service_pb2_grpc as qpb_grpc

from tests.deployment import Deployment, start_service, wait_healthy

JOBS = 200


def test_killing_the_queue_during_200_submits_loses_and_duplicates_nothing(
    tmp_path: Path,
) -> None:
    deployment = Deployment.start(tmp_path, workers=2)
    try:
        channel = grpc.insecure_channel(deployment.jobs)
        stub = pb_grpc.JobServiceStub(channel)
        submitted: list[str] = []
        errors: list[Exception] = []

        def submit_all() -> None:
            for i in range(JOBS):
                request = pb.SubmitJobRequest(
                    request_id=f"outbox-{i}-{uuid.uuid4()}",
                    spec=job_spec_pb2.JobSpec(command=["true"]),
                )
                try:
                    submitted.append(stub.SubmitJob(request, timeout=10).job.job_id)
                except grpc.RpcError as exc:
                    errors.append(exc)
                time.sleep(0.005)

        submitter = threading.Thread(target=submit_all)
        submitter.start()
        while len(submitted) < JOBS // 4:
            time.sleep(0.01)
        deployment.processes["queue"].send_signal(signal.SIGKILL)
        deployment.processes["queue"].wait()
        submitter.join(timeout=120)
        assert not errors, errors[:3]
        assert len(submitted) == JOBS

        time.sleep(1.0)  # the queue stays down a moment: the relay backs off meanwhile
        queue = start_service("services.queue", deployment.env, tmp_path / "queue-2.log")
        deployment.processes["queue-2"] = queue
        wait_healthy(deployment.queue, process=queue)

        deadline = time.monotonic() + 120
        pending = set(submitted)
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                job = stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=10).job
                if job.state == pb.JOB_STATE_SUCCEEDED:
                    pending.discard(job_id)
            time.sleep(0.2)
        assert not pending, f"{len(pending)} jobs did not finish"

        # Exactly once in the queue: one item per job, enqueued once each.
        with grpc.insecure_channel(deployment.queue) as queue_channel:
            stats = qpb_grpc.QueueServiceStub(queue_channel).GetStats(
                qpb.GetStatsRequest(), timeout=10
            )
        assert sum(stats.items_by_state.values()) == JOBS
        assert stats.items_by_state["ITEM_STATE_SUCCEEDED"] == JOBS
        for job_id in submitted:
            events = stub.ListJobEvents(pb.ListJobEventsRequest(job_id=job_id), timeout=10)
            enqueued = [e for e in events.events if e.reason == "enqueued"]
            assert len(enqueued) == 1, events
        channel.close()
    finally:
        deployment.stop()
