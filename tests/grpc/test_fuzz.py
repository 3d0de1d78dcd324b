"""Every RPC of every service, sent what a hostile client sends: requests drawn from the
message descriptors (so a new RPC or field is fuzzed without an edit here), and raw bytes
that are no message at all; with no token, a wrong one, and each role's. On SQLite and on
PostgreSQL. Whatever comes, no service answers INTERNAL or UNKNOWN, every error is a
readable google.rpc.Status, nothing logs a traceback, memory stays bounded, and a normal
job still runs to SUCCEEDED afterwards.

The RPCs are found by walking the generated modules under ``gen/blixard`` (plus health and
reflection, which every server mounts); the test checks that reflection lists no service
it does not cover. No worker runs here: a fuzzed spec is never executed.
"""

from __future__ import annotations

import gc
import importlib
import itertools
import logging
import os
import pkgutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import blixard
import grpc
import pytest
from blixard.common.v1 import job_spec_pb2
from blixard.jobs.v1 import jobs_service_pb2 as jpb
from blixard.queue.v1 import queue_service_pb2 as qpb
from blixard.vms.v1 import vm_service_pb2 as vpb
from blixard.vms.v1 import vm_service_pb2_grpc as vpb_grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common import pbtime
from services.common.errors import describe
from tests.grpc.conftest import (
    ADMIN_TOKEN,
    CLIENT_TOKEN,
    RPC_TIMEOUT,
    TOKENS,
    WORKER_TOKEN,
    Stack,
    eventually,
    postgres_overrides,
    spec,
)

# The servers' own threads draw from ``random`` (retry jitter) while hypothesis generates.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module:hypothesis.errors.HypothesisDeprecationWarning"
)

CALL_TIMEOUT = 1.5  # a watch or a long poll on a live job ends here
MAX_EXAMPLES = int(os.environ.get("BLIXARD_FUZZ_EXAMPLES", "12"))  # more for a deeper run
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
# Codes gRPC itself may answer without the service saying anything (no details then).
BY_GRPC = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")
RSS_GROWTH_MIB = 300
LIVE_JOBS = 100  # more than the sweep's updates of one job id field
LEASED_JOBS = 120  # more than the sweep's completions and heartbeats


# ---- the RPCs, from the generated modules --------------------------------------------------


def _generated_services() -> list[ServiceDescriptor]:
    services = []
    for module in pkgutil.walk_packages(blixard.__path__, "blixard."):
        if module.name.endswith("_pb2"):
            file = importlib.import_module(module.name).DESCRIPTOR
            services.extend(file.services_by_name.values())
    return services


SERVICES = [
    *_generated_services(),
    health_pb2.DESCRIPTOR.services_by_name["Health"],
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
]


@dataclass(frozen=True)
class Rpc:
    service: str
    method: str
    request: Descriptor
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"

    def __str__(self) -> str:
        return f"{self.service.rsplit('.', 1)[-1]}.{self.method}"


RPCS = [
    Rpc(
        service.full_name,
        method.name,
        method.input_type,
        method.client_streaming,
        method.server_streaming,
    )
    for service in SERVICES
    for method in service.methods
]


# ---- strategies from descriptors -------------------------------------------------------------

# Ids that exist on the stack (filled in by the fixture), so requests reach past NOT_FOUND.
KNOWN: list[str] = []  # all of them
LIVE: list[str] = []  # not ended: an update of one is applied (once per job, for the sweep)
ENDED: list[str] = []  # cancelled: a watch of one ends at once
_NEXT_LIVE = itertools.count()
LEASES: list[str] = []  # tokens of live leases, so completions and heartbeats reach the store
_NEXT_LEASE = itertools.count()

_TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "\x00", "a\x00b", "j-1", "process", "vm"]),
    # Just past the widths of columns and checks (ids 36/64/128, names 256, paths 4096).
    st.sampled_from([37, 65, 129, 257, 301, 601, 1025, 4097, 65_000]).map(lambda n: "é" * n),
    st.integers(0, 15).map(lambda i: KNOWN[i % len(KNOWN)] if KNOWN else ""),
)
# A spec's program is never one that exists: no fuzzed job could ever run anything.
_PROGRAM = st.sampled_from(["", "\x00", "/nonexistent/blixard-fuzz", "é" * 5])

