"""Checks of the shared ``blixard.common.v1.JobSpec``: one set of bounds for every service
that accepts a spec (jobs on submit, queue on enqueue)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from blixard.common.v1 import job_spec_pb2
from google.protobuf import duration_pb2, timestamp_pb2

from services.common import pbtime
from services.common.validation import Problems

MAX_ARGS = 1024
MAX_COMMAND_BYTES = 64 * 1024
MAX_ENV_ENTRIES = 256
MAX_ENV_BYTES = 64 * 1024
MAX_LABELS = 32
MAX_LABEL_KEY = 63
MAX_LABEL_VALUE = 256
MAX_PAYLOAD_BYTES = 256 * 1024
MAX_WORKER_TYPES = 16
MAX_ATTEMPTS = 100
MAX_PRIORITY = 1000
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600
MAX_VCPUS = 64
MAX_MEMORY_MB = 256 * 1024
MAX_PATH = 4096
VM_WORKER_TYPE = "vm"


def worker_types_for(requirements: job_spec_pb2.JobRequirements) -> tuple[str, ...]:
    """The worker types that may take a job: those it names; a job asking for isolation
    VM and naming none goes to vm workers only."""
    if not requirements.worker_types and requirements.isolation == job_spec_pb2.ISOLATION_LEVEL_VM:
        return (VM_WORKER_TYPE,)
    return tuple(requirements.worker_types)


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL_KEY = re.compile(r"^[a-z0-9]([a-z0-9._/-]*[a-z0-9])?$")
_WORKER_TYPE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
# Job, item and worker ids: what the queue accepts, and what a worker checks its WORKER_ID by.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")
MAX_ID = 128
ID_RULE = "letters, digits and ._:@-, starting with a letter or digit (at most {} characters)"


def is_valid_id(value: str, at_most: int = MAX_ID) -> bool:
    return len(value) <= at_most and _ID.fullmatch(value) is not None


def check_id(value: str, field: str, problems: Problems, at_most: int = MAX_ID) -> None:
    if problems.check(bool(value), field, "required"):
        problems.check(is_valid_id(value, at_most), field, ID_RULE.format(at_most))


def check_labels(labels: Mapping[str, str], field: str, problems: Problems) -> None:
    items = dict(labels)
    problems.check(len(items) <= MAX_LABELS, field, f"at most {MAX_LABELS} labels")
    for key, value in items.items():
        problems.check(
            bool(_LABEL_KEY.match(key)) and len(key) <= MAX_LABEL_KEY,
            f"{field}[{key}]",
            f"label keys are lowercase letters, digits and ._/- (at most "
            f"{MAX_LABEL_KEY} characters)",
        )
        problems.check(
            len(value) <= MAX_LABEL_VALUE,
            f"{field}[{key}]",
            f"label values are at most {MAX_LABEL_VALUE} characters",
        )


def check_timestamp(message: timestamp_pb2.Timestamp, field: str, problems: Problems) -> bool:
    problem = pbtime.timestamp_problem(message)
    return problems.check(problem is None, field, f"not a valid time: {problem}")


def check_duration(message: duration_pb2.Duration, field: str, problems: Problems) -> bool:
    problem = pbtime.duration_problem(message)
    return problems.check(problem is None, field, f"not a valid duration: {problem}")


def check_worker_type(value: str, field: str, problems: Problems) -> None:
    problems.check(
        bool(_WORKER_TYPE.match(value)),
        field,
        "lowercase letters, digits and -, starting with a letter (at most 32)",
    )


def check_spec(spec: job_spec_pb2.JobSpec, field: str, problems: Problems) -> None:
    command = list(spec.command)
    if not command:
        problems.add(f"{field}.command", "required: the program and its arguments (argv)")
    elif not command[0]:
        problems.add(f"{field}.command[0]", "the program must not be empty")
    problems.check(len(command) <= MAX_ARGS, f"{field}.command", f"at most {MAX_ARGS} arguments")
    problems.check(
        sum(len(a.encode()) for a in command) <= MAX_COMMAND_BYTES,
        f"{field}.command",
        f"at most {MAX_COMMAND_BYTES} bytes in all",
    )
    if any("\x00" in a for a in command):
        problems.add(f"{field}.command", "arguments must not contain NUL characters")

    env = dict(spec.env)
    problems.check(
        len(env) <= MAX_ENV_ENTRIES, f"{field}.env", f"at most {MAX_ENV_ENTRIES} variables"
    )
    problems.check(
        sum(len(k) + len(v) for k, v in env.items()) <= MAX_ENV_BYTES,
        f"{field}.env",
        f"at most {MAX_ENV_BYTES} bytes in all",
    )
    for name, value in env.items():
        problems.check(
            bool(_ENV_NAME.match(name)),
            f"{field}.env[{name}]",
            "names are letters, digits and _, not starting with a digit",
        )
        problems.check(
            "\x00" not in value, f"{field}.env[{name}]", "values must not contain NUL characters"
        )

    problems.check(
        len(spec.working_directory) <= MAX_PATH and "\x00" not in spec.working_directory,
        f"{field}.working_directory",
        f"at most {MAX_PATH} characters, no NUL",
    )
    problems.check(
        -MAX_PRIORITY <= spec.priority <= MAX_PRIORITY,
        f"{field}.priority",
        f"between {-MAX_PRIORITY} and {MAX_PRIORITY}",
    )
    problems.check(
        spec.max_attempts <= MAX_ATTEMPTS,
        f"{field}.max_attempts",
        f"at most {MAX_ATTEMPTS} (0 = the default)",
    )
    problems.check(
        len(spec.payload) <= MAX_PAYLOAD_BYTES,
        f"{field}.payload",
        f"at most {MAX_PAYLOAD_BYTES} bytes",
    )
    check_labels(spec.labels, f"{field}.labels", problems)

    req = spec.requirements
    rfield = f"{field}.requirements"
    problems.check(
        len(req.worker_types) <= MAX_WORKER_TYPES,
        f"{rfield}.worker_types",
        f"at most {MAX_WORKER_TYPES}",
    )
    for i, worker_type in enumerate(req.worker_types):
        check_worker_type(worker_type, f"{rfield}.worker_types[{i}]", problems)
    if req.isolation == job_spec_pb2.ISOLATION_LEVEL_VM and req.worker_types:
        problems.check(
            VM_WORKER_TYPE in req.worker_types,
            f"{rfield}.worker_types",
            f'a job with isolation VM runs on "{VM_WORKER_TYPE}" workers: name it, or name none',
        )
    problems.check(req.vcpus <= MAX_VCPUS, f"{rfield}.vcpus", f"at most {MAX_VCPUS}")
    problems.check(
        req.memory_mb <= MAX_MEMORY_MB, f"{rfield}.memory_mb", f"at most {MAX_MEMORY_MB}"
    )
    if req.HasField("timeout") and check_duration(req.timeout, f"{rfield}.timeout", problems):
        seconds = req.timeout.seconds + req.timeout.nanos / 1e9
        problems.check(
            0 < seconds <= MAX_TIMEOUT_SECONDS,
            f"{rfield}.timeout",
            f"positive and at most {MAX_TIMEOUT_SECONDS} seconds",
        )
    check_labels(req.labels, f"{rfield}.labels", problems)
    if spec.HasField("run_at"):
        check_timestamp(spec.run_at, f"{field}.run_at", problems)
