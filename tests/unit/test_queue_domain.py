"""services.queue.domain: leases, attempts, retries, dead letters and the reports they owe."""

from __future__ import annotations

from dataclasses import fields
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.errors import FailedPrecondition
from services.queue import domain
from services.queue.domain import Item, ItemState, Outcome, Report, RetryPolicy
from services.queue.store import TRANSITION_FIELDS, _transition_values

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
POLICY = RetryPolicy(default_max_attempts=3, base_seconds=1.0, cap_seconds=60.0)


def make_item(max_attempts: int = 3, **fields: object) -> Item:
    item = Item(
        job_id="j-1",
        generation=1,
        spec=b"",
        state=ItemState.WAITING,
        priority=0,
        run_at=T0,
        seq=1,
        max_attempts=max_attempts,
        created_at=T0,
        updated_at=T0,
    )
    for name, value in fields.items():
        setattr(item, name, value)
    return item


def assert_lease_not_held(item: Item | None, token: str) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        domain.check_holder(item, token)
    assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.reason == "LEASE_NOT_HELD"
    assert caught.value.violation_type == "LEASE"


def test_enqueued_reports_queued() -> None:
    item = make_item()
    report = domain.enqueued(item, T0)
    assert (report.job_id, report.generation, report.job_state) == ("j-1", 1, "QUEUED")
    assert (report.sequence, report.attempt, report.reason) == (1, 0, "enqueued")


def test_lease_starts_an_attempt() -> None:
    item = make_item()
    report = domain.lease(item, "w-1", 30.0, T0)
    assert item.state is ItemState.LEASED
    assert item.attempt == 1
    assert item.lease_token
    assert item.lease_deadline == T0 + timedelta(seconds=30)
    assert (report.job_state, report.attempt, report.worker_id) == ("RUNNING", 1, "w-1")
    assert domain.check_holder(item, item.lease_token) is item


def test_every_lease_has_a_new_token() -> None:
    item = make_item()
    tokens = set()
    for _ in range(20):
        domain.lease(item, "w-1", 30.0, T0)
        assert item.lease_token is not None
        tokens.add(item.lease_token)
        domain.release(item, "", T0)
    assert len(tokens) == 20


def test_check_holder_rejects_stale_and_unknown_tokens() -> None:
    item = make_item()
    domain.lease(item, "w-1", 30.0, T0)
    old = item.lease_token
    assert old is not None
    assert_lease_not_held(item, "not-the-token")
    assert_lease_not_held(None, old)

    domain.fail_attempt(item, "boom", T0, POLICY)
    assert_lease_not_held(item, old)

    domain.lease(item, "w-2", 30.0, T0)
    assert item.lease_token != old
    assert_lease_not_held(item, old)
    assert domain.check_holder(item, item.lease_token) is item  # type: ignore[arg-type]


def test_heartbeat_extends_the_deadline() -> None:
    item = make_item()
    domain.lease(item, "w-1", 30.0, T0)
    later = T0 + timedelta(seconds=20)
    domain.heartbeat(item, None, later)
    assert item.lease_deadline == later + timedelta(seconds=30)
    domain.heartbeat(item, 5.0, later)
    assert item.lease_deadline == later + timedelta(seconds=5)
    assert item.lease_seconds == 5.0


def test_failed_attempt_waits_for_a_retry_in_the_future() -> None:
    item = make_item()
    domain.lease(item, "w-1", 30.0, T0)
    report = domain.fail_attempt(item, "exited with 2", T0, POLICY, exit_code=2, output_tail=b"x")
    assert item.state is ItemState.WAITING
    assert item.lease_token is None and item.lease_deadline is None
    # first retry: between base/2 and base
    assert T0 + timedelta(seconds=0.5) <= item.run_at <= T0 + timedelta(seconds=1.0)
    assert (report.job_state, report.attempt, report.exit_code) == ("QUEUED", 1, 2)
    assert report.error == "exited with 2"
    assert "attempt 1 failed; 2 left, retry in" in report.reason


def test_dead_letter_past_max_attempts() -> None:
    item = make_item(max_attempts=3)
    states = []
    for n in range(1, 4):
        domain.lease(item, f"w-{n}", 30.0, T0)
        report = domain.fail_attempt(item, f"failure {n}", T0, POLICY, exit_code=1)
        states.append((report.attempt, report.job_state))
    assert states == [(1, "QUEUED"), (2, "QUEUED"), (3, "FAILED")]
    assert item.state is ItemState.DEAD_LETTERED
    assert item.error == "failure 3"
    assert "attempt 3 failed, none left; dead-lettered" in report.reason