_INTS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = sorted(
        {v for v in (0, 1, 2, 5, low, high, 2**31 - 1, 2**31, 2**63) if low <= v <= high}
    )
    return st.one_of(st.sampled_from(edges), st.integers(low, high), st.integers(0, 100))


def _scalar(fd: FieldDescriptor) -> st.SearchStrategy[Any]:
    if fd.type == FieldDescriptor.TYPE_STRING:
        return _TEXT
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=16), st.just(70_000).map(lambda n: b"\x00" * n))
    if fd.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if fd.type == FieldDescriptor.TYPE_ENUM:
        values = [v.number for v in fd.enum_type.values]
        return st.one_of(st.sampled_from(values), st.integers(-(2**31), 2**31 - 1))
    if fd.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    return _integers(*_INTS[fd.type])


def _filler(fd: FieldDescriptor) -> Any:
    """A small element, repeated to make a list far past any bound."""
    if fd.message_type is not None:
        return message_factory.GetMessageClass(fd.message_type)()
    if fd.enum_type is not None:
        return fd.enum_type.values[-1].number
    return {FieldDescriptor.TYPE_STRING: "", FieldDescriptor.TYPE_BYTES: b""}.get(fd.type, 1)


def _single(fd: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if fd.message_type is not None:
        return messages(fd.message_type, depth + 1)
    return _scalar(fd)


def _field(fd: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        key = _scalar(fd.message_type.fields_by_name["key"])
        value = _single(fd.message_type.fields_by_name["value"], depth)
        return st.dictionaries(key, value, max_size=3)
    if fd.is_repeated:
        one = _single(fd, depth)
        if fd.full_name == "blixard.common.v1.JobSpec.command":
            return st.builds(
                lambda program, args: [program, *args], _PROGRAM, st.lists(one, max_size=3)
            )
        huge = st.sampled_from([65, 1025, 200_000]).map(lambda n: [_filler(fd)] * n)
        return st.one_of(st.lists(one, max_size=3), huge)
    return _single(fd, depth)


# What a well-behaved client sends in a text field, by the field's name (else "a"), so
# that one hostile field beside such values gets past the other checks to the store.
_PLAUSIBLE_TEXT = {
    "worker_type": "process",
    "worker_types": "process",
    "worker_id": "w-fuzz",
    "page_token": "",
    "command": "/nonexistent/blixard-fuzz",
}


def _plausible(fd: FieldDescriptor, streaming: bool = False) -> Any:
    """One plausible value of this field (a list of one, a map of one entry): the job ids
    are those of a known job (a live one, or an ended one for a streaming call, whose
    stream then ends at once)."""
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        return {"team": _plausible(fd.message_type.fields_by_name["value"], streaming)}
    if fd.message_type is not None:
        one: Any = plausible_message(fd.message_type, streaming)
    elif fd.type == FieldDescriptor.TYPE_STRING:
        if fd.name == "job_id" and KNOWN:
            one = ENDED[0] if streaming else LIVE[next(_NEXT_LIVE) % len(LIVE)]
        elif fd.name == "lease_token" and LEASES:
            one = LEASES[next(_NEXT_LEASE) % len(LEASES)]
        else:
            one = _PLAUSIBLE_TEXT.get(fd.name, "a")
    elif fd.type == FieldDescriptor.TYPE_BYTES:
        one = b"hi"
    elif fd.type == FieldDescriptor.TYPE_BOOL:
        one = False
    elif fd.type == FieldDescriptor.TYPE_ENUM:
        # A middle value: for the state enums, a live state (RUNNING, LEASED), which an
        # update applies and a filter matches.
        named = [v.number for v in fd.enum_type.values if v.number] or [0]
        one = named[max(0, len(named) // 2 - 1)]
    elif fd.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        one = 1.0
    else:
        one = 1
    return [one] if fd.is_repeated else one


def plausible_message(descriptor: Descriptor, streaming: bool = False, depth: int = 0) -> Message:
    """A request (or part of one) with every field set to a plausible value."""
    cls = message_factory.GetMessageClass(descriptor)
    if depth > 3:
        return cls()
    values = {}
    for fd in descriptor.fields:
        if fd.message_type is not None and not fd.message_type.GetOptions().map_entry:
            one = plausible_message(fd.message_type, streaming, depth + 1)
            values[fd.name] = [one] if fd.is_repeated else one
        else:
            values[fd.name] = _plausible(fd, streaming)
    return _build(cls, values)


_MESSAGES: dict[tuple[str, int, bool, bool], st.SearchStrategy[Message]] = {}


def messages(
    descriptor: Descriptor, depth: int = 0, near: bool = False, streaming: bool = False
) -> st.SearchStrategy[Message]:
    """Any message of this type: each field unset or drawn for its type (nested messages
    down to a depth, then empty). ``near``: a plausible request (``plausible_message``)
    with each field drawn hostile one time in six."""
    key = (descriptor.full_name, depth, near, streaming)
    if key not in _MESSAGES:
        cls = message_factory.GetMessageClass(descriptor)
        if depth > 3:
            _MESSAGES[key] = st.just(cls())
        elif near:
            fields = {
                fd.name: st.integers(0, 5).flatmap(
                    lambda i, fd=fd: _field(fd, depth) if i == 0 else st.just(None)
                )
                for fd in descriptor.fields
            }
            _MESSAGES[key] = st.fixed_dictionaries(fields).map(
                lambda values, d=descriptor: _build_near(d, values, streaming)
            )
        else:
            fields = {fd.name: _field(fd, depth) for fd in descriptor.fields}
            _MESSAGES[key] = st.fixed_dictionaries({}, optional=fields).map(
                lambda values, cls=cls: _build(cls, values)
            )
    return _MESSAGES[key]


def _build_near(descriptor: Descriptor, hostile: dict[str, Any], streaming: bool) -> Message:
    """A plausible message with the fields drawn hostile (not None) replaced."""
    message = plausible_message(descriptor, streaming)
    for name, value in hostile.items():
        if value is not None:
            message.ClearField(name)
            message.MergeFrom(_build(type(message), {name: value}))
    return message


def _build(cls: type[Message], values: dict[str, Any]) -> Message:
    message = cls()
    for name, value in values.items():
        fd = cls.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name) if fd.is_repeated or fd.message_type else None
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            for key, item in value.items():
                if isinstance(item, Message):
                    target[key].CopyFrom(item)  # type: ignore[index]
                else:
                    target[key] = item  # type: ignore[index]
        elif fd.is_repeated:
            target.extend(value)  # type: ignore[union-attr]
        elif fd.message_type is not None:
            target.CopyFrom(value)  # type: ignore[union-attr]
        else:
            setattr(message, name, value)
    return message


def bodies(rpc: Rpc) -> st.SearchStrategy[bytes]:
    """A serialized request, or bytes that may be no message at all."""
    near = messages(rpc.request, near=True, streaming=rpc.server_streaming)
    return st.one_of(
        messages(rpc.request).map(lambda m: m.SerializeToString()),
        near.map(lambda m: m.SerializeToString()),
        near.map(lambda m: m.SerializeToString()),
        st.binary(max_size=64),
    )


TOKEN_CHOICES = {
    "none": None,
    "wrong": "not-a-token",
    "client": CLIENT_TOKEN,
    "worker": WORKER_TOKEN,
    "admin": ADMIN_TOKEN,
}


# ---- the stack -----------------------------------------------------------------------------


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Fuzzed:
    stack: Stack
    rss_before: float
    channels: dict[tuple[str, str], grpc.Channel]

    def target(self, service: str) -> str:
        if service.startswith("blixard.queue."):
            return self.stack.queue_target
        if service.startswith("blixard.vms."):
            return self.stack.vms_target
        return self.stack.jobs_target  # jobs, and health and reflection (every server)

    def channel(self, service: str, token: str) -> grpc.Channel:
        key = (self.target(service), token)
        if key not in self.channels:
            # A plain channel: no retries, so each answer is the service's own.
            options = [("grpc.enable_retries", 0)]
            channel = grpc.insecure_channel(key[0], options=options)
            if TOKEN_CHOICES[token]:
                metadata = (("authorization", f"Bearer {TOKEN_CHOICES[token]}"),)
                channel = grpc.intercept_channel(channel, _Metadata(metadata))
            self.channels[key] = channel
            self.stack.channels.append(channel)
        return self.channels[key]


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _with(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), *self._metadata])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with(details), request)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fuzzed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fuzzed]:
    overrides: dict[str, str] = {}
    if request.param == "postgresql":
        overrides = postgres_overrides(request.getfixturevalue("postgres_cluster"))
    stack = Stack(tmp_path_factory.mktemp("fuzz"), dict(TOKENS), overrides)
    try:
        stack.start_pair().start_vms(_vm_settings(stack.tmp))
        jobs = stack.jobs_stub(ADMIN_TOKEN)
        known = [
            jpb.SubmitJobRequest(request_id=f"known-{i}", spec=spec("/nonexistent/known"))
            for i in range(LIVE_JOBS + 2)
        ]
        for i, request in enumerate(known):
            job = jobs.SubmitJob(request, timeout=RPC_TIMEOUT).job
            if i < 2:
                jobs.CancelJob(jpb.CancelJobRequest(job_id=job.job_id), timeout=RPC_TIMEOUT)
                ENDED.append(job.job_id)
            else:
                LIVE.append(job.job_id)
            KNOWN.append(job.job_id)
        _lease_jobs(stack)
        gc.collect()
        yield Fuzzed(stack, _rss_mib(), {})
    finally:
        for known_ids in (KNOWN, LIVE, ENDED, LEASES):
            known_ids.clear()
        stack.stop()


