"""services.common.config: typed settings, every problem in one line, the auth binding rule."""

from __future__ import annotations

import pytest

from services.common.config import (
    ConfigError,
    EnvReader,
    ServerSettings,
    Tokens,
    address_problem,
    check_auth_binding,
    finish,
    is_loopback,
    read_server,
    read_shared,
)
from services.common.server import WaitSlots


def error_of(*readers: EnvReader) -> str:
    with pytest.raises(ConfigError) as caught:
        finish(*readers)
    message = str(caught.value)
    assert "\n" not in message, "a ConfigError must be one line"
    return message


# ---- EnvReader ---------------------------------------------------------------------------


def test_every_problem_is_reported_in_one_line() -> None:
    env = EnvReader(
        "JOBS_",
        {
            "JOBS_SLOTS": "two",
            "JOBS_PORT": "70000",
            "JOBS_LIMIT": "-1",
            "JOBS_DEBUG": "maybe",
            "JOBS_MODE": "loud",
            "JOBS_FOO": "1",
            "QUEUE_FOO": "not ours",
        },
    )
    assert env.integer("SLOTS", 2) == 2
    assert env.integer("PORT", 50051, minimum=0, maximum=65535) == 50051
    assert env.number("LIMIT", 1.5, minimum=0.0) == 1.5
    assert env.flag("DEBUG", False) is False
    assert env.choice("MODE", "quiet", ("quiet", "normal")) == "quiet"

    message = error_of(env)

    assert "JOBS_SLOTS='two' is not an integer" in message
    assert "JOBS_PORT=70000 is above the maximum 65535" in message
    assert "JOBS_LIMIT=-1.0 is below the minimum 0.0" in message
    assert "JOBS_DEBUG='maybe' is not a boolean" in message
    assert "JOBS_MODE='loud' is not one of quiet, normal" in message
    assert "JOBS_FOO is not a known setting" in message
    assert "QUEUE_FOO" not in message
    assert message.count(";") == 5


def test_finish_without_problems_returns_quietly() -> None:
    env = EnvReader("JOBS_", {"JOBS_SLOTS": "4", "OTHER": "x"})
    assert env.integer("SLOTS", 1, minimum=1) == 4
    assert finish(env) is None
    assert finish() is None


def test_finish_combines_the_problems_of_every_reader() -> None:
    jobs = EnvReader("JOBS_", {"JOBS_X": "1", "BLIXARD_Y": "2"})
    shared = EnvReader("BLIXARD_", {"JOBS_X": "1", "BLIXARD_Y": "2"})
    message = error_of(jobs, shared)
    assert "JOBS_X is not a known setting" in message
    assert "BLIXARD_Y is not a known setting" in message


def test_values_are_read_and_typed() -> None:
    env = EnvReader(
        "W_",
        {
            "W_NAME": "  alpha  ",
            "W_COUNT": " 7 ",
            "W_RATE": "0.25",
            "W_ON": "YES",
            "W_LEVEL": "DEBUG",
            "W_EMPTY": "   ",
        },
    )
    assert env.text("NAME", "x") == "alpha"
    assert env.integer("COUNT", 1) == 7
    assert env.number("RATE", 1.0) == 0.25
    assert env.flag("ON", False) is True
    assert env.choice("LEVEL", "info", ("debug", "info")) == "debug"
    assert env.text("EMPTY", "fallback") == "fallback"
    assert env.optional_str("EMPTY") is None
    assert env.optional_str("MISSING") is None
    finish(env)


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "yes", "on", " On "])
def test_flag_true_spellings(raw: str) -> None:
    env = EnvReader("P_", {"P_F": raw})
    assert env.flag("F", False) is True
    finish(env)


@pytest.mark.parametrize("raw", ["0", "false", "no", "OFF"])
def test_flag_false_spellings(raw: str) -> None:
    env = EnvReader("P_", {"P_F": raw})
    assert env.flag("F", True) is False
    finish(env)


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf"])
def test_number_rejects_non_finite_values(raw: str) -> None:
    env = EnvReader("P_", {"P_N": raw})
    assert env.number("N", 2.0) == 2.0
    assert f"P_N={raw!r} is not a finite number" in error_of(env)


def test_number_rejects_text() -> None:
    env = EnvReader("P_", {"P_N": "fast"})
    assert env.number("N", 2.0) == 2.0
    assert "P_N='fast' is not a number" in error_of(env)


def test_integer_bounds_are_inclusive() -> None:
    env = EnvReader("P_", {"P_LOW": "1", "P_HIGH": "10", "P_UNDER": "0"})
    assert env.integer("LOW", 5, minimum=1, maximum=10) == 1
    assert env.integer("HIGH", 5, minimum=1, maximum=10) == 10
    assert env.integer("UNDER", 5, minimum=1, maximum=10) == 5
    assert error_of(env) == "P_UNDER=0 is below the minimum 1"


# ---- loopback and tokens -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("example.com", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_loopback_without_tokens_is_fine(host: str) -> None:
    env = EnvReader("JOBS_", {})
    check_auth_binding(env, ServerSettings(host, 50051, 1.0), Tokens())
    assert env.problems == []
    finish(env)


def test_public_bind_without_tokens_names_every_missing_token() -> None:
    env = EnvReader("JOBS_", {})
    check_auth_binding(env, ServerSettings("0.0.0.0", 50051, 1.0), Tokens())
    message = error_of(env)
    assert "JOBS_GRPC_HOST=0.0.0.0 is not a loopback address" in message
    for name in ("BLIXARD_CLIENT_TOKEN", "BLIXARD_WORKER_TOKEN", "BLIXARD_ADMIN_TOKEN"):
        assert name in message