def test_complete_with_success() -> None:
    item = make_item()
    domain.lease(item, "w-1", 30.0, T0)
    token = item.lease_token
    report = domain.complete(item, Outcome.SUCCEEDED, 0, b"ok\n", "", T0, POLICY)
    assert item.state is ItemState.SUCCEEDED
    assert (report.job_state, report.exit_code, report.output_tail) == ("SUCCEEDED", 0, b"ok\n")
    assert_lease_not_held(item, token)  # type: ignore[arg-type]


def test_complete_with_failure_is_a_failed_attempt() -> None:
    item = make_item(max_attempts=2)
    domain.lease(item, "w-1", 30.0, T0)
    report = domain.complete(item, Outcome.FAILED, 7, b"tail", "", T0, POLICY)
    assert (item.state, report.job_state, report.error) == (
        ItemState.WAITING,
        "QUEUED",
        "exited with 7",
    )
    domain.lease(item, "w-1", 30.0, T0)
    report = domain.complete(item, Outcome.FAILED, 7, b"tail", "segfault", T0, POLICY)
    assert (item.state, report.job_state, report.error) == (
        ItemState.DEAD_LETTERED,
        "FAILED",
        "segfault",
    )


def test_complete_after_cancel() -> None:
    item = make_item()
    domain.lease(item, "w-1", 30.0, T0)
    assert domain.cancel(item, T0) is None
    assert item.cancel_requested and item.state is ItemState.LEASED
    report = domain.complete(item, Outcome.CANCELLED, 143, b"", "stopped", T0, POLICY)
    assert item.state is ItemState.CANCELLED
    assert (report.job_state, report.exit_code) == ("CANCELLED", 143)


def test_release_gives_the_attempt_back() -> None:
    item = make_item()
    domain.lease(item, "w-1", 30.0, T0)
    token = item.lease_token
    later = T0 + timedelta(seconds=3)
    report = domain.release(item, "the worker is shutting down", later)
    assert item.state is ItemState.WAITING
    assert item.attempt == 0
    assert item.run_at == later
    assert (report.job_state, report.attempt) == ("QUEUED", 0)
    assert report.reason == "released: the worker is shutting down"
    assert_lease_not_held(item, token)  # type: ignore[arg-type]
    assert domain.lease(item, "w-2", 30.0, later).attempt == 1


def test_cancel_a_waiting_item() -> None:
    item = make_item()
    report = domain.cancel(item, T0)
    assert report is not None and report.job_state == "CANCELLED"
    assert item.state is ItemState.CANCELLED


def test_cancel_a_dead_letter_ends_it_for_good() -> None:
    """The job was cancelled as its last attempt failed: the dead letter is cancelled
    too, so no Redrive runs a cancelled job again."""
    item = make_item(state=ItemState.DEAD_LETTERED)
    report = domain.cancel(item, T0)
    assert report is not None and report.job_state == "CANCELLED"
    assert item.state is ItemState.CANCELLED
    with pytest.raises(FailedPrecondition):
        domain.redrive(item, T0)


@pytest.mark.parametrize("state", [ItemState.SUCCEEDED, ItemState.FAILED, ItemState.CANCELLED])
def test_cancel_an_ended_item_is_refused(state: ItemState) -> None:
    item = make_item(state=state)
    with pytest.raises(FailedPrecondition) as caught:
        domain.cancel(item, T0)
    assert caught.value.metadata == {"current_state": state.value}
    assert item.state is state


def test_redrive_a_dead_letter() -> None:
    item = make_item(max_attempts=1)
    domain.lease(item, "w-1", 30.0, T0)
    domain.fail_attempt(item, "boom", T0, POLICY)
    later = T0 + timedelta(hours=1)
    report = domain.redrive(item, later)
    assert (item.state, item.attempt, item.run_at) == (ItemState.WAITING, 0, later)
    assert (report.job_state, report.attempt) == ("QUEUED", 0)
    assert domain.lease(item, "w-1", 30.0, later).attempt == 1


@pytest.mark.parametrize(
    "state", [ItemState.WAITING, ItemState.LEASED, ItemState.SUCCEEDED, ItemState.CANCELLED]
)
def test_redrive_of_anything_but_a_dead_letter_is_refused(state: ItemState) -> None:
    item = make_item(state=state)
    with pytest.raises(FailedPrecondition) as caught:
        domain.redrive(item, T0)
    assert caught.value.metadata == {"current_state": state.value}
    assert item.state is state


