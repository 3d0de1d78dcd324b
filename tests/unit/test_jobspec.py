"""services.common.jobspec: one set of bounds for a JobSpec, every problem reported."""

from __future__ import annotations

from typing import Any

import pytest
from blixard.common.v1 import job_spec_pb2
from google.protobuf import duration_pb2

from services.common import jobspec
from services.common.errors import InvalidArgument
from services.common.validation import Problems


def valid_spec(**changes: Any) -> job_spec_pb2.JobSpec:
    fields: dict[str, Any] = {
        "command": ["echo", "hello"],
        "env": {"GREETING": "hi", "_X1": ""},
        "working_directory": "/tmp",
        "priority": 5,
        "max_attempts": 3,
        "labels": {"team": "infra", "app.kind/x-y": "v"},
        "payload": b"data",
        "requirements": job_spec_pb2.JobRequirements(
            worker_types=["process", "vm-2"],
            vcpus=2,
            memory_mb=512,
            timeout=duration_pb2.Duration(seconds=60),
            labels={"zone": "a"},
        ),
    }
    fields.update(changes)
    return job_spec_pb2.JobSpec(**fields)


def fields_of(spec: job_spec_pb2.JobSpec) -> list[str]:
    problems = Problems()
    jobspec.check_spec(spec, "spec", problems)
    return [v.field for v in problems]


def test_a_valid_spec_has_no_problems() -> None:
    assert fields_of(valid_spec()) == []


def test_a_minimal_spec_has_no_problems() -> None:
    assert fields_of(job_spec_pb2.JobSpec(command=["true"])) == []


def test_every_problem_is_reported() -> None:
    spec = valid_spec(
        command=[],
        env={"1BAD": "x", "GOOD": "y"},
        priority=1001,
        labels={f"k{i}": "v" for i in range(jobspec.MAX_LABELS + 1)},
        requirements=job_spec_pb2.JobRequirements(
            worker_types=["Bad_Type"], timeout=duration_pb2.Duration(seconds=0)
        ),
    )
    problems = Problems()
    jobspec.check_spec(spec, "spec", problems)
    assert sorted(v.field for v in problems) == sorted(
        [
            "spec.command",
            "spec.env[1BAD]",
            "spec.priority",
            "spec.labels",
            "spec.requirements.worker_types[0]",
            "spec.requirements.timeout",
        ]
    )
    with pytest.raises(InvalidArgument) as caught:
        problems.raise_if_any()
    assert "the request has 6 problems" in caught.value.message
    assert len(caught.value.violations) == 6


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"command": [""]}, "spec.command[0]"),
        ({"command": ["echo", "a\x00b"]}, "spec.command"),
        ({"command": ["x"] * (jobspec.MAX_ARGS + 1)}, "spec.command"),
        ({"command": ["echo", "a" * jobspec.MAX_COMMAND_BYTES]}, "spec.command"),
        ({"env": {"A-B": "1"}}, "spec.env[A-B]"),
        ({"env": {"A": "x\x00"}}, "spec.env[A]"),
        ({"env": {f"V{i}": "" for i in range(jobspec.MAX_ENV_ENTRIES + 1)}}, "spec.env"),
        ({"working_directory": "/tmp/\x00"}, "spec.working_directory"),
        ({"working_directory": "/" * (jobspec.MAX_PATH + 1)}, "spec.working_directory"),
        ({"priority": -1001}, "spec.priority"),
        ({"max_attempts": 101}, "spec.max_attempts"),
        ({"payload": b"x" * (jobspec.MAX_PAYLOAD_BYTES + 1)}, "spec.payload"),
        ({"labels": {"Team": "x"}}, "spec.labels[Team]"),
        ({"labels": {"team-": "x"}}, "spec.labels[team-]"),
        ({"labels": {"k" * 64: "x"}}, "spec.labels[" + "k" * 64 + "]"),
        ({"labels": {"team": "v" * 257}}, "spec.labels[team]"),
    ],
)
def test_one_problem_each(changes: dict[str, Any], field: str) -> None:
    assert fields_of(valid_spec(**changes)) == [field]


@pytest.mark.parametrize(
    ("requirements", "field"),
    [
        ({"worker_types": [f"t{i}" for i in range(17)]}, "spec.requirements.worker_types"),
        ({"worker_types": ["1abc"]}, "spec.requirements.worker_types[0]"),
        ({"worker_types": ["a" * 33]}, "spec.requirements.worker_types[0]"),
        ({"vcpus": 65}, "spec.requirements.vcpus"),
        ({"memory_mb": 256 * 1024 + 1}, "spec.requirements.memory_mb"),
        ({"timeout": duration_pb2.Duration(seconds=-1)}, "spec.requirements.timeout"),
        (
            {"timeout": duration_pb2.Duration(seconds=jobspec.MAX_TIMEOUT_SECONDS + 1)},
            "spec.requirements.timeout",
        ),
        ({"labels": {"Zone": "a"}}, "spec.requirements.labels[Zone]"),
    ],
)
def test_one_requirement_problem_each(requirements: dict[str, Any], field: str) -> None:
    spec = job_spec_pb2.JobSpec(
        command=["true"], requirements=job_spec_pb2.JobRequirements(**requirements)
    )
    assert fields_of(spec) == [field]


@pytest.mark.parametrize(
    "changes",
    [
        {"priority": -1000},
        {"priority": 1000},
        {"max_attempts": 100},
        {"labels": {f"k{i}": "v" for i in range(jobspec.MAX_LABELS)}},
        {"labels": {"k" * 63: "v" * 256}},
        {"command": ["x"] * jobspec.MAX_ARGS},
        {
            "requirements": job_spec_pb2.JobRequirements(
                timeout=duration_pb2.Duration(seconds=jobspec.MAX_TIMEOUT_SECONDS)
            )
        },
        {"requirements": job_spec_pb2.JobRequirements(timeout=duration_pb2.Duration(nanos=1))},
        {"requirements": job_spec_pb2.JobRequirements(vcpus=64, memory_mb=256 * 1024)},
    ],
)
def test_limits_are_inclusive(changes: dict[str, Any]) -> None:
    assert fields_of(valid_spec(**changes)) == []


def test_field_prefix_is_the_callers() -> None:
    problems = Problems()
    jobspec.check_spec(job_spec_pb2.JobSpec(), "request.spec", problems)
    assert [v.field for v in problems] == ["request.spec.command"]


def test_a_vm_job_must_be_able_to_reach_a_vm_worker() -> None:
    from services.common.jobspec import worker_types_for

    vm = job_spec_pb2.ISOLATION_LEVEL_VM
    spec = job_spec_pb2.JobSpec(command=["uname", "-r"])
    spec.requirements.isolation = vm
    assert worker_types_for(spec.requirements) == ("vm",)
    problems = Problems()
    jobspec.check_spec(spec, "spec", problems)
    assert len(problems) == 0
    spec.requirements.worker_types.append("process")
    jobspec.check_spec(spec, "spec", problems)
    assert [v.field for v in problems] == ["spec.requirements.worker_types"]
    spec.requirements.worker_types.append("vm")
    assert worker_types_for(spec.requirements) == ("process", "vm")
