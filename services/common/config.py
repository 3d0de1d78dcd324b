"""Settings from environment variables, read in one place per service.

Each service reads its own prefix (``JOBS_``, ``QUEUE_``, ``VMS_``, ``WORKER_``) plus the
suite-wide ``BLIXARD_`` settings. Every problem is collected, so an operator sees all of
them at once, in one line, naming each setting; an unknown setting with a known prefix is
a problem too (a typo must not be silently ignored).
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

N = TypeVar("N", int, float)


class ConfigError(Exception):
    """An operator mistake in the settings. Its message is one line naming the settings."""


class EnvReader:
    """Reads typed settings under one prefix and remembers every problem."""

    def __init__(self, prefix: str, environ: Mapping[str, str] | None = None) -> None:
        self.prefix = prefix
        self.environ = os.environ if environ is None else environ
        self._known: set[str] = set()
        self.problems: list[str] = []

    def _raw(self, name: str) -> tuple[str, str | None]:
        full = self.prefix + name
        self._known.add(full)
        value = self.environ.get(full)
        if value is not None:
            value = value.strip()
        return full, value or None

    def text(self, name: str, default: str) -> str:
        _, value = self._raw(name)
        return default if value is None else value

    def optional_str(self, name: str) -> str | None:
        return self._raw(name)[1]

    def integer(
        self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        full, value = self._raw(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            self.problems.append(f"{full}={value!r} is not an integer")
            return default
        return self._bounded(full, number, minimum, maximum, default)

    def number(
        self,
        name: str,
        default: float,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> float:
        full, value = self._raw(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            self.problems.append(f"{full}={value!r} is not a number")
            return default
        if not math.isfinite(number):
            self.problems.append(f"{full}={value!r} is not a finite number")
            return default
        return self._bounded(full, number, minimum, maximum, default)

    def flag(self, name: str, default: bool) -> bool:
        full, value = self._raw(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        self.problems.append(f"{full}={value!r} is not a boolean (use 1/0, true/false)")
        return default

    def choice(self, name: str, default: str, choices: Iterable[str]) -> str:
        full, value = self._raw(name)
        allowed = tuple(choices)
        if value is None:
            return default
        if value.lower() not in allowed:
            self.problems.append(f"{full}={value!r} is not one of {', '.join(allowed)}")
            return default
        return value.lower()

    def address(self, name: str, default: str) -> str:
        """A peer's gRPC address: ``host:port``, an IPv6 host in brackets (``[::1]:50052``)."""
        full, value = self._raw(name)
        if value is None:
            return default
        problem = address_problem(value)
        if problem is not None:
            self.problems.append(f"{full}={value!r} is not host:port ({problem})")
            return default
        return value

    def _bounded(self, full: str, number: N, minimum: N | None, maximum: N | None, default: N) -> N:
        if minimum is not None and number < minimum:
            self.problems.append(f"{full}={number} is below the minimum {minimum}")
            return default
        if maximum is not None and number > maximum:
            self.problems.append(f"{full}={number} is above the maximum {maximum}")
            return default
        return number

    def unknown(self) -> list[str]:
        return sorted(k for k in self.environ if k.startswith(self.prefix) and k not in self._known)


def finish(*readers: EnvReader) -> None:
    """Raise one ConfigError listing every problem of every reader, or return."""
    problems: list[str] = []
    for reader in readers:
        problems.extend(reader.problems)
        problems.extend(f"{name} is not a known setting" for name in reader.unknown())
    if problems:
        raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class Tokens:
    """Bearer tokens per role. A role whose token is unset cannot be taken."""

    client: str | None = None
    worker: str | None = None
    admin: str | None = None

    @property
    def enabled(self) -> bool:
        return any((self.client, self.worker, self.admin))


@dataclass(frozen=True)
class SharedSettings:
    tokens: Tokens
    log_level: str
    traces: str


