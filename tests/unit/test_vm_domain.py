"""VM states: the JSON form, the legacy text form (every field kept), the state machine,
and counts by kind (never by the serialised form)."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.errors import FailedPrecondition
from services.vms import domain
from services.vms.domain import (
    Busy,
    Draining,
    Failed,
    Idle,
    Kind,
    Ready,
    Starting,
    StateFormatError,
    Terminated,
)

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
seconds = st.integers(min_value=0, max_value=4_000_000_000).map(float) | st.floats(
    min_value=0, max_value=4e9, allow_nan=False, allow_infinity=False
)
states = st.one_of(
    st.just(Starting()),
    st.just(Ready()),
    st.just(Draining()),
    st.builds(Busy, text, seconds),
    st.builds(Idle, st.integers(min_value=0, max_value=10**9), seconds),
    st.builds(Terminated, text, st.none() | st.integers(min_value=-(2**31), max_value=2**31 - 1)),
    st.builds(Failed, text),
)


@given(states)
def test_json_round_trips_every_state(state: domain.VmState) -> None:
    stored = domain.to_json(state)
    assert json.loads(stored)["state"] == state.kind.value
    assert domain.parse_stored(stored) == (state, False)


@given(states)
def test_the_legacy_form_is_parsed_with_all_its_fields(state: domain.VmState) -> None:
    parsed, legacy = domain.parse_stored(domain.to_legacy(state))
    assert legacy is True
    assert parsed == state


@pytest.mark.parametrize(
    "legacy, expected",
    [
        ('Busy { job_id: "j-1", started_at: 1732700000 }', Busy("j-1", 1732700000.0)),
        ("Idle { jobs_completed: 3, last_job_at: 1732700100 }", Idle(3, 1732700100.0)),
        (
            'Terminated { reason: "stopped by user", exit_code: Some(137) }',
            Terminated("stopped by user", 137),
        ),
        ('Terminated { reason: "", exit_code: None }', Terminated("", None)),
        ('Failed { error: "boot \\"timed\\" out\\n" }', Failed('boot "timed" out\n')),
        ("Starting", Starting()),
        ("Ready", Ready()),
        ("Draining", Draining()),
        ('Busy{job_id:"x",started_at:1.5,}', Busy("x", 1.5)),
        ('Failed { error: "caf\\u{e9}" }', Failed("café")),
    ],
)
def test_legacy_rows_of_the_old_system(legacy: str, expected: domain.VmState) -> None:
    assert domain.parse_stored(legacy) == (expected, True)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "Sleeping",
        "Busy { job_id: 3, started_at: 1 }",
        'Busy { job_id: "j-1" }',
        'Busy { job_id: "j-1", started_at: 1',
        "Idle { jobs_completed: -1, last_job_at: 1 }",
        '{"state": "busy"}',
        '{"state": "nope"}',
        "{not json",
        "Ready trailing",
    ],
)
def test_unreadable_states_are_errors_not_empty_fields(bad: str) -> None:
    with pytest.raises(StateFormatError):
        domain.parse_stored(bad)


def test_the_state_machine_allows_the_life_of_a_vm() -> None:
    life = [Starting(), Ready(), Busy("j", 1.0), Idle(1, 2.0), Busy("k", 3.0), Idle(2, 4.0)]
    for before, after in itertools.pairwise(life):
        domain.check_move("vm", before, after)
    domain.check_move("vm", Idle(2, 4.0), Draining())
    domain.check_move("vm", Draining(), Terminated("stopped", 0))


@pytest.mark.parametrize(
    "before, after",
    [
        (Terminated("x"), Ready()),
        (Failed("x"), Starting()),
        (Starting(), Busy("j", 1.0)),
        (Draining(), Busy("j", 1.0)),
        (Ready(), Idle(1, 1.0)),
    ],
)
def test_illegal_moves_are_failed_precondition(
    before: domain.VmState, after: domain.VmState
) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        domain.check_move("vm-1", before, after)
    assert caught.value.reason == "ILLEGAL_TRANSITION"


def test_counts_are_by_kind_whatever_the_fields() -> None:
    # The old monitor keyed its counts by the serialised state: idle VMs with different
    # job counts never matched "Idle", so it counted zero idle VMs and kept booting more.
    counts = domain.count_by_kind([Idle(1, 10.0), Idle(5, 20.0), Busy("j", 1.0), Ready()])
    assert counts[Kind.IDLE] == 2
    assert counts[Kind.BUSY] == 1
    assert counts[Kind.READY] == 1
    assert counts[Kind.FAILED] == 0