def test_expiry_counts_the_attempt_and_dead_letters_at_the_end() -> None:
    item = make_item(max_attempts=2)
    domain.lease(item, "w-1", 30.0, T0)
    first = domain.expire(item, T0, POLICY, "lease expired")
    assert (item.state, first.job_state, first.error) == (
        ItemState.WAITING,
        "QUEUED",
        "lease expired",
    )
    assert domain.lease(item, "w-2", 30.0, T0).attempt == 2
    last = domain.expire(item, T0, POLICY, "worker w-2 offline")
    assert (item.state, last.job_state) == (ItemState.DEAD_LETTERED, "FAILED")


def test_expiry_of_a_cancelled_lease_cancels() -> None:
    item = make_item()
    domain.lease(item, "w-1", 30.0, T0)
    domain.cancel(item, T0)
    report = domain.expire(item, T0, POLICY, "lease expired")
    assert (item.state, report.job_state) == (ItemState.CANCELLED, "CANCELLED")
    assert item.lease_token is None
    assert report.reason.startswith("cancelled;") and "lease expired" in report.reason


def test_accepts() -> None:
    item = make_item(worker_types=("process", "vm"), labels={"zone": "a"})
    assert item.accepts("process", {"zone": "a", "gpu": "no"})
    assert not item.accepts("mock", {"zone": "a"})
    assert not item.accepts("vm", {"zone": "b"})
    assert not item.accepts("vm", {})
    assert make_item().accepts("anything", {})


# ---- any sequence of moves ----------------------------------------------------------------

moves = st.lists(
    st.sampled_from(
        ["lease", "fail", "succeed", "cancel_outcome", "release", "expire", "cancel", "redrive"]
    ),
    max_size=80,
)


@settings(max_examples=300)
@given(st.integers(1, 5), st.floats(0.01, 100.0), st.floats(0.01, 1000.0), moves)
def test_any_sequence_of_moves_keeps_the_rules(
    max_attempts: int, base: float, cap: float, plan: list[str]
) -> None:
    policy = RetryPolicy(max_attempts, base, cap)
    item = make_item(max_attempts=max_attempts)
    reports: list[Report] = [domain.enqueued(item, T0)]
    for step, move in enumerate(plan, start=1):
        now = T0 + timedelta(seconds=step)
        before_attempt, before_state = item.attempt, item.state
        report: Report | None = None
        if move == "lease":
            if item.state is not ItemState.WAITING:
                continue
            report = domain.lease(item, "w", 30.0, now)
            assert item.attempt == before_attempt + 1
        elif move == "cancel":
            if not item.state.live and item.state is not ItemState.DEAD_LETTERED:
                with pytest.raises(FailedPrecondition):
                    domain.cancel(item, now)
                continue
            was_dead_letter = item.state is ItemState.DEAD_LETTERED
            report = domain.cancel(item, now)
            assert not was_dead_letter or item.state is ItemState.CANCELLED
        elif move == "redrive":
            if item.state is not ItemState.DEAD_LETTERED:
                with pytest.raises(FailedPrecondition):
                    domain.redrive(item, now)
                continue
            report = domain.redrive(item, now)
            assert item.attempt == 0
        else:
            if item.state is not ItemState.LEASED:
                continue
            token = item.lease_token
            assert token is not None
            if move == "fail":
                report = domain.fail_attempt(item, "boom", now, policy)
            elif move == "succeed":
                report = domain.complete(item, Outcome.SUCCEEDED, 0, b"", "", now, policy)
            elif move == "cancel_outcome":
                report = domain.complete(item, Outcome.CANCELLED, 143, b"", "", now, policy)
            elif move == "release":
                cancelled = item.cancel_requested
                report = domain.release(item, "", now)
                if cancelled:
                    assert (item.state, report.job_state) == (ItemState.CANCELLED, "CANCELLED")
                else:
                    assert item.attempt == before_attempt - 1
            else:
                report = domain.expire(item, now, policy, "lease expired")
            if move in ("fail", "expire") and item.cancel_requested:
                # a job cancelled while its attempt ran never runs again
                assert (item.state, report.job_state) == (ItemState.CANCELLED, "CANCELLED")
            with pytest.raises(FailedPrecondition):
                domain.check_holder(item, token)
            assert item.lease_token is None

        if move in ("fail", "expire") and not item.cancel_requested:
            assert item.attempt == before_attempt
            if before_attempt >= max_attempts:
                assert (item.state, report.job_state) == (ItemState.DEAD_LETTERED, "FAILED")
            else:
                assert (item.state, report.job_state) == (ItemState.WAITING, "QUEUED")
                assert now < item.run_at <= now + timedelta(seconds=cap)
        if report is not None:
            assert report.job_state in {"QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"}
            assert report.attempt == item.attempt
            reports.append(report)
        assert 0 <= item.attempt <= max_attempts
        assert item.state is before_state or report is not None or move == "cancel"

    sequences = [r.sequence for r in reports]
    assert sequences == list(range(1, len(reports) + 1))


