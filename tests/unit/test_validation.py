"""services.common.validation: all of a request's problems in one INVALID_ARGUMENT."""

from __future__ import annotations

import grpc
import pytest

from services.common.errors import InvalidArgument
from services.common.validation import FieldViolation, Problems, combine


def test_combine_of_nothing_is_no_error() -> None:
    assert combine([]) is None
    assert combine(iter(())) is None
    assert combine(v for v in []) is None


def test_combine_lists_every_field() -> None:
    error = combine(
        [
            FieldViolation("spec.command", "required"),
            FieldViolation("spec.priority", "between -1000 and 1000"),
            FieldViolation("page_size", "at most 1000"),
        ]
    )
    assert isinstance(error, InvalidArgument)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.violations == [
        ("spec.command", "required"),
        ("spec.priority", "between -1000 and 1000"),
        ("page_size", "at most 1000"),
    ]
    assert error.message == (
        "the request has 3 problems: spec.command: required; "
        "spec.priority: between -1000 and 1000; page_size: at most 1000"
    )


def test_combine_of_one_problem_says_one_problem() -> None:
    error = combine([FieldViolation("job_id", "required")])
    assert error is not None
    assert error.message == "the request has 1 problem: job_id: required"


def test_combine_accepts_a_generator() -> None:
    error = combine(FieldViolation(f"f{i}", "bad") for i in range(4))
    assert error is not None
    assert [f for f, _ in error.violations] == ["f0", "f1", "f2", "f3"]


def test_problems_collects_and_raises_them_all() -> None:
    problems = Problems()
    assert problems.check(True, "ok", "never recorded") is True
    assert problems.check(False, "a", "is bad") is False
    problems.add("b", "is worse")
    problems.extend([FieldViolation("c", "is missing")])
    assert len(problems) == 3
    assert [v.field for v in problems] == ["a", "b", "c"]

    with pytest.raises(InvalidArgument) as caught:
        problems.raise_if_any()
    assert caught.value.violations == [("a", "is bad"), ("b", "is worse"), ("c", "is missing")]
    assert "3 problems" in caught.value.message


def test_no_problems_raise_nothing() -> None:
    problems = Problems()
    problems.check(True, "a", "fine")
    assert len(problems) == 0
    assert problems.error() is None
    problems.raise_if_any()


def test_check_each_refuses_each_bad_request_alone_and_merge_keeps_the_order() -> None:
    from services.common.validation import check_each

    def positive(n: int, problems: Problems) -> None:
        problems.check(n > 0, "n", "must be positive")

    batch = check_each([3, -1, 5, 0], positive, at_most=4)

    assert batch.valid == [3, 5] and sorted(batch.refused) == [1, 3]
    merged = batch.merge(f"ok {n}" for n in batch.valid)
    assert merged[0] == "ok 3" and merged[2] == "ok 5"
    assert all(isinstance(merged[i], InvalidArgument) for i in (1, 3))
    with pytest.raises(InvalidArgument, match="requests: between 1 and 3"):
        check_each([1, 2, 3, 4], positive, at_most=3)
    with pytest.raises(InvalidArgument, match="requests: between 1 and 3"):
        check_each([], positive, at_most=3)
