"""A full disk under the queue's database (a real one: a small tmpfs mounted for the test):
callers get an error that says so, nothing is lost or half-written, reads go on, the log
says it without a traceback a second, and writes work again once space is freed."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from blixard.common.v1 import job_spec_pb2
from blixard.queue.v1 import queue_service_pb2 as pb
from blixard.queue.v1 import queue_service_pb2_grpc as pb_grpc

from services.common.errors import describe
from tests.conftest import free_port, require
from tests.deployment import start_service, stop_process, wait_healthy

DISK = 1024 * 1024
SPEC = job_spec_pb2.JobSpec(command=["echo", "x" * 4000])  # about 4 KB an item


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    require(
        os.geteuid() == 0 and shutil.which("mount") is not None,
        "a full disk is a small tmpfs mounted for the test: that needs root",
    )
    where = tmp_path / "disk"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A file taking all the disk's free space but ``leave`` bytes."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    filler.write_bytes(b"\0" * max(0, free - leave))
    return filler


def test_a_full_disk_under_the_queue_says_so_and_loses_nothing(
    small_disk: Path, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "queue.log"
    env = {
        "QUEUE_GRPC_PORT": str(port),
        "QUEUE_DATABASE_URL": f"sqlite:///{small_disk}/queue.sqlite3",
        "QUEUE_JOBS_ADDRESS": f"127.0.0.1:{free_port()}",  # reports wait in the outbox
    }
    relay_full = "queue-outbox-relay: the database has no space left"
    process = start_service("services.queue", env, log)
    try:
        wait_healthy(f"127.0.0.1:{port}", process=process)
        filler = fill(small_disk, leave=256 * 1024)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # no retries: see all
            queue = pb_grpc.QueueServiceStub(channel)
            accepted: list[str] = []
            refused = None
            for n in range(500):
                request = pb.EnqueueRequest(job_id=f"j-{n:03d}", generation=1, spec=SPEC)
                try:
                    queue.Enqueue(request, timeout=10)
                except grpc.RpcError as exc:
                    refused = request.job_id, describe(exc)
                    break
                accepted.append(request.job_id)
            assert refused is not None, "the disk never filled"
            job_id, failure = refused
            assert failure.code is grpc.StatusCode.UNAVAILABLE  # retried by Blixard's clients
            assert failure.reason == "STORE_FULL"
            assert "disk is full" in failure.message and "free space" in failure.message
            assert accepted, "the disk was full before the first item"

            # Nothing lost or half-written; reads go on.
            stats = queue.GetStats(pb.GetStatsRequest(), timeout=10)
            assert stats.items_by_state["ITEM_STATE_WAITING"] == len(accepted)
            with pytest.raises(grpc.RpcError) as missing:
                queue.GetItem(pb.GetItemRequest(job_id=job_id), timeout=10)
            assert missing.value.code() is grpc.StatusCode.NOT_FOUND
            claim = pb.ClaimRequest(worker_id="w-1", worker_type="process", max_items=1)
            with pytest.raises(grpc.RpcError) as full:
                queue.Claim(claim, timeout=10)  # a lease is a write too
            assert describe(full.value).reason == "STORE_FULL"

            # The outbox relay (its reports cannot be delivered: it records each attempt)
            # says the disk is full once, not with a traceback each round.
            until(lambda: relay_full in log.read_text())

            filler.unlink()  # the operator frees space
            queue.Enqueue(pb.EnqueueRequest(job_id=job_id, generation=1, spec=SPEC), timeout=10)
            [lease] = queue.Claim(claim, timeout=10).leases
            assert lease.item.job_id == accepted[0]  # the claim that failed took nothing
            stats = queue.GetStats(pb.GetStatsRequest(), timeout=10)
            assert stats.items_by_state["ITEM_STATE_WAITING"] == len(accepted)
            assert stats.items_by_state["ITEM_STATE_LEASED"] == 1
            until(lambda: "queue-outbox-relay: the database is back" in log.read_text())
    finally:
        code = stop_process(process, timeout=30)
    text = log.read_text()
    assert code == 0, text
    assert text.count(relay_full) == 1, text
    assert "Traceback" not in text, text


def until(condition: Callable[[], bool], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.05)
