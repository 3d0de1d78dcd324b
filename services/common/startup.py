"""The process edge: logging set-up, and one line (no traceback) for operator mistakes."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import NoReturn

from services.common.config import ConfigError

EXIT_CONFIG = 2
EXIT_STARTUP = 1


class StartupError(Exception):
    """The process cannot start (port in use, database unreachable). One line, naming the
    setting and the likely cause."""


def configure_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # Alembic narrates every start-up at INFO; services.common.migrations says what changed.
    logging.getLogger("alembic").setLevel(logging.WARNING)


def run_main(program: str, main: Callable[[], int | None]) -> NoReturn:
    """Run ``main``; a ConfigError or StartupError ends the process with one line."""
    try:
        code = main() or 0
    except ConfigError as exc:
        print(f"{program}: configuration error: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except StartupError as exc:
        print(f"{program}: cannot start: {exc}", file=sys.stderr)
        sys.exit(EXIT_STARTUP)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