# ---- a cancel that races the end of an attempt --------------------------------------------


@pytest.mark.parametrize("end", ["fail", "complete_failed", "release"])
def test_an_attempt_ending_after_a_cancel_is_not_run_again(end: str) -> None:
    item = make_item(max_attempts=3)
    domain.lease(item, "w-1", 30.0, T0)
    assert domain.cancel(item, T0) is None  # flagged: the worker learns it at its heartbeat
    if end == "fail":
        report = domain.fail_attempt(item, "exited with 1", T0, POLICY, exit_code=1)
    elif end == "complete_failed":
        report = domain.complete(item, Outcome.FAILED, 1, b"", "", T0, POLICY)
    else:
        report = domain.release(item, "the worker is shutting down", T0)
    # The job was cancelled: the item must not go back to WAITING to be claimed again.
    assert item.state is ItemState.CANCELLED, f"cancelled item is {item.state.value}"
    assert report.job_state == "CANCELLED"


# ---- what a transition may change: the store writes only these fields on a claim or a
# completion, so a transition that changed another would be lost ----------------------

TRANSITIONS = st.sampled_from(
    [
        "lease",
        "heartbeat",
        "succeed",
        "fail",
        "cancel_done",
        "release",
        "cancel",
        "expire",
        "redrive",
    ]
)


def apply(item: Item, move: str, now: datetime) -> None:
    if move == "lease" and item.state is ItemState.WAITING:
        domain.lease(item, "w-1", 30.0, now)
    elif move == "heartbeat" and item.state is ItemState.LEASED:
        domain.heartbeat(item, 45.0, now)
    elif move in ("succeed", "fail", "cancel_done") and item.state is ItemState.LEASED:
        outcome = {"succeed": Outcome.SUCCEEDED, "fail": Outcome.FAILED}.get(
            move, Outcome.CANCELLED
        )
        domain.complete(item, outcome, 3, b"tail", "boom", now, POLICY)
    elif move == "release" and item.state is ItemState.LEASED:
        domain.release(item, "drain", now)
    elif move == "cancel" and item.state in (
        ItemState.WAITING,
        ItemState.LEASED,
        ItemState.DEAD_LETTERED,
    ):
        domain.cancel(item, now)
    elif move == "expire" and item.state is ItemState.LEASED:
        domain.expire(item, now, POLICY, "expired")
    elif move == "redrive" and item.state is ItemState.DEAD_LETTERED:
        domain.redrive(item, now)


@given(st.lists(TRANSITIONS, max_size=12))
def test_transitions_change_only_the_fields_the_store_writes(moves: list[str]) -> None:
    item = make_item(labels={"a": "b"}, worker_types=("process",), trace_context={"t": "1"})
    now = T0
    for move in moves:
        before = {f.name: getattr(item, f.name) for f in fields(item)}
        now += timedelta(seconds=1)
        apply(item, move, now)
        changed = {name for name, value in before.items() if getattr(item, name) != value}
        assert changed <= set(TRANSITION_FIELDS), (move, changed - set(TRANSITION_FIELDS))


def test_the_store_writes_every_transition_field_in_its_place() -> None:
    item = make_item(state=ItemState.LEASED, attempt=2, lease_token="t", worker_id="w")
    item.lease_deadline, item.lease_seconds, item.version = T0 + timedelta(seconds=9), 9.0, 4
    item.exit_code, item.output_tail, item.error, item.report_seq = 3, b"tail", "err", 5
    item.cancel_requested, item.updated_at = True, T0 + timedelta(seconds=1)

    written = dict(zip(TRANSITION_FIELDS, _transition_values(item), strict=True))

    expected = {name: getattr(item, name) for name in TRANSITION_FIELDS}
    expected["state"] = item.state.value
    assert written == expected


def test_each_report_names_who_caused_it() -> None:
    item = make_item(max_attempts=1)
    assert domain.enqueued(item, T0).actor == "queue"
    assert domain.lease(item, "w-1", 30.0, T0).actor == "worker:w-1"
    assert domain.expire(item, T0, POLICY, "the lease expired").actor == "queue"
    assert domain.redrive(item, T0).actor == "operator"  # not the last worker, w-1
    domain.lease(item, "w-2", 30.0, T0)
    failed = domain.complete(item, Outcome.FAILED, 1, "", "", T0, POLICY)
    assert failed.actor == "worker:w-2"
