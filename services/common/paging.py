"""Opaque page tokens: the keyset position a list stopped at, for the client to hand back.

A servicer decodes the token into the request's ``Problems``, so a bad token is reported
with the request's other problems (one INVALID_ARGUMENT), and hands the position on."""

from __future__ import annotations

import base64
from collections.abc import Sequence

from google.protobuf.message import Message

from services.common.validation import Problems

_SEPARATOR = "\x1f"
FIELD = "page_token"


def encode(*parts: str) -> str:
    return base64.urlsafe_b64encode(_SEPARATOR.join(parts).encode()).decode()


def decode(token: str, count: int, problems: Problems) -> list[str] | None:
    """The ``count`` parts of a token this service gave out; None when there is no token
    (the first page), and None when it is not one of ours, which ``problems`` is told."""
    if not token:
        return None
    try:
        parts = base64.urlsafe_b64decode(token.encode()).decode().split(_SEPARATOR)
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        parts = []
    if len(parts) != count:
        not_ours(problems)
        return None
    return parts


def not_ours(problems: Problems) -> None:
    """Tell ``problems`` that the page token is not one this service gave out (for a
    caller whose own reading of the parts fails)."""
    problems.add(FIELD, "not a token this service gave out")


# What the rows of one page may take: a page of large rows (output tails, payloads) ends
# early, well under the 4 MiB a message may carry, and the next page goes on from there.
PAGE_BYTES = 3 * 1024 * 1024


def fitting(rows: Sequence[Message], budget: int = PAGE_BYTES) -> int:
    """How many of ``rows`` (at least one) a page sends within ``budget`` bytes."""
    total = 0
    for n, row in enumerate(rows):
        total += row.ByteSize() + 8  # and the field's tag and length
        if n and total > budget:
            return n
    return len(rows)
