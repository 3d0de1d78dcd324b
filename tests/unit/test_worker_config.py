"""The worker's settings for the VM and jobs services and for its execution tracker."""

from __future__ import annotations

import grpc
import pytest

from services.common.config import ConfigError
from services.worker import bootstrap, config
from services.worker.adapters import MockAdapter, ProcessAdapter
from services.worker.tracker import TrackerLimits
from services.worker.vm_adapter import VmAdapter


def test_defaults() -> None:
    settings = config.load({})
    assert settings.jobs_address == "127.0.0.1:50051"
    assert settings.vms_address == "127.0.0.1:50053"
    assert settings.tracker == TrackerLimits(
        max_entries=10_000,
        ttl_completed=86_400.0,
        ttl_failed=86_400.0,
        ttl_cancelled=3_600.0,
        cleanup_interval=3_600.0,
    )


def test_values() -> None:
    settings = config.load(
        {
            "WORKER_TYPE": "vm",
            "WORKER_JOBS_ADDRESS": "jobs.internal:443",
            "WORKER_VMS_ADDRESS": "vms.internal:443",
            "WORKER_TRACKER_MAX_ENTRIES": "500",
            "WORKER_TRACKER_TTL_COMPLETED": "60",
            "WORKER_TRACKER_TTL_FAILED": "120",
            "WORKER_TRACKER_TTL_CANCELLED": "0",
            "WORKER_TRACKER_CLEANUP_INTERVAL": "5",
        }
    )
    assert settings.worker_type == "vm"
    assert (settings.jobs_address, settings.vms_address) == (
        "jobs.internal:443",
        "vms.internal:443",
    )
    assert settings.tracker == TrackerLimits(500, 60.0, 120.0, 0.0, 5.0)


def test_bad_tracker_settings_are_named_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(
            {
                "WORKER_TRACKER_MAX_ENTRIES": "0",
                "WORKER_TRACKER_TTL_FAILED": "-1",
                "WORKER_TRACKER_CLEANUP_INTERVAL": "soon",
                "WORKER_TRACKER_TTL": "5",
            }
        )
    message = str(caught.value)
    assert "\n" not in message
    assert "WORKER_TRACKER_MAX_ENTRIES=0 is below the minimum 1" in message
    assert "WORKER_TRACKER_TTL_FAILED=-1.0 is below the minimum 0.0" in message
    assert "WORKER_TRACKER_CLEANUP_INTERVAL='soon' is not a number" in message
    assert "WORKER_TRACKER_TTL is not a known setting" in message


@pytest.mark.parametrize(
    ("worker_type", "adapter"),
    [("process", ProcessAdapter), ("mock", MockAdapter), ("vm", VmAdapter)],
)
def test_each_worker_type_gets_its_adapter(worker_type: str, adapter: type) -> None:
    settings = config.load({"WORKER_TYPE": worker_type})
    with grpc.insecure_channel("127.0.0.1:1") as channel:
        assert isinstance(bootstrap.adapter_for(settings, channel), adapter)


def test_a_vm_worker_without_a_vm_service_channel_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="VM service"):
        bootstrap.adapter_for(config.load({"WORKER_TYPE": "vm"}))
