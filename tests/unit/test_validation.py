"""services.common.validation: all of a request's problems in one INVALID_ARGUMENT."""

from __future__ import annotations

import grpc
import pytest
from blixard.common.v1 import job_spec_pb2
from blixard.jobs.v1 import jobs_service_pb2 as jpb
from blixard.queue.v1 import queue_service_pb2 as qpb

from services.common.errors import InvalidArgument
from services.common.validation import (
    FieldViolation,
    Problems,
    check_each,
    check_fields,
    combine,
)


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


# ---- the edge rule -------------------------------------------------------------------------


def _violations(message) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    problems = Problems()
    check_fields(message, problems)
    return [(v.field, v.description) for v in problems]


def test_the_edge_rule_names_every_nul_and_every_integer_past_a_column() -> None:
    request = jpb.SubmitJobRequest(
        request_id="r\x00",
        spec=job_spec_pb2.JobSpec(
            command=["echo", "a\x00"],
            env={"A": "\x00"},
            max_attempts=2**31,
            requirements=job_spec_pb2.JobRequirements(labels={"k\x00": "v"}),
        ),
    )
    nul = "must not contain NUL (\\0) characters"
    assert sorted(_violations(request)) == sorted(
        [
            ("request_id", nul),
            ("spec.command[1]", nul),
            ("spec.env[A]", nul),
            ("spec.max_attempts", f"at most {2**31 - 1}"),
            ("spec.requirements.labels[k\\0]", f"the key {nul}"),
        ]
    )


def test_the_edge_rule_lets_a_jobs_output_and_error_through() -> None:
    done = qpb.CompleteRequest(lease_token="t", output_tail="a\x00", error="\x00b")
    assert _violations(done) == []
    assert _violations(qpb.CompleteRequest(lease_token="t\x00")) == [
        ("lease_token", "must not contain NUL (\\0) characters")
    ]


def test_the_edge_rule_leaves_a_batchs_items_to_the_batch_and_bounds_lists() -> None:
    batch = jpb.BatchUpdateJobStatusRequest(
        requests=[jpb.UpdateJobStatusRequest(job_id="\x00", sequence=2**63)]
    )
    assert _violations(batch) == []
    assert _violations(jpb.ListJobsRequest(states=[1] * 65)) == [("states", "at most 64 entries")]
    big = jpb.BatchUpdateJobStatusRequest(requests=[jpb.UpdateJobStatusRequest()] * 1025)
    assert _violations(big) == [("requests", "at most 1024 entries")]


def test_check_each_applies_the_edge_rule_to_each_item() -> None:
    bad = jpb.UpdateJobStatusRequest(job_id="j", sequence=2**63)
    good = jpb.UpdateJobStatusRequest(job_id="j", sequence=1)
    batch = check_each([bad, good], lambda _r, _p: None, at_most=10)
    assert batch.valid == [good]
    assert batch.refused[0].violations == [("sequence", f"at most {2**63 - 1}")]


def test_a_million_problems_keep_the_first_and_count_the_rest() -> None:
    problems = Problems()
    for i in range(1_000_000):
        problems.add(f"states[{i}]", "not a state")
    error = problems.error()
    assert error is not None
    assert len(error.violations) == 20
    assert error.metadata == {"problems": "1000000"}
    assert error.message.startswith("the request has 1000000 problems: states[0]: not a state")
    assert len(error.message.encode()) <= 512


def test_the_fast_rule_for_bytes_without_nul_finds_every_bound_the_walk_finds() -> None:
    """check_request reads only integers and lengths when the bytes hold no NUL; on such
    requests it finds what the full walk finds."""
    from services.common.errors import InvalidArgument as Refused
    from services.common.validation import check_request

    requests = [
        jpb.SubmitJobRequest(
            spec=job_spec_pb2.JobSpec(
                command=["x"] * 1025,
                max_attempts=2**31,
                requirements=job_spec_pb2.JobRequirements(vcpus=2**32 - 1),
            )
        ),
        jpb.AppendJobOutputRequest(attempt=2**31, total_bytes=2**64 - 1),
        jpb.ListJobsRequest(states=[1] * 65, labels={f"k{i}": "v" for i in range(1025)}),
        qpb.BatchCompleteRequest(requests=[qpb.CompleteRequest(lease_token="t")] * 1025),
        jpb.BatchUpdateJobStatusRequest(requests=[jpb.UpdateJobStatusRequest(sequence=2**63)]),
        jpb.GetJobRequest(job_id="fine"),
    ]
    for request in requests:
        raw = request.SerializeToString()
        assert b"\x00" not in raw
        walked = _violations(request)
        try:
            check_request(request, raw)
            fast: list[tuple[str, str]] = []
        except Refused as error:
            fast = error.violations
        assert sorted(fast) == sorted(walked), type(request).__name__
