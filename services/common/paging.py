"""Opaque page tokens: the keyset position a list stopped at, for the client to hand back."""

from __future__ import annotations

import base64

from services.common.errors import InvalidArgument

_SEPARATOR = "\x1f"


def encode(*parts: str) -> str:
    return base64.urlsafe_b64encode(_SEPARATOR.join(parts).encode()).decode()


def decode(token: str, count: int) -> list[str]:
    """The ``count`` parts of a token this service gave out; INVALID_ARGUMENT otherwise."""
    try:
        parts = base64.urlsafe_b64decode(token.encode()).decode().split(_SEPARATOR)
    except (ValueError, UnicodeDecodeError):
        raise invalid_token() from None
    if len(parts) != count:
        raise invalid_token()
    return parts


def invalid_token() -> InvalidArgument:
    return InvalidArgument(
        "page_token is not a token this service gave out",
        violations=[("page_token", "not a token this service gave out")],
    )
