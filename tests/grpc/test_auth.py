"""Bearer tokens per role: clients submit and read, workers claim and report, probes are open."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from blixard.jobs.v1 import jobs_service_pb2 as jpb
from blixard.queue.v1 import queue_service_pb2 as qpb
from blixard.vms.v1 import vm_service_pb2 as vpb
from blixard.vms.v1 import vm_service_pb2_grpc as vpb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common.config import ConfigError
from services.common.errors import describe
from services.jobs import config as jobs_config
from services.queue import config as queue_config
from services.vms import config as vms_config
from tests.grpc.conftest import (
    ADMIN_TOKEN,
    CLIENT_TOKEN,
    RPC_TIMEOUT,
    TOKENS,
    WORKER_TOKEN,
    Stack,
    eventually,
    spec,
)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = Stack(tmp_path_factory.mktemp("secured"), dict(TOKENS))
    try:
        running.start_pair().start_vms()
        yield running
    finally:
        running.stop()


def _refused(call, request) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=RPC_TIMEOUT)
    failure = describe(caught.value)
    assert failure.reason == failure.code.name, "the ErrorInfo reason names the refusal"
    return failure.code


def _claim() -> qpb.ClaimRequest:
    return qpb.ClaimRequest(worker_id="auth-worker", worker_type="process", max_items=1)


def test_no_token_is_unauthenticated(secured: Stack) -> None:
    assert (
        _refused(secured.jobs_stub().SubmitJob, jpb.SubmitJobRequest(spec=spec("true")))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    assert _refused(secured.queue_stub().Claim, _claim()) == grpc.StatusCode.UNAUTHENTICATED


def test_an_unknown_token_is_unauthenticated(secured: Stack) -> None:
    jobs = secured.jobs_stub("not-a-token")

    code = _refused(jobs.GetJob, jpb.GetJobRequest(job_id="whatever"))

    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_a_streaming_call_without_token_is_unauthenticated(secured: Stack) -> None:
    jobs = secured.jobs_stub()

    with pytest.raises(grpc.RpcError) as caught:
        list(jobs.WatchJob(jpb.WatchJobRequest(job_id="whatever"), timeout=RPC_TIMEOUT))

    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_worker_token_cannot_submit(secured: Stack) -> None:
    jobs = secured.jobs_stub(WORKER_TOKEN)

    with pytest.raises(grpc.RpcError) as caught:
        jobs.SubmitJob(jpb.SubmitJobRequest(spec=spec("true")), timeout=RPC_TIMEOUT)

    failure = describe(caught.value)
    assert failure.code == grpc.StatusCode.PERMISSION_DENIED
    assert failure.reason == "PERMISSION_DENIED"
    assert failure.metadata == {
        "role": "worker",
        "method": "/blixard.jobs.v1.JobService/SubmitJob",
    }


def test_a_client_token_can_batch_submit_and_a_worker_token_cannot(secured: Stack) -> None:
    request = jpb.BatchSubmitJobsRequest(requests=[jpb.SubmitJobRequest(spec=spec("true"))])

    [result] = secured.jobs_stub(CLIENT_TOKEN).BatchSubmitJobs(request, timeout=RPC_TIMEOUT).results
    code = _refused(secured.jobs_stub(WORKER_TOKEN).BatchSubmitJobs, request)

    assert list(result.response.job.spec.command) == ["true"]
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_a_client_token_can_submit_and_read(secured: Stack) -> None:
    jobs = secured.jobs_stub(CLIENT_TOKEN)

    job = jobs.SubmitJob(jpb.SubmitJobRequest(spec=spec("echo", "x")), timeout=RPC_TIMEOUT).job
    read = jobs.GetJob(jpb.GetJobRequest(job_id=job.job_id), timeout=RPC_TIMEOUT).job

    assert read.job_id == job.job_id
    assert list(read.spec.command) == ["echo", "x"]


def test_the_jobs_service_reaches_the_secured_queue_with_its_admin_token(secured: Stack) -> None:
    jobs = secured.jobs_stub(CLIENT_TOKEN)
    queue = secured.queue_stub(ADMIN_TOKEN)
    job = jobs.SubmitJob(jpb.SubmitJobRequest(spec=spec("echo", "y")), timeout=RPC_TIMEOUT).job

    def enqueued() -> bool:
        try:
            queue.GetItem(qpb.GetItemRequest(job_id=job.job_id), timeout=RPC_TIMEOUT)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            return False
        return True

    eventually(enqueued, 10, "the jobs outbox to enqueue the job on the secured queue")


def test_a_client_token_cannot_claim(secured: Stack) -> None:
    code = _refused(secured.queue_stub(CLIENT_TOKEN).Claim, _claim())

    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_a_client_token_cannot_enqueue(secured: Stack) -> None:
    request = qpb.EnqueueRequest(job_id="sneaky", generation=1, spec=spec("true"))

    code = _refused(secured.queue_stub(CLIENT_TOKEN).Enqueue, request)

    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_a_worker_token_can_claim(secured: Stack) -> None:
    response = secured.queue_stub(WORKER_TOKEN).Claim(_claim(), timeout=RPC_TIMEOUT)

    assert isinstance(response, qpb.ClaimResponse)
    workers = secured.queue_stub(WORKER_TOKEN).ListWorkers(
        qpb.ListWorkersRequest(), timeout=RPC_TIMEOUT
    )
    assert "auth-worker" in {w.worker_id for w in workers.workers}


def test_a_worker_token_cannot_update_job_status(secured: Stack) -> None:
    request = jpb.UpdateJobStatusRequest(
        job_id="x", generation=1, sequence=1, state=jpb.JOB_STATE_SUCCEEDED
    )

    code = _refused(secured.jobs_stub(WORKER_TOKEN).UpdateJobStatus, request)

    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_vm_calls_need_a_token_but_manager_info_is_open_to_clients(secured: Stack) -> None:
    target = secured.vms_target
    plain = secured.channel(target)
    client = secured.channel(target, CLIENT_TOKEN)

    assert (
        _refused(vpb_grpc.VmServiceStub(plain).GetManagerInfo, vpb.GetManagerInfoRequest())
        == grpc.StatusCode.UNAUTHENTICATED
    )
    info = vpb_grpc.VmServiceStub(client).GetManagerInfo(
        vpb.GetManagerInfoRequest(), timeout=RPC_TIMEOUT
    )
    assert info.available is False
    assert (
        _refused(vpb_grpc.VmServiceStub(client).ListVms, vpb.ListVmsRequest())
        == grpc.StatusCode.PERMISSION_DENIED
    )


@pytest.mark.parametrize("service", ["jobs", "queue", "vms"])
def test_health_and_reflection_need_no_token(secured: Stack, service: str) -> None:
    targets = {"jobs": secured.jobs_target, "queue": secured.queue_target}
    target = targets.get(service) or secured.vms_target
    channel = secured.channel(target)

    health = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT
    )
    [listing] = list(
        reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=RPC_TIMEOUT
        )
    )

    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert "grpc.health.v1.Health" in {s.name for s in listing.list_services_response.service}


@pytest.mark.parametrize(
    ("load", "prefix"),
    [(jobs_config.load, "JOBS_"), (queue_config.load, "QUEUE_"), (vms_config.load, "VMS_")],
)
def test_binding_beyond_loopback_without_tokens_is_a_config_error(load, prefix: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as caught:
        load({f"{prefix}GRPC_HOST": "0.0.0.0"})

    message = str(caught.value)
    assert "BLIXARD_CLIENT_TOKEN" in message
    assert f"{prefix}GRPC_HOST" in message
    assert "\n" not in message


def test_binding_beyond_loopback_with_every_token_is_accepted() -> None:
    config = jobs_config.load({"JOBS_GRPC_HOST": "0.0.0.0", **TOKENS})

    assert config.server.host == "0.0.0.0"
    assert config.shared.tokens.client == CLIENT_TOKEN