def test_public_bind_names_only_the_missing_tokens() -> None:
    env = EnvReader("QUEUE_", {})
    check_auth_binding(env, ServerSettings("10.0.0.1", 1, 1.0), Tokens(client="c", admin="a"))
    message = error_of(env)
    assert "QUEUE_GRPC_HOST=10.0.0.1" in message
    assert "BLIXARD_WORKER_TOKEN" in message
    assert "BLIXARD_CLIENT_TOKEN" not in message
    assert "BLIXARD_ADMIN_TOKEN" not in message


def test_public_bind_with_every_token_is_fine() -> None:
    env = EnvReader("JOBS_", {})
    tokens = Tokens(client="c", worker="w", admin="a")
    check_auth_binding(env, ServerSettings("0.0.0.0", 50051, 1.0), tokens)
    finish(env)
    assert tokens.enabled
    assert not Tokens().enabled


# ---- shared and server settings ----------------------------------------------------------


def test_shared_defaults_and_values() -> None:
    settings, env = read_shared({})
    finish(env)
    assert settings.tokens == Tokens()
    assert (settings.log_level, settings.traces) == ("info", "none")

    settings, env = read_shared(
        {"BLIXARD_CLIENT_TOKEN": "c", "BLIXARD_LOG_LEVEL": "Warning", "BLIXARD_TRACES": "console"}
    )
    finish(env)
    assert settings.tokens == Tokens(client="c")
    assert (settings.log_level, settings.traces) == ("warning", "console")


def test_shared_problems() -> None:
    _, env = read_shared({"BLIXARD_LOG_LEVEL": "loud", "BLIXARD_TOKEN": "x"})
    message = error_of(env)
    assert "BLIXARD_LOG_LEVEL='loud' is not one of debug, info, warning, error" in message
    assert "BLIXARD_TOKEN is not a known setting" in message


def test_server_settings_and_address() -> None:
    env = EnvReader("VMS_", {"VMS_GRPC_HOST": "::1", "VMS_GRPC_PORT": "0"})
    server = read_server(env, default_port=50053)
    finish(env)
    assert server == ServerSettings("::1", 0, 10.0)
    assert server.address == "[::1]:0"
    assert ServerSettings("127.0.0.1", 50051, 1.0).address == "127.0.0.1:50051"


def test_waiting_calls_may_hold_all_server_threads_but_a_quarter() -> None:
    assert [WaitSlots(n).limit for n in (8, 16, 32, 256)] == [4, 12, 24, 192]
    slots = WaitSlots(8)
    held = [slots.hold() for _ in range(5)]
    assert [h.__enter__() for h in held] == [True, True, True, True, False]
    held[0].__exit__(None, None, None)
    with slots.hold() as again:
        assert again  # a slot comes back when its call ends
    with pytest.raises(RuntimeError), slots.hold() as taken:
        assert taken
        raise RuntimeError("the call failed")
    with slots.hold() as after_failure:
        assert after_failure


# ---- peer addresses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "127.0.0.1:50052",
        "localhost:1",
        "queue:65535",
        "queue-1.svc.cluster.local:50052",
        "blixard_queue_1:50052",
        "[::1]:50052",
        "[fe80::1%eth0]:50052",
    ],
)
def test_an_address_is_host_and_port(value: str) -> None:
    env = EnvReader("JOBS_", {"JOBS_QUEUE_ADDRESS": value})
    assert env.address("QUEUE_ADDRESS", "127.0.0.1:1") == value
    finish(env)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("127.0.0.1:5OO52", "the port '5OO52' is not a number"),
        ("queue:0", "the port 0 is not between 1 and 65535"),
        ("queue:65536", "the port 65536 is not between 1 and 65535"),
        ("queue:+80", "the port '+80' is not a number"),
        ("queue", "no port"),
        ("queue:", "no port"),
        (":50052", "no host"),
        ("my queue:50052", "the host 'my queue' is not a host name or an IP address"),
        ("999.1.1.1:50052", "the host '999.1.1.1' is not a host name or an IP address"),
        ("::1:50052", "an IPv6 address goes in brackets, as in [::1]:50051"),
        ("[::1", "the IPv6 address has no closing ]"),
        ("[::1]", "no port"),
        ("[::1]x:1", "'x:1' after the ] is not :port"),
        ("[queue]:1", "'queue' in brackets is not an IPv6 address"),
        ("unix:/run/queue.sock", "give host:port without a scheme"),
        ("dns:///queue:50052", "give host:port without a scheme"),
        ("http://queue:50052", "give host:port without a scheme"),
    ],
)
def test_a_malformed_address_names_the_setting(value: str, problem: str) -> None:
    env = EnvReader("JOBS_", {"JOBS_QUEUE_ADDRESS": value})
    assert env.address("QUEUE_ADDRESS", "127.0.0.1:50052") == "127.0.0.1:50052"
    message = error_of(env)
    assert message.startswith(f"JOBS_QUEUE_ADDRESS={value!r} is not host:port (")
    assert problem in message
    assert address_problem(value) is not None


def test_an_unset_address_is_the_default() -> None:
    env = EnvReader("JOBS_", {"JOBS_QUEUE_ADDRESS": "  "})
    assert env.address("QUEUE_ADDRESS", "127.0.0.1:50052") == "127.0.0.1:50052"
    finish(env)