AGENT = Path(__file__).resolve().parents[2] / "var" / "vm-image" / "blixard-agent"


def _vm_settings(tmp: Path) -> dict[str, str]:
    """The VM service with its ``process`` backend where the guest agent is built (see
    tests/grpc/test_vm_service.py), so VM calls reach its manager and store; else with
    no manager (every VM call UNAVAILABLE, after the edge rule)."""
    if not os.access(AGENT, os.X_OK):
        return {}
    return {
        "VMS_MANAGER": "process",
        "VMS_IMAGE_DIR": str(AGENT.parent),
        "VMS_STATE_DIR": str(tmp / "vms-state"),
        "VMS_PRE_WARM_COUNT": "0",
        "VMS_MAX_VMS": "2",
        "VMS_BOOT_TIMEOUT": "10",
    }


def _lease_jobs(stack: Stack) -> None:
    """Jobs leased to a worker that never runs them (type "fuzz-lease"), for their tokens."""
    jobs = stack.jobs_stub(CLIENT_TOKEN)
    queue = stack.queue_stub(WORKER_TOKEN)
    needs = job_spec_pb2.JobRequirements(worker_types=["fuzz-lease"])
    for i in range(LEASED_JOBS):
        request = jpb.SubmitJobRequest(
            request_id=f"leased-{i}", spec=spec("/nonexistent/leased", requirements=needs)
        )
        jobs.SubmitJob(request, timeout=RPC_TIMEOUT)

    def claim() -> bool:
        reply = queue.Claim(
            qpb.ClaimRequest(
                worker_id="fuzz-lease-worker",
                worker_type="fuzz-lease",
                named_only=True,
                max_items=LEASED_JOBS,
                lease_duration=pbtime.duration(3600),
            ),
            timeout=RPC_TIMEOUT,
        )
        LEASES.extend(lease.lease_token for lease in reply.leases)
        return len(LEASES) >= LEASED_JOBS

    eventually(claim, 30, f"{LEASED_JOBS} leases")


