"""The host's side of the guest agent protocol (the agent is ``vm/agent/agent.c``).

One byte stream per VM: QEMU's virtio-serial port ``blixard.agent`` behind a unix socket,
or, for the ``process`` backend, the unix socket the agent itself listens on. Frames are a
type byte, a 4-byte big-endian length and the payload; the table is in agent.c and here,
and the tests run this client against the real agent, in a process and in a VM, so the
two cannot drift apart unnoticed (the old system failed every job that way).

One operation at a time per connection: the manager holds ``lock`` around each.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

HEADER = struct.Struct(">BI")
MAX_FRAME = 4 << 20

# host -> agent
PING, INFO, EXEC, SIGNAL, POWEROFF = b"P", b"I", b"E", b"S", b"Q"
# agent -> host
PONG, INFO_REPLY, STDOUT, STDERR, EXIT, START_FAILED = b"p", b"i", b"o", b"e", b"x", b"f"


class AgentError(Exception):
    """The agent did not answer as the protocol says (gone, silent, or garbled)."""


class AgentTimeout(AgentError):
    pass


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_FRAME:
        raise ValueError(f"a frame holds at most {MAX_FRAME} bytes, not {len(payload)}")
    return HEADER.pack(kind[0], len(payload)) + payload


def _string(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack(">I", len(data)) + data


def exec_payload(command: Sequence[str], env: Mapping[str, str], working_directory: str) -> bytes:
    """The EXEC request: argv, then KEY=VALUE pairs, then the working directory."""
    if not command:
        raise ValueError("a command needs at least its program")
    parts = [struct.pack(">I", len(command)), *(_string(arg) for arg in command)]
    parts.append(struct.pack(">I", len(env)))
    parts.extend(_string(f"{key}={value}") for key, value in env.items())
    parts.append(_string(working_directory))
    return b"".join(parts)


def parse_exit(payload: bytes) -> int:
    """The exit code of an EXIT frame: a signal N is reported as 128 + N, as shells do."""
    if len(payload) != 5:
        raise AgentError(f"an exit frame has 5 bytes, not {len(payload)}")
    signalled, value = payload[0], int(struct.unpack(">I", payload[1:])[0])
    return 128 + value if signalled else value


class FrameReader:
    """Splits a byte stream into frames (the unit tests feed it arbitrary cuts)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buffer.extend(data)
        frames: list[tuple[bytes, bytes]] = []
        while len(self._buffer) >= HEADER.size:
            kind, length = HEADER.unpack_from(self._buffer)
            if length > MAX_FRAME:
                raise AgentError(f"the agent sent a frame of {length} bytes")
            if len(self._buffer) < HEADER.size + length:
                break
            payload = bytes(self._buffer[HEADER.size : HEADER.size + length])
            del self._buffer[: HEADER.size + length]
            frames.append((bytes([kind]), payload))
        return frames


@dataclass(frozen=True)
class Output:
    stream: str  # "stdout" or "stderr"
    data: bytes


@dataclass(frozen=True)
class Exited:
    exit_code: int


@dataclass(frozen=True)
class StartFailed:
    message: str


ExecEvent = Output | Exited | StartFailed


class AgentClient:
    """A connected agent. ``close`` is idempotent; the socket is the caller's to count."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._reader = FrameReader()
        self._pending: list[tuple[bytes, bytes]] = []
        self._nonce = 0
        self.lock = threading.Lock()  # one operation at a time
        self._send_lock = threading.Lock()  # a signal may be sent while an exec reads
        self._closed = False

    @classmethod
    def connect(cls, path: str, timeout: float) -> AgentClient:
        """Connect to a unix socket, retrying until it exists or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
                return cls(sock)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise AgentTimeout(f"no agent socket at {path}: {exc}") from None
                time.sleep(0.02)
            except BaseException:
                sock.close()
                raise

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        return -1 if self._closed else self._sock.fileno()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()

    # ---- frames ----------------------------------------------------------------------

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        if self._closed:
            raise AgentError("the connection to the agent is closed")
        try:
            with self._send_lock:
                self._sock.sendall(frame(kind, payload))
        except OSError as exc:
            raise AgentError(f"cannot write to the agent: {exc}") from None

    def receive(self, deadline: float | None) -> tuple[bytes, bytes]:
        """The next frame; AgentTimeout once ``deadline`` (monotonic) passes."""
        while not self._pending:
            if self._closed:
                raise AgentError("the connection to the agent is closed")
            if deadline is None:
                self._sock.settimeout(None)
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AgentTimeout("the agent did not answer in time")
                self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise AgentTimeout("the agent did not answer in time") from None
            except OSError as exc:
                raise AgentError(f"cannot read from the agent: {exc}") from None
            if not data:
                raise AgentError("the agent closed the connection")
            self._pending.extend(self._reader.feed(data))
        return self._pending.pop(0)

    # ---- operations ------------------------------------------------------------------

    def ping(self, timeout: float) -> None:
        """A round trip; stray frames (a late pong, leftovers) are skipped."""
        self._nonce += 1
        nonce = f"{os.getpid()}-{self._nonce}".encode()
        self.send(PING, nonce)
        deadline = time.monotonic() + timeout
        while True:
            kind, payload = self.receive(deadline)
            if kind == PONG and payload == nonce:
                return

    def info(self, timeout: float) -> dict[str, str]:
        self.send(INFO)
        deadline = time.monotonic() + timeout
        while True:
            kind, payload = self.receive(deadline)
            if kind == INFO_REPLY:
                pairs = (item.partition("=") for item in payload.decode().split())
                return {key: value for key, _, value in pairs}

    def execute(
        self,
        command: Sequence[str],
        env: Mapping[str, str],
        working_directory: str,
        deadline: float | None = None,
    ) -> Iterator[ExecEvent]:
        """Run a command: its output as it comes, then ``Exited`` or ``StartFailed``."""
        self.send(EXEC, exec_payload(command, env, working_directory))
        while True:
            kind, payload = self.receive(deadline)
            if kind == STDOUT:
                yield Output("stdout", payload)
            elif kind == STDERR:
                yield Output("stderr", payload)
            elif kind == EXIT:
                yield Exited(parse_exit(payload))
                return
            elif kind == START_FAILED:
                yield StartFailed(payload.decode(errors="replace"))
                return
            # anything else (a late pong) is not part of this exchange

    def signal(self, signum: int) -> None:
        self.send(SIGNAL, struct.pack(">I", signum))

    def poweroff(self) -> None:
        self.send(POWEROFF)
