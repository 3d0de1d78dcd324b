"""The host's half of the agent protocol: frames cut anywhere, the exec request's layout
(checked byte by byte against what agent.c reads), exit codes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.vms import agent

frames = st.lists(
    st.tuples(st.sampled_from([b"p", b"o", b"e", b"x", b"f", b"i"]), st.binary(max_size=300)),
    max_size=20,
)


@given(frames, st.lists(st.integers(min_value=1, max_value=50), max_size=40))
def test_frames_come_back_whole_however_the_stream_is_cut(
    sent: list[tuple[bytes, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(agent.frame(kind, payload) for kind, payload in sent)
    reader = agent.FrameReader()
    received: list[tuple[bytes, bytes]] = []
    position = 0
    for cut in cuts:
        received += reader.feed(stream[position : position + cut])
        position += cut
    received += reader.feed(stream[position:])
    assert received == sent


def test_a_frame_is_a_type_a_big_endian_length_and_the_payload() -> None:
    assert agent.frame(b"P", b"abc") == b"P\x00\x00\x00\x03abc"


def test_an_oversized_frame_from_the_agent_is_an_error() -> None:
    with pytest.raises(agent.AgentError):
        agent.FrameReader().feed(b"o" + struct.pack(">I", agent.MAX_FRAME + 1))


def test_the_exec_request_layout() -> None:
    payload = agent.exec_payload(["sh", "-c", "echo é"], {"A": "1", "B": "x=y"}, "/tmp")

    def strings(data: bytes, count: int, at: int) -> tuple[list[bytes], int]:
        out = []
        for _ in range(count):
            (length,) = struct.unpack_from(">I", data, at)
            out.append(data[at + 4 : at + 4 + length])
            at += 4 + length
        return out, at

    (argc,) = struct.unpack_from(">I", payload, 0)
    argv, at = strings(payload, argc, 4)
    (envc,) = struct.unpack_from(">I", payload, at)
    env, at = strings(payload, envc, at + 4)
    cwd, at = strings(payload, 1, at)
    assert argv == [b"sh", b"-c", "echo é".encode()]
    assert env == [b"A=1", b"B=x=y"]
    assert cwd == [b"/tmp"] and at == len(payload)


def test_an_empty_command_is_refused_before_it_is_sent() -> None:
    with pytest.raises(ValueError):
        agent.exec_payload([], {}, "")


@pytest.mark.parametrize(
    "payload, code",
    [(b"\x00\x00\x00\x00\x00", 0), (b"\x00\x00\x00\x00\x07", 7), (b"\x01\x00\x00\x00\x09", 137)],
)
def test_exit_codes_and_signals(payload: bytes, code: int) -> None:
    assert agent.parse_exit(payload) == code


def test_a_malformed_exit_frame_is_an_error() -> None:
    with pytest.raises(agent.AgentError):
        agent.parse_exit(b"\x00")
