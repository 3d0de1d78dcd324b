"""Job output is bytes, from arbitrary programs. The contracts carry it in ``bytes`` fields
(``output_tail_bytes``) beside their older ``string`` fields (``output_tail``), which keep
a UTF-8 view of it for clients that predate the bytes fields."""

from __future__ import annotations

# A short output's view is whole even where replacement characters make it longer.
_VIEW_SLACK = 256


def text_view(data: bytes) -> str:
    """``data`` as text, invalid UTF-8 replaced by U+FFFD. A replacement character takes 3
    bytes: a view longer in UTF-8 than ``data`` (and than 256 bytes) keeps its last
    characters that fit, as a tail keeps its last bytes, so no message or limit sized for
    the bytes overflows because of their view."""
    text = data.decode("utf-8", errors="replace")
    encoded = text.encode()
    room = max(len(data), _VIEW_SLACK)
    if len(encoded) <= room:
        return text
    return encoded[len(encoded) - room :].decode("utf-8", errors="ignore")


def sent_bytes(data: bytes, text: str) -> bytes:
    """The output a request carries: its bytes field, or, from a sender that predates it,
    the UTF-8 of its text field."""
    return data or text.encode("utf-8")
