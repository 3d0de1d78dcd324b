"""The factory: a worker from the clients it is handed. Tests hand it in-process channels;
production hands it addresses from the environment (``from_environment``)."""

from __future__ import annotations

import grpc

from services.common import client
from services.common.clock import SYSTEM_CLOCK, Clock
from services.worker.adapters import Adapter, MockAdapter, ProcessAdapter
from services.worker.config import WorkerConfig
from services.worker.jobs_client import JobsClient
from services.worker.queue_client import QueueClient
from services.worker.runner import Worker
from services.worker.tracker import ExecutionTracker
from services.worker.vm_adapter import VmAdapter


def adapter_for(config: WorkerConfig, vms_channel: grpc.Channel | None = None) -> Adapter:
    if config.worker_type == "mock":
        return MockAdapter(config.mock_delay, config.mock_failure_rate, config.mock_seed)
    if config.worker_type == "vm":
        if vms_channel is None:
            raise ValueError("a vm worker needs a channel to the VM service (vms_channel)")
        return VmAdapter(vms_channel)
    return ProcessAdapter()


def build(
    config: WorkerConfig,
    queue_channel: grpc.Channel,
    adapter: Adapter | None = None,
    *,
    jobs_channel: grpc.Channel | None = None,
    vms_channel: grpc.Channel | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> Worker:
    """A worker on these channels. Without ``jobs_channel`` output is not streamed (the
    result still carries its tail); a ``vm`` worker needs ``vms_channel``."""
    return Worker(
        config,
        QueueClient(queue_channel, named_only=config.worker_type == "vm"),
        adapter or adapter_for(config, vms_channel),
        output=JobsClient(jobs_channel) if jobs_channel is not None else None,
        tracker=ExecutionTracker(config.tracker, clock),
    )


def from_environment(config: WorkerConfig) -> Worker:
    token = config.shared.tokens.worker
    return build(
        config,
        client.open_channel(config.queue_address, token),
        jobs_channel=client.open_channel(config.jobs_address, token),
        vms_channel=(
            client.open_channel(config.vms_address, token) if config.worker_type == "vm" else None
        ),
    )
