"""blixctl: submit, get, list, cancel, retry and watch jobs from a shell; list, redrive and
delete the outbox messages a service parked (``parked``, ``redrive-parked``,
``delete-parked``: an operator's commands, with ``BLIXARD_ADMIN_TOKEN``).

Human output by default, ``--json`` (proto3 JSON, one object per line) for scripts. The
address comes from ``--address`` or ``BLIXCTL_ADDRESS`` (default 127.0.0.1:50051), the
token from ``BLIXARD_CLIENT_TOKEN`` when set. Exit codes: 0 success (with ``--wait`` or
``watch``: the job SUCCEEDED), 1 the job FAILED, 3 it was CANCELLED, 2 a usage mistake,
4 the service refused or could not be reached.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
from blixard.common.v1 import job_spec_pb2
from blixard.jobs.v1 import jobs_service_pb2 as pb
from blixard.jobs.v1 import jobs_service_pb2_grpc as pb_grpc
from blixard.queue.v1 import queue_service_pb2 as qpb
from blixard.queue.v1 import queue_service_pb2_grpc as qpb_grpc
from google.protobuf import json_format

from services.common import pbtime
from services.common.client import open_channel
from services.common.config import address_problem
from services.common.errors import describe
from services.common.output import sent_bytes

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED, EXIT_RPC = 0, 1, 2, 3, 4
R = TypeVar("R")
T = TypeVar("T")
TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}
CALL_TIMEOUT = 30.0
SUBMIT_BATCH = 1000  # requests per BatchSubmitJobs call, its limit
# The parked-message commands: the service is named, and so is its default address.
PARKED_COMMANDS = {"parked", "redrive-parked", "delete-parked"}
SERVICE_ADDRESSES = {
    "jobs": ("BLIXCTL_ADDRESS", "127.0.0.1:50051"),
    "queue": ("BLIXCTL_QUEUE_ADDRESS", "127.0.0.1:50052"),
}


class UsageError(Exception):
    pass


def _pairs(values: Sequence[str] | None, flag: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for value in values or ():
        key, sep, rest = value.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} takes KEY=VALUE, got {value!r}")
        result[key] = rest
    return result


def _state(name: str) -> pb.JobState.ValueType:
    full = name.upper() if name.upper().startswith("JOB_STATE_") else f"JOB_STATE_{name.upper()}"
    try:
        return pb.JobState.Value(full)
    except ValueError:
        names = ", ".join(n.removeprefix("JOB_STATE_").lower() for n in pb.JobState.keys()[1:])
        raise UsageError(f"unknown state {name!r} (one of {names})") from None


def _time(text: str, flag: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{flag} takes an ISO 8601 time, got {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--address",
        default=os.environ.get("BLIXCTL_ADDRESS", "127.0.0.1:50051"),
        help="jobs service address (env BLIXCTL_ADDRESS; default 127.0.0.1:50051)",
    )
    common.add_argument("--json", action="store_true", help="print proto3 JSON, one per line")
    parser = argparse.ArgumentParser(prog="blixctl", description="Blixard jobs from a shell.")
    commands = parser.add_subparsers(dest="command", required=True)

    submit = commands.add_parser(
        "submit", parents=[common], help="submit a job: blixctl submit -- CMD ARGS..."
    )
    submit.add_argument("argv", nargs=argparse.REMAINDER, help="the command (after --)")
    submit.add_argument("--request-id", help="idempotency key (default: a new UUID)")
    submit.add_argument("--env", action="append", metavar="KEY=VALUE")
    submit.add_argument("--cwd", default="", help="working directory")
    submit.add_argument("--priority", type=int, default=0)
    submit.add_argument("--max-attempts", type=int, default=0)
    submit.add_argument("--timeout", type=float, help="seconds per attempt")
    submit.add_argument("--label", action="append", metavar="KEY=VALUE")
    submit.add_argument("--worker-type", action="append", default=[])
    submit.add_argument("--run-at", help="do not start before (ISO 8601)")
    submit.add_argument("--wait", action="store_true", help="wait for the end; exit by state")

    many = commands.add_parser(
        "submit-many",
        parents=[common],
        help="submit the jobs of a file: one SubmitJobRequest in JSON per line "
        '({"request_id": "r-1", "spec": {"command": ["true"]}}), 1000 per call',
    )
    many.add_argument("file", help="the file of JSON lines ('-': standard input)")

    for name, text in (
        ("get", "show a job"),
        ("cancel", "cancel a job"),
        ("retry", "retry a failed or cancelled job"),
        ("watch", "follow a job until it ends; exit by state"),
        ("events", "a job's history"),
    ):
        command = commands.add_parser(name, parents=[common], help=text)
        command.add_argument("job_id")
        if name == "cancel":
            command.add_argument("--reason", default="")
        if name == "watch":
            command.add_argument(
                "--follow",
                "-f",
                action="store_true",
                help="print the job's output as it runs (to stdout; the end state to stderr)",
            )

    listing = commands.add_parser("list", parents=[common], help="list jobs, oldest first")
    listing.add_argument("--state", action="append", default=[])
    listing.add_argument("--label", action="append", metavar="KEY=VALUE")
    listing.add_argument("--worker-type", default="")
    listing.add_argument("--created-after")
    listing.add_argument("--created-before")
    listing.add_argument("--page-size", type=int, default=100)
    listing.add_argument("--page-token", default="")
    listing.add_argument("--all", action="store_true", help="follow every page")

    operator = argparse.ArgumentParser(add_help=False)
    operator.add_argument(
        "service", choices=sorted(SERVICE_ADDRESSES), help="whose outbox: jobs or queue"
    )
    operator.add_argument(
        "--address",
        help="the service's address (default: env BLIXCTL_ADDRESS or 127.0.0.1:50051 for "
        "jobs, BLIXCTL_QUEUE_ADDRESS or 127.0.0.1:50052 for the queue)",
    )
    operator.add_argument("--json", action="store_true", help="print proto3 JSON, one per line")
    parked = commands.add_parser(
        "parked",
        parents=[operator],
        help="outbox messages the service gave up on (admin): blixctl parked queue",
    )
    parked.add_argument("--page-size", type=int, default=100)
    parked.add_argument("--page-token", default="")
    parked.add_argument("--all", action="store_true", help="follow every page")
    for name, text in (
        ("redrive-parked", "deliver a parked message again (admin)"),
        ("delete-parked", "delete a parked message for good (admin)"),
    ):
        command = commands.add_parser(name, parents=[operator], help=text)
        command.add_argument("id", type=int, help="the message's id (blixctl parked)")
    return parser


class Cli:
    def __init__(self, channel: grpc.Channel, as_json: bool) -> None:
        self.channel = channel
        self.stub = pb_grpc.JobServiceStub(channel)
        self.as_json = as_json

    # ---- output -----------------------------------------------------------------------

    def emit(self, message: object) -> None:
        print(json_format.MessageToJson(message, indent=None), flush=True)  # type: ignore[arg-type]

    def show(self, job: pb.Job) -> None:
        if self.as_json:
            self.emit(job)
            return
        rows = [
            ("job", job.job_id),
            ("state", _name(job.state)),
            ("command", " ".join(job.spec.command)),
            ("attempts", str(job.attempts)),
            ("exit code", str(job.exit_code) if job.HasField("exit_code") else "-"),
            ("error", job.error or "-"),
            ("worker", job.worker_id or "-"),
            ("created", _when(job.create_time)),
            ("started", _when(job.start_time) if job.HasField("start_time") else "-"),
            ("ended", _when(job.end_time) if job.HasField("end_time") else "-"),
        ]
        for key, value in rows:
            print(f"{key + ':':<10} {value}")
        # The bytes as the job wrote them (an older jobs service sends only their text).
        tail = sent_bytes(job.output_tail_bytes, job.output_tail)
        if tail:
            print("output:", flush=True)
            sys.stdout.buffer.write(tail if tail.endswith(b"\n") else tail + b"\n")
            sys.stdout.buffer.flush()

    # ---- commands ---------------------------------------------------------------------

    def submit(self, args: argparse.Namespace) -> int:
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not argv:
            raise UsageError("submit needs a command: blixctl submit -- CMD ARGS...")
        spec = job_spec_pb2.JobSpec(
            command=argv,
            env=_pairs(args.env, "--env"),
            working_directory=args.cwd,
            priority=args.priority,
            max_attempts=args.max_attempts,
            labels=_pairs(args.label, "--label"),
        )
        if args.worker_type:
            spec.requirements.worker_types.extend(args.worker_type)
        if args.timeout is not None:
            spec.requirements.timeout.CopyFrom(pbtime.duration(args.timeout))
        if args.run_at:
            spec.run_at.FromDatetime(_time(args.run_at, "--run-at"))
        request = pb.SubmitJobRequest(request_id=args.request_id or str(uuid.uuid4()), spec=spec)
        job = self.stub.SubmitJob(request, timeout=CALL_TIMEOUT).job
        if not args.wait:
            if self.as_json:
                self.emit(job)
            else:
                print(job.job_id)
            return EXIT_OK
        return self._follow(job.job_id, quiet=not self.as_json)

    def submit_many(self, args: argparse.Namespace) -> int:
        """One line out per request line: its job id ("-" when refused, why on stderr);
        with --json, each BatchSubmitJobsResult. Exit 4 when any was refused."""
        lines = _request_lines(args.file)
        refused = 0
        for start in range(0, len(lines), SUBMIT_BATCH):
            chunk = lines[start : start + SUBMIT_BATCH]
            call = pb.BatchSubmitJobsRequest(requests=[request for _, request in chunk])
            results = self.stub.BatchSubmitJobs(call, timeout=CALL_TIMEOUT).results
            for i, ((number, _), result) in enumerate(zip(chunk, results, strict=True)):
                if self.as_json:
                    self.emit(result)
                elif result.HasField("response"):
                    print(result.response.job.job_id, flush=True)
                else:
                    print("-", flush=True)
                if result.HasField("error"):
                    refused += 1
                    _say_refused(args.file, number, f"requests[{i}].", result.error)
        return EXIT_RPC if refused else EXIT_OK

    def get(self, args: argparse.Namespace) -> int:
        self.show(self.stub.GetJob(pb.GetJobRequest(job_id=args.job_id), timeout=CALL_TIMEOUT).job)
        return EXIT_OK

    def cancel(self, args: argparse.Namespace) -> int:
        request = pb.CancelJobRequest(job_id=args.job_id, reason=args.reason)
        response = self.stub.CancelJob(request, timeout=CALL_TIMEOUT)
        self.show(response.job)
        if not response.queue_confirmed:
            print(
                "blixctl: the cancel is not confirmed by the queue yet (it is sent as soon as "
                "the queue answers); until then a worker may still start the job",
                file=sys.stderr,
            )
        return EXIT_OK

    def retry(self, args: argparse.Namespace) -> int:
        request = pb.RetryJobRequest(job_id=args.job_id)
        self.show(self.stub.RetryJob(request, timeout=CALL_TIMEOUT).job)
        return EXIT_OK

    def watch(self, args: argparse.Namespace) -> int:
        if args.follow:
            return self._follow_output(args.job_id)
        return self._follow(args.job_id, quiet=False)

    def _follow_output(self, job_id: str) -> int:
        """Print the output live (stdout, bytes as they come), then end by the job's state."""
        out = sys.stdout.buffer
        while True:
            attempt, cursor = 0, 0
            request = pb.GetJobOutputRequest(job_id=job_id, follow=True)
            for chunk in _stream(self.stub.GetJobOutput, request):
                if self.as_json:
                    self.emit(chunk)
                    continue
                if chunk.attempt != attempt:
                    if attempt:
                        print(f"blixctl: attempt {chunk.attempt}", file=sys.stderr, flush=True)
                    attempt, cursor = chunk.attempt, 0
                if chunk.offset > cursor:
                    out.flush()
                    print(
                        f"blixctl: [{chunk.offset - cursor} bytes of output not kept]",
                        file=sys.stderr,
                        flush=True,
                    )
                out.write(chunk.data)
                out.flush()
                cursor = chunk.offset + len(chunk.data)
            job = self.stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=CALL_TIMEOUT).job
            if job.state in TERMINAL:
                break
        if self.as_json:
            self.emit(job)
        else:
            exit_code = f" (exit code {job.exit_code})" if job.HasField("exit_code") else ""
            print(f"blixctl: job {job_id} {_name(job.state)}{exit_code}", file=sys.stderr)
        return _exit_code(job.state)

    def events(self, args: argparse.Namespace) -> int:
        request = pb.ListJobEventsRequest(job_id=args.job_id)
        for event in self.stub.ListJobEvents(request, timeout=CALL_TIMEOUT).events:
            if self.as_json:
                self.emit(event)
            else:
                print(
                    f"{_when(event.event_time)}  gen {event.generation}  "
                    f"{_name(event.state):<10} {event.actor:<24} {event.reason}"
                )
        return EXIT_OK

    def list(self, args: argparse.Namespace) -> int:
        request = pb.ListJobsRequest(
            page_size=args.page_size,
            page_token=args.page_token,
            states=[_state(s) for s in args.state],
            labels=_pairs(args.label, "--label"),
            worker_type=args.worker_type,
        )
        if args.created_after:
            request.created_after.FromDatetime(_time(args.created_after, "--created-after"))
        if args.created_before:
            request.created_before.FromDatetime(_time(args.created_before, "--created-before"))
        if not self.as_json:
            print(
                f"{'JOB ID':<36}  {'STATE':<10} {'TRIES':>5} {'EXIT':>4}  {'CREATED':<19}  COMMAND"
            )
        for job in self._pages(request, args.all):
            if self.as_json:
                self.emit(job)
            else:
                exit_code = str(job.exit_code) if job.HasField("exit_code") else "-"
                print(
                    f"{job.job_id:<36}  {_name(job.state):<10} {job.attempts:>5} "
                    f"{exit_code:>4}  {_when(job.create_time):<19}  {' '.join(job.spec.command)}"
                )
        return EXIT_OK

    def _pages(self, request: pb.ListJobsRequest, every: bool) -> Iterator[pb.Job]:
        while True:
            response = self.stub.ListJobs(request, timeout=CALL_TIMEOUT)
            yield from response.jobs
            if not every or not response.next_page_token:
                if response.next_page_token and not self.as_json:
                    print(f"(more: --page-token {response.next_page_token})", file=sys.stderr)
                return
            request.page_token = response.next_page_token

    # ---- parked outbox messages (an operator's) ------------------------------------------

    def _parked_api(self, service: str) -> tuple[Any, Any]:
        """The service's stub and its messages module (both services' parked-message RPCs
        have the same names and fields)."""
        if service == "queue":
            return qpb_grpc.QueueServiceStub(self.channel), qpb
        return self.stub, pb

    def parked(self, args: argparse.Namespace) -> int:
        stub, messages = self._parked_api(args.service)
        request = messages.ListParkedMessagesRequest(
            page_size=args.page_size, page_token=args.page_token
        )
        if not self.as_json:
            print(f"{'ID':>8}  {'TOPIC':<8} {'KEY':<36}  {'TRIES':>5}  {'PARKED':<19}  ERROR")
        while True:
            response = stub.ListParkedMessages(request, timeout=CALL_TIMEOUT)
            for message in response.messages:
                if self.as_json:
                    self.emit(message)
                else:
                    print(
                        f"{message.id:>8}  {message.topic:<8} {message.key:<36}  "
                        f"{message.attempts:>5}  {_when(message.park_time):<19}  "
                        f"{message.last_error.splitlines()[0] if message.last_error else '-'}"
                    )
            if not args.all or not response.next_page_token:
                break
            request.page_token = response.next_page_token
        if not self.as_json:
            if response.next_page_token:
                print(f"(more: --page-token {response.next_page_token})", file=sys.stderr)
            print(f"{response.total_parked} parked in all", file=sys.stderr)
        return EXIT_OK

    def redrive_parked(self, args: argparse.Namespace) -> int:
        return self._on_parked(args, "RedriveParkedMessage", "goes out again")

    def delete_parked(self, args: argparse.Namespace) -> int:
        return self._on_parked(args, "DeleteParkedMessage", "deleted")

    def _on_parked(self, args: argparse.Namespace, rpc: str, done: str) -> int:
        """One parked message redriven or deleted (``rpc``), and what became of it."""
        stub, messages = self._parked_api(args.service)
        request = getattr(messages, f"{rpc}Request")(id=args.id)
        message = getattr(stub, rpc)(request, timeout=CALL_TIMEOUT).message
        if self.as_json:
            self.emit(message)
        else:
            print(f"message {message.id} ({message.topic} {message.key}) {done}")
        return EXIT_OK

    def _follow(self, job_id: str, *, quiet: bool) -> int:
        last = None
        for update in _stream(self.stub.WatchJob, pb.WatchJobRequest(job_id=job_id)):
            last = update.job
            if self.as_json:
                self.emit(last)
            elif not quiet and last.state not in TERMINAL:
                print(f"{_when(last.update_time)}  {_name(last.state)}", flush=True)
        if last is None:
            return EXIT_RPC
        if not self.as_json:
            self.show(last)
        return _exit_code(last.state)


