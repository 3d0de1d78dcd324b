"""The factory: a worker from the clients it is handed. Tests hand it in-process channels;
production hands it addresses from the environment (``from_environment``)."""

from __future__ import annotations

import grpc

from services.common import client
from services.worker.adapters import Adapter, MockAdapter, ProcessAdapter
from services.worker.config import WorkerConfig
from services.worker.queue_client import QueueClient
from services.worker.runner import Worker


def adapter_for(config: WorkerConfig) -> Adapter:
    if config.worker_type == "mock":
        return MockAdapter(config.mock_delay, config.mock_failure_rate, config.mock_seed)
    return ProcessAdapter()


def build(
    config: WorkerConfig, queue_channel: grpc.Channel, adapter: Adapter | None = None
) -> Worker:
    return Worker(config, QueueClient(queue_channel), adapter or adapter_for(config))


def from_environment(config: WorkerConfig) -> Worker:
    channel = client.open_channel(config.queue_address, config.shared.tokens.worker)
    return build(config, channel)
