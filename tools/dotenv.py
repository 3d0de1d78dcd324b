"""`python -m tools.dotenv`: create .env from .env.example with random secrets, once.
An existing .env is left as it is."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    target = ROOT / ".env"
    if target.exists():
        return 0
    lines = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and value.startswith("change-me"):
            line = f"{name}={secrets.token_urlsafe(24)}"
        lines.append(line)
    target.write_text("\n".join(lines) + "\n")
    target.chmod(0o600)
    print("created .env with random tokens and password (kept out of git)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