def _stream(method: grpc.UnaryStreamMultiCallable[R, T], request: R) -> Iterator[T]:
    """A server stream. While the service has no slot for another watch or follow stream,
    say so once and ask again after the delay it gives; any other error is raised."""
    said = False
    while True:
        stream = iter(method(request))
        try:
            first = next(stream)
        except StopIteration:
            return
        except grpc.RpcError as exc:
            failure = describe(exc)
            if failure.reason != "TOO_MANY_WAITING_CALLS":
                raise
            if not said:
                print(f"blixctl: {failure.message}; waiting for one", file=sys.stderr, flush=True)
                said = True
            time.sleep(failure.retry_after or 1.0)
            continue
        yield first
        yield from stream
        return


def _request_lines(path: str) -> list[tuple[int, pb.SubmitJobRequest]]:
    """(line number, request) of each non-blank line of the file."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as file:
                text = file.read()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    requests = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            requests.append((number, json_format.Parse(line, pb.SubmitJobRequest())))
        except json_format.ParseError as exc:
            raise UsageError(f"{path}:{number}: not a SubmitJobRequest in JSON: {exc}") from None
    return requests


def _say_refused(path: str, number: int, prefix: str, error: pb.BatchSubmitJobsError) -> None:
    """Why the request of line ``number`` was refused, its fields named as in the line."""
    reason = error.message.replace(prefix, "")
    print(f"blixctl: {path}:{number}: {reason} ({error.reason})", file=sys.stderr)
    for violation in error.field_violations:
        print(f"  {violation.field.removeprefix(prefix)}: {violation.description}", file=sys.stderr)


def _exit_code(state: int) -> int:
    """0 SUCCEEDED, 3 CANCELLED, 1 otherwise (FAILED)."""
    if state == pb.JOB_STATE_SUCCEEDED:
        return EXIT_OK
    return EXIT_CANCELLED if state == pb.JOB_STATE_CANCELLED else EXIT_FAILED


def _name(state: int) -> str:
    return pb.JobState.Name(state).removeprefix("JOB_STATE_")  # type: ignore[arg-type]


def _when(stamp: object) -> str:
    value = pbtime.from_timestamp(stamp)  # type: ignore[arg-type]
    return value.strftime("%Y-%m-%d %H:%M:%S")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    token = os.environ.get("BLIXARD_CLIENT_TOKEN") or None
    setting = "BLIXCTL_ADDRESS"
    if args.command in PARKED_COMMANDS:
        setting, default = SERVICE_ADDRESSES[args.service]
        args.address = args.address or os.environ.get(setting, default)
        token = os.environ.get("BLIXARD_ADMIN_TOKEN") or token
    problem = address_problem(args.address)
    if problem is not None:
        print(f"blixctl: --address / {setting} {args.address!r}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    channel = open_channel(args.address, token)
    cli = Cli(channel, args.json)
    try:
        return int(getattr(cli, args.command.replace("-", "_"))(args))
    except UsageError as exc:
        print(f"blixctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except grpc.RpcError as exc:
        failure = describe(exc)
        print(f"blixctl: {failure}", file=sys.stderr)
        for field, description in failure.field_violations:
            print(f"  {field}: {description}", file=sys.stderr)
        return EXIT_RPC
    except KeyboardInterrupt:
        return 130
    finally:
        channel.close()