def read_shared(environ: Mapping[str, str] | None = None) -> tuple[SharedSettings, EnvReader]:
    """The suite-wide ``BLIXARD_`` settings every process reads."""
    env = EnvReader("BLIXARD_", environ)
    settings = SharedSettings(
        tokens=Tokens(
            client=env.optional_str("CLIENT_TOKEN"),
            worker=env.optional_str("WORKER_TOKEN"),
            admin=env.optional_str("ADMIN_TOKEN"),
        ),
        log_level=env.choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
        traces=env.choice("TRACES", "none", ("none", "console")),
    )
    return settings, env


DEFAULT_GRPC_THREADS = 256


@dataclass(frozen=True)
class ServerSettings:
    host: str
    port: int
    grace_seconds: float
    threads: int = DEFAULT_GRPC_THREADS  # calls served at once (waiting calls: 3/4 of them)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def read_server(env: EnvReader, default_port: int) -> ServerSettings:
    return ServerSettings(
        host=env.text("GRPC_HOST", "127.0.0.1"),
        port=env.integer("GRPC_PORT", default_port, minimum=0, maximum=65535),
        grace_seconds=env.number("SHUTDOWN_GRACE", 10.0, minimum=0.0, maximum=3600.0),
        threads=env.integer("GRPC_THREADS", DEFAULT_GRPC_THREADS, minimum=8, maximum=4096),
    )


_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9._-]*[A-Za-z0-9_])?")
_PORT = re.compile(r"[0-9]+")
_TARGET_FORM = re.compile(r"(unix|unix-abstract|dns|ipv4|ipv6|vsock):|[A-Za-z][A-Za-z0-9+.-]*://")


def address_problem(value: str) -> str | None:
    """What is wrong with ``value`` as ``host:port`` (a name, an IPv4 address or a bracketed
    IPv6 address, and a port 1-65535), or None. gRPC's ``unix:`` and ``dns:`` target forms
    are not taken: every address setting is documented as host:port."""
    problem = _host_port_problem(value)
    if problem is not None and _TARGET_FORM.match(value):
        return "give host:port without a scheme; gRPC's unix: and dns: targets are not supported"
    return problem


def _host_port_problem(value: str) -> str | None:
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket:
            return "the IPv6 address has no closing ]"
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{host!r} in brackets is not an IPv6 address"
        if rest and not rest.startswith(":"):
            return f"{rest!r} after the ] is not :port"
        colon, port = rest[:1], rest[1:]
    else:
        host, colon, port = value.rpartition(":")
        if ":" in host:
            return "an IPv6 address goes in brackets, as in [::1]:50051"
        if colon and not _is_host(host):
            return f"the host {host!r} is not a host name or an IP address" if host else "no host"
    if not colon:
        return "no port"
    if not _PORT.fullmatch(port):
        return f"the port {port!r} is not a number" if port else "no port"
    if not 1 <= int(port) <= 65535:
        return f"the port {int(port)} is not between 1 and 65535"
    return None


def _is_host(host: str) -> bool:
    if not _HOST_NAME.fullmatch(host):
        return False
    if host.replace(".", "").isdigit():  # digits and dots: it must be an IPv4 address
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
    return True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_auth_binding(env: EnvReader, server: ServerSettings, tokens: Tokens) -> None:
    """A server bound beyond loopback must have every role's token."""
    if is_loopback(server.host):
        return
    missing = [
        name
        for name, value in (
            ("BLIXARD_CLIENT_TOKEN", tokens.client),
            ("BLIXARD_WORKER_TOKEN", tokens.worker),
            ("BLIXARD_ADMIN_TOKEN", tokens.admin),
        )
        if not value
    ]
    if missing:
        env.problems.append(
            f"{env.prefix}GRPC_HOST={server.host} is not a loopback address, so tokens are "
            f"required: set {', '.join(missing)}"
        )


def database_url(env: EnvReader, default_name: str) -> str:
    return env.text("DATABASE_URL", f"sqlite:///var/{default_name}.sqlite3")
