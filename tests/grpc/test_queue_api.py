"""The queue's operator API over gRPC: ListItems, GetStats, BatchComplete, Redrive."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from blixard.common.v1 import job_spec_pb2
from blixard.queue.v1 import queue_service_pb2 as qpb

from services.common import pbtime
from services.common.errors import describe
from services.worker.queue_client import QueueClient
from tests.grpc.conftest import Stack, eventually, spec


def enqueue(stub, job_id: str, *worker_types: str, max_attempts: int = 0):  # type: ignore[no-untyped-def]
    requirements = job_spec_pb2.JobRequirements(worker_types=list(worker_types))
    return stub.Enqueue(
        qpb.EnqueueRequest(
            job_id=job_id,
            generation=1,
            spec=spec("true", requirements=requirements, max_attempts=max_attempts),
        ),
        timeout=10,
    )


def claim(stub, n: int, worker_type: str = "process") -> list[qpb.Lease]:  # type: ignore[no-untyped-def]
    return list(
        stub.Claim(
            qpb.ClaimRequest(
                worker_id="w-api",
                worker_type=worker_type,
                max_items=n,
                lease_duration=pbtime.duration(5),
            ),
            timeout=10,
        ).leases
    )


def test_list_items_pages_and_filters(make_stack: Callable[..., Stack]) -> None:
    stub = make_stack().start_pair().queue_stub()
    for i in range(5):
        enqueue(stub, f"job-{i}")
    enqueue(stub, "job-vm", "vm")
    claim(stub, 2)

    seen, token = [], ""
    while True:
        page = stub.ListItems(qpb.ListItemsRequest(page_size=2, page_token=token), timeout=10)
        seen += [item.job_id for item in page.items]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(seen) and len(seen) == 6

    leased = stub.ListItems(qpb.ListItemsRequest(states=[qpb.ITEM_STATE_LEASED]), timeout=10)
    assert [i.state for i in leased.items] == [qpb.ITEM_STATE_LEASED] * 2
    vm_ok = stub.ListItems(qpb.ListItemsRequest(worker_type="mock"), timeout=10)
    assert "job-vm" not in [i.job_id for i in vm_ok.items] and len(vm_ok.items) == 5

    with pytest.raises(grpc.RpcError) as error:
        stub.ListItems(qpb.ListItemsRequest(page_size=-1, states=[42]), timeout=10)
    assert {f for f, _ in describe(error.value).field_violations} == {"page_size", "states[0]"}


def test_a_bad_page_token_is_listed_with_the_other_problems(
    make_stack: Callable[..., Stack],
) -> None:
    stub = make_stack().start_pair().queue_stub()

    with pytest.raises(grpc.RpcError) as error:
        stub.ListItems(qpb.ListItemsRequest(page_size=5000, page_token="not-a-token!"), timeout=10)

    # One INVALID_ARGUMENT naming both, not the page size now and the token on the next call.
    failure = describe(error.value)
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(f for f, _ in failure.field_violations) == ["page_size", "page_token"]


def test_job_ids_are_held_to_the_jobs_services_64_characters(
    make_stack: Callable[..., Stack],
) -> None:
    # The jobs service takes status reports for job ids of at most 64 characters, and
    # items.job_id holds 64: a longer item could never report its state.
    stub = make_stack().start_pair().queue_stub()
    longest, too_long = "j" * 64, "j" * 65

    assert enqueue(stub, longest).item.job_id == longest
    assert stub.GetItem(qpb.GetItemRequest(job_id=longest), timeout=10).item.job_id == longest
    refused = [
        (stub.Enqueue, qpb.EnqueueRequest(job_id=too_long, generation=1, spec=spec("true"))),
        (stub.GetItem, qpb.GetItemRequest(job_id=too_long)),
        (stub.CancelItem, qpb.CancelItemRequest(job_id=too_long, generation=1)),
        (stub.Redrive, qpb.RedriveRequest(job_id=too_long)),
    ]
    for call, request in refused:
        with pytest.raises(grpc.RpcError) as error:
            call(request, timeout=10)
        failure = describe(error.value)
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT, type(request).__name__
        assert [f for f, _ in failure.field_violations] == ["job_id"], type(request).__name__
    batch = stub.BatchEnqueue(
        qpb.BatchEnqueueRequest(
            requests=[
                qpb.EnqueueRequest(job_id=too_long, generation=1, spec=spec("true")),
                qpb.EnqueueRequest(job_id="k" * 64, generation=1, spec=spec("true")),
            ]
        ),
        timeout=10,
    )

    error_result, created = batch.results
    assert error_result.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "job_id" in error_result.error.message
    assert created.response.item.job_id == "k" * 64
    listed = stub.ListItems(qpb.ListItemsRequest(), timeout=10).items
    assert sorted(item.job_id for item in listed) == [longest, "k" * 64]


def test_get_stats_counts_by_state_and_worker_type(make_stack: Callable[..., Stack]) -> None:
    stub = make_stack().start_pair().queue_stub()
    for i in range(3):
        enqueue(stub, f"job-{i}")
    enqueue(stub, "job-vm", "vm", "process")
    claim(stub, 1)  # job-0 leased for 5 s

    stats = stub.GetStats(qpb.GetStatsRequest(), timeout=10)
    assert dict(stats.items_by_state) == {
        "ITEM_STATE_WAITING": 3,
        "ITEM_STATE_LEASED": 1,
        "ITEM_STATE_SUCCEEDED": 0,
        "ITEM_STATE_FAILED": 0,
        "ITEM_STATE_DEAD_LETTERED": 0,
        "ITEM_STATE_CANCELLED": 0,
    }
    assert dict(stats.waiting_by_worker_types) == {"any": 2, "vm,process": 1}
    assert stats.leases_expiring == 1  # within the default 30 s
    soon = stub.GetStats(qpb.GetStatsRequest(expiring_within=pbtime.duration(1)), timeout=10)
    assert soon.leases_expiring == 0
    assert stats.oldest_waiting_age.ToNanoseconds() >= 0


def test_batch_complete_gives_each_completion_its_own_result(
    make_stack: Callable[..., Stack],
) -> None:
    stub = make_stack().start_pair().queue_stub()
    for i in range(3):
        enqueue(stub, f"job-{i}", max_attempts=1)
    leases = claim(stub, 3)
    ok = job_spec_pb2.OUTCOME_SUCCEEDED
    reply = stub.BatchComplete(
        qpb.BatchCompleteRequest(
            requests=[
                qpb.CompleteRequest(lease_token=leases[0].lease_token, outcome=ok, exit_code=0),
                qpb.CompleteRequest(lease_token="not-a-lease", outcome=ok),
                qpb.CompleteRequest(
                    lease_token=leases[2].lease_token,
                    outcome=job_spec_pb2.OUTCOME_FAILED,
                    exit_code=2,
                ),
            ]
        ),
        timeout=10,
    )
    first, stale, failed = reply.results
    assert first.item.state == qpb.ITEM_STATE_SUCCEEDED
    assert stale.error.reason == "LEASE_NOT_HELD" and stale.error.code == 9
    assert failed.item.state == qpb.ITEM_STATE_DEAD_LETTERED and failed.item.exit_code == 2
    # the second lease was not touched by the refused completion
    assert (
        stub.GetItem(qpb.GetItemRequest(job_id=leases[1].item.job_id), timeout=10).item.state
        == qpb.ITEM_STATE_LEASED
    )

    redriven = stub.Redrive(qpb.RedriveRequest(job_id=leases[2].item.job_id), timeout=10)
    assert redriven.item.state == qpb.ITEM_STATE_WAITING

    # A completion of the wrong shape (or with a NUL) is refused alone; the others apply.
    reply = stub.BatchComplete(
        qpb.BatchCompleteRequest(
            requests=[
                qpb.CompleteRequest(outcome=ok),
                qpb.CompleteRequest(lease_token="x"),
                qpb.CompleteRequest(lease_token="x\x00", outcome=ok),
                qpb.CompleteRequest(lease_token=leases[1].lease_token, outcome=ok),
            ]
        ),
        timeout=10,
    )
    no_token, no_outcome, nul, applied = reply.results
    assert no_token.error.code == no_outcome.error.code == nul.error.code == 3
    assert "lease_token: required" in no_token.error.message
    assert "outcome" in no_outcome.error.message
    assert "lease_token: must not contain NUL" in nul.error.message
    assert applied.item.state == qpb.ITEM_STATE_SUCCEEDED


def test_a_worker_gone_during_its_long_poll_is_handed_nothing(
    make_stack: Callable[..., Stack],
) -> None:
    """A worker killed while waiting in Claim: the item enqueued afterwards goes to a live
    worker at its first attempt, not to the dead worker's abandoned long poll."""
    stub = make_stack().start_pair().queue_stub()
    gone = stub.Claim.future(
        qpb.ClaimRequest(
            worker_id="w-gone",
            worker_type="process",
            lease_duration=pbtime.duration(30),
            wait=pbtime.duration(10),
        ),
        timeout=20,
    )
    time.sleep(0.5)  # the long poll is waiting in the server
    gone.cancel()  # what the server sees when the worker's connection closes
    time.sleep(0.5)
    enqueue(stub, "job-1")

    [lease] = claim(stub, 1)

    assert lease.item.job_id == "job-1" and lease.item.attempt == 1
    assert lease.item.worker_id == "w-api"