# ---- the properties ------------------------------------------------------------------------


def _call(fuzz: Fuzzed, rpc: Rpc, body: bytes, token: str) -> grpc.RpcError | None:
    channel = fuzz.channel(rpc.service, token)
    try:
        if rpc.client_streaming:
            factory = channel.stream_stream if rpc.server_streaming else channel.stream_unary
            call = factory(rpc.path, request_serializer=None, response_deserializer=None)
            answer = call(iter([body]), timeout=CALL_TIMEOUT)
        elif rpc.server_streaming:
            call = channel.unary_stream(
                rpc.path, request_serializer=None, response_deserializer=None
            )
            answer = call(body, timeout=CALL_TIMEOUT)
        else:
            call = channel.unary_unary(
                rpc.path, request_serializer=None, response_deserializer=None
            )
            call(body, timeout=CALL_TIMEOUT)
            return None
        for _ in answer:  # the first answer says the request was taken; a watch goes on
            answer.cancel()
            break
    except grpc.RpcError as exc:
        return exc
    return None


def _open(rpc: Rpc) -> bool:
    return rpc.service in OPEN_SERVICES


def _tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if (r.exc_info or r.levelno >= logging.ERROR) and not r.name.startswith("hypothesis")
    ]


@pytest.mark.parametrize("rpc", RPCS, ids=str)
def test_no_request_makes_a_service_fail(
    fuzzed: Fuzzed, rpc: Rpc, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=timedelta(seconds=10),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(body=bodies(rpc), token=st.sampled_from(sorted(TOKEN_CHOICES)))
    def one(body: bytes, token: str) -> None:
        error = _call(fuzzed, rpc, body, token)
        if error is None:
            return
        code = error.code()
        assert code not in NEVER, f"{rpc} answered {code.name}: {error.details()}"
        if code not in BY_GRPC and not _open(rpc):  # grpc's own servicers: plain statuses
            assert rpc_status.from_call(error) is not None, (  # type: ignore[arg-type]
                f"{rpc} answered {code.name} without a google.rpc.Status: {error.details()}"
            )
        if token in ("none", "wrong") and not _open(rpc):
            assert code == grpc.StatusCode.UNAUTHENTICATED, f"{rpc}: {code.name} with no token"

    one()
    assert _tracebacks(caplog) == []


# ---- one hostile field at a time ------------------------------------------------------------

# Every field of every request, set in turn to each value of its kind that a column or a
# check may not hold, in a request otherwise plausible: deterministic, and deeper than
# random draws reach (a hostile worker_id in an update of a job that exists).
_HOSTILE_TEXT = ["\x00", *("é" * n for n in (37, 65, 129, 257, 301, 601, 4097)), "x" * 65_000]


def _hostile(fd: FieldDescriptor) -> list[tuple[str, Any]]:
    """(label, value) pairs for one element of this field's kind."""
    if fd.type == FieldDescriptor.TYPE_STRING:
        return [(f"text{len(v)}" if v != "\x00" else "nul", v) for v in _HOSTILE_TEXT]
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return [("bytes", b"\x00" * 70_000)]
    if fd.type == FieldDescriptor.TYPE_ENUM:
        return [("enum-max", 2**31 - 1), ("enum-neg", -1)]
    if fd.type in _INTS:
        low, high = _INTS[fd.type]
        values = {low, high, *(v for v in (2**31 - 1, 2**31, 2**63 - 1, 2**63) if low <= v <= high)}
        return [(f"int{v}", v) for v in sorted(values)]
    return []


def _leaves(descriptor: Descriptor, path: tuple[tuple[str, int | None], ...] = (), depth: int = 0):  # type: ignore[no-untyped-def]
    for fd in descriptor.fields:
        is_map = fd.message_type is not None and fd.message_type.GetOptions().map_entry
        here = (*path, (fd.name, None))
        if fd.is_repeated:
            yield (
                here,
                fd,
                "huge",
                [_filler(fd)] * 1025
                if not is_map
                else {
                    f"k{i}": _filler(fd.message_type.fields_by_name["value"]) for i in range(1025)
                },
            )
        if is_map:
            value_fd = fd.message_type.fields_by_name["value"]
            yield here, fd, "key-nul", {"k\x00": _plausible(value_fd)}
            yield here, fd, "key-long", {"é" * 300: _plausible(value_fd)}
            if value_fd.message_type is None:
                for label, value in _hostile(value_fd):
                    yield here, fd, f"value-{label}", {"team": value}
        elif fd.message_type is not None:
            if depth < 3:
                inner = (*path, (fd.name, 0 if fd.is_repeated else None))
                yield from _leaves(fd.message_type, inner, depth + 1)
        else:
            for label, value in _hostile(fd):
                yield here, fd, label, [value] if fd.is_repeated else value


def _replace(message: Message, path: tuple[tuple[str, int | None], ...], value: Any) -> None:
    target = message
    for name, index in path[:-1]:
        target = getattr(target, name)
        if index is not None:
            target = target[index]
    name = path[-1][0]
    field = target.DESCRIPTOR.fields_by_name[name]
    target.ClearField(name)
    target.MergeFrom(_build(type(target), {name: value}))
    assert field is not None


_FRESH = itertools.count(1_000_000)


def _fresh_sequences(message: Message) -> None:
    """A new, higher ``sequence`` in each request (and batch item), so each update is
    applied, not dropped as a repeat of the one before."""
    for fd, value in message.ListFields():
        if fd.name == "sequence" and fd.type in _INTS:
            setattr(message, fd.name, next(_FRESH))
        elif (
            fd.message_type is not None
            and fd.is_repeated
            and not fd.message_type.GetOptions().map_entry
        ):
            for item in value:
                _fresh_sequences(item)


def mutants(rpc: Rpc) -> Iterator[tuple[str, str, bytes]]:
    """(the field's full name, a label, the request) for each hostile field in turn."""
    for path, fd, label, value in _leaves(rpc.request):
        message = plausible_message(rpc.request, rpc.server_streaming)  # the next live job
        _fresh_sequences(message)
        _replace(message, path, value)
        where = ".".join(name + ("[0]" if index is not None else "") for name, index in path)
        yield fd.full_name, f"{where}={label}", message.SerializeToString()


@pytest.mark.parametrize("rpc", [rpc for rpc in RPCS if not _open(rpc)], ids=str)
def test_no_hostile_field_makes_a_service_fail(
    fuzzed: Fuzzed, rpc: Rpc, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    failures = []
    for _, label, body in mutants(rpc):
        error = _call(fuzzed, rpc, body, "admin")
        if error is None:
            continue
        code = error.code()
        if code in NEVER or (code not in BY_GRPC and rpc_status.from_call(error) is None):  # type: ignore[arg-type]
            failures.append(f"{label}: {code.name} {error.details()[:100]}")
    assert failures == []
    assert _tracebacks(caplog) == []


def test_every_service_served_is_fuzzed(fuzzed: Fuzzed) -> None:
    covered = {rpc.service for rpc in RPCS}
    for target in {fuzzed.stack.jobs_target, fuzzed.stack.queue_target, fuzzed.stack.vms_target}:
        channel = grpc.insecure_channel(target)
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        [answer] = list(stub.ServerReflectionInfo(iter([request]), timeout=RPC_TIMEOUT))
        channel.close()
        served = {s.name for s in answer.list_services_response.service}
        assert served <= covered, f"not fuzzed: {sorted(served - covered)}"


def test_a_huge_repeated_field_is_refused_at_once(fuzzed: Fuzzed) -> None:
    jobs = fuzzed.stack.jobs_stub(ADMIN_TOKEN)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        jobs.ListJobs(jpb.ListJobsRequest(states=[1] * 1_000_000), timeout=RPC_TIMEOUT)
    assert describe(caught.value).code == grpc.StatusCode.INVALID_ARGUMENT
    assert time.monotonic() - started < 5


def test_afterwards_memory_is_bounded_and_a_normal_job_still_succeeds(fuzzed: Fuzzed) -> None:
    gc.collect()
    grown = _rss_mib() - fuzzed.rss_before
    assert grown < RSS_GROWTH_MIB, f"RSS grew by {grown:.0f} MiB during the fuzzing"

    jobs = fuzzed.stack.jobs_stub(CLIENT_TOKEN)
    queue = fuzzed.stack.queue_stub(WORKER_TOKEN)
    needs = job_spec_pb2.JobRequirements(worker_types=["after-fuzz"])
    job = jobs.SubmitJob(
        jpb.SubmitJobRequest(
            request_id="after-fuzz", spec=spec("true", requirements=needs, priority=1000)
        ),
        timeout=RPC_TIMEOUT,
    ).job

    def claimed() -> list[qpb.Lease]:
        reply = queue.Claim(
            qpb.ClaimRequest(
                worker_id="after-fuzz-worker",
                worker_type="after-fuzz",
                named_only=True,
                lease_duration=pbtime.duration(30),
            ),
            timeout=RPC_TIMEOUT,
        )
        return [lease for lease in reply.leases if lease.item.job_id == job.job_id]

    [lease] = eventually(claimed, 20, "the job to reach the queue")
    queue.Complete(
        qpb.CompleteRequest(
            lease_token=lease.lease_token,
            outcome=job_spec_pb2.OUTCOME_SUCCEEDED,
            exit_code=0,
            output_tail="ok\n",
        ),
        timeout=RPC_TIMEOUT,
    )

    def succeeded() -> jpb.Job | None:
        now = jobs.GetJob(jpb.GetJobRequest(job_id=job.job_id), timeout=RPC_TIMEOUT).job
        return now if now.state == jpb.JOB_STATE_SUCCEEDED else None

    done = eventually(succeeded, 20, "the job to succeed")
    assert done.exit_code == 0 and done.output_tail == "ok\n"

    if _vm_settings(fuzzed.stack.tmp):  # the VM calls reached a manager, which still serves
        vms = vpb_grpc.VmServiceStub(fuzzed.channel("blixard.vms.v1.VmService", "worker"))
        info = vms.GetManagerInfo(vpb.GetManagerInfoRequest(), timeout=RPC_TIMEOUT)
        assert info.available and info.backend == "process", info
