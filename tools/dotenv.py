"""`python -m tools.dotenv`: create .env from .env.example with random secrets and this
checkout's compose project name, once. An existing .env is left as it is.

Also what tools/compose.py reads back from .env (``read``) and the project name it gives
a checkout (``project_name``)."""

from __future__ import annotations

import hashlib
import re
import secrets
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The .env.example value that make .env replaces with the checkout's project name.
THIS_CHECKOUT = "this-checkout"


def project_name(root: Path) -> str:
    """The compose project of the checkout at ``root``: its folder's name and a hash of its
    path, so two checkouts on one host (even two folders named alike) never share a stack,
    its volumes or its image tags. Lowercase letters, digits and dashes, as compose wants."""
    folder = re.sub(r"[^a-z0-9]+", "-", root.name.lower()).strip("-")[:30] or "checkout"
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:6]
    return f"blixard-{folder}-{digest}"


def read(path: Path) -> dict[str, str]:
    """The NAME=value lines of an env file (comments and blank lines skipped)."""
    values: dict[str, str] = {}
    if not path.exists():
        return values
    for line in path.read_text().splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and name and not name.startswith("#"):
            values[name.strip()] = value.strip().strip("'\"")
    return values


def render(example: str, root: Path) -> str:
    lines = []
    for line in example.splitlines():
        name, sep, value = line.partition("=")
        if sep and value.startswith("change-me"):
            line = f"{name}={secrets.token_urlsafe(24)}"
        elif sep and value == THIS_CHECKOUT:
            line = f"{name}={project_name(root)}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main() -> int:
    target = ROOT / ".env"
    if target.exists():
        return 0
    target.write_text(render((ROOT / ".env.example").read_text(), ROOT))
    target.chmod(0o600)
    print(
        f"created .env with random tokens and password (kept out of git), compose project "
        f"{project_name(ROOT)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