def test_batch_enqueue_enqueues_each_once_and_refuses_the_bad_ones_alone(
    make_stack: Callable[..., Stack],
) -> None:
    stub = make_stack().start_pair().queue_stub()

    def one(job_id: str, **fields: object) -> qpb.EnqueueRequest:
        return qpb.EnqueueRequest(job_id=job_id, generation=1, spec=spec("true"), **fields)  # type: ignore[arg-type]

    response = stub.BatchEnqueue(
        qpb.BatchEnqueueRequest(
            requests=[
                one("batch-1"),
                one("batch-1"),  # the same job and generation again: already there
                qpb.EnqueueRequest(job_id="batch-2", generation=1),  # no spec
                one("batch-3"),
            ]
        ),
        timeout=10,
    )

    kinds = [r.WhichOneof("result") for r in response.results]
    assert kinds == ["response", "response", "error", "response"]
    assert [r.response.created for r in response.results if r.HasField("response")] == [
        True,
        False,
        True,
    ]
    refused = response.results[2].error
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "spec" in refused.message
    assert sorted(lease.item.job_id for lease in claim(stub, 10)) == ["batch-1", "batch-3"]
    with pytest.raises(grpc.RpcError) as caught:
        stub.BatchEnqueue(qpb.BatchEnqueueRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_drained_worker_gets_no_new_claims_until_it_registers_again(
    make_stack: Callable[..., Stack],
) -> None:
    stub = make_stack().start_pair().queue_stub()
    stub.RegisterWorker(
        qpb.RegisterWorkerRequest(worker_id="w-api", worker_type="process", slots=2), timeout=10
    )
    enqueue(stub, "job-1")

    drained = stub.DrainWorker(qpb.DrainWorkerRequest(worker_id="w-api"), timeout=10).worker

    assert (drained.state, drained.drained) == (qpb.WORKER_STATE_DRAINING, True)
    assert claim(stub, 1) == []
    [listed] = stub.ListWorkers(qpb.ListWorkersRequest(), timeout=10).workers
    assert (listed.worker_id, listed.state, listed.drained) == (
        "w-api",
        qpb.WORKER_STATE_DRAINING,
        True,
    )
    stub.RegisterWorker(
        qpb.RegisterWorkerRequest(worker_id="w-api", worker_type="process", slots=2), timeout=10
    )
    assert [lease.item.job_id for lease in claim(stub, 1)] == ["job-1"]
    with pytest.raises(grpc.RpcError) as error:
        stub.DrainWorker(qpb.DrainWorkerRequest(worker_id="nobody"), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_register_worker_tells_the_worker_the_queues_worker_timeout(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack({"QUEUE_WORKER_TIMEOUT": "12"}).start_pair()
    reply = stack.queue_stub().RegisterWorker(
        qpb.RegisterWorkerRequest(worker_id="w-api", worker_type="process"), timeout=10
    )
    assert reply.worker_timeout.ToTimedelta().total_seconds() == 12
    # and the worker's own client reads it
    assert QueueClient(stack.channel(stack.queue_target)).register("w-2", "process", 1) == 12


def test_idle_workers_past_the_waiting_slots_leave_threads_for_other_calls(
    make_stack: Callable[..., Stack],
) -> None:
    """8 server threads: 4 may wait in long polls. Ten idle workers poll for a minute; six
    are answered at once (empty), and the queue still serves everything else."""
    stack = make_stack({"QUEUE_GRPC_THREADS": "8"}).start_pair()
    stub = stack.queue_stub()

    def long_poll(n: int) -> list[qpb.Lease]:
        request = qpb.ClaimRequest(
            worker_id=f"idle-{n}", worker_type="process", wait=pbtime.duration(60)
        )
        return list(stub.Claim(request, timeout=90).leases)

    pool = ThreadPoolExecutor(10)  # not joined: the four that wait end as the stack stops
    try:
        polls = [pool.submit(long_poll, n) for n in range(10)]
        answered = eventually(
            lambda: [p for p in polls if p.done()] if sum(p.done() for p in polls) >= 6 else None,
            20,
            "six claims answered without waiting",
        )
        assert [p.result() for p in answered] == [[]] * 6

        stats = stub.GetStats(qpb.GetStatsRequest(), timeout=10)  # a thread is free for it
        assert stats.items_by_state["ITEM_STATE_WAITING"] == 0
        enqueue(stub, "job-1")
        waiting = [p for p in polls if p not in answered]
        got = eventually(
            lambda: [p.result() for p in waiting if p.done() and p.result()],
            20,
            "a waiting worker to get the job",
        )
        assert [[lease.item.job_id for lease in leases] for leases in got] == [["job-1"]]
    finally:
        pool.shutdown(wait=False)
