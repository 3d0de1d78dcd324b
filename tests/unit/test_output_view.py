"""services.common.output: the text view that older clients read beside the bytes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.common.output import sent_bytes, text_view


@given(st.text(max_size=300))
def test_the_view_of_utf8_text_is_that_text(text: str) -> None:
    assert text_view(text.encode()) == text


@given(st.binary(max_size=2000))
def test_the_view_is_never_longer_than_the_bytes_or_256_bytes(data: bytes) -> None:
    view = text_view(data)
    assert len(view.encode()) <= max(len(data), 256)
    # What it keeps is the end of the full view (a tail's view is a tail).
    assert data.decode("utf-8", errors="replace").endswith(view)


def test_a_short_odd_output_is_viewed_whole() -> None:
    assert text_view(b"a\x00b\xff") == "a\x00b\ufffd"


def test_a_request_from_an_older_sender_gives_its_texts_bytes() -> None:
    assert sent_bytes(b"\x00\xff", "ignored") == b"\x00\xff"
    assert sent_bytes(b"", "h\x00\u00e9") == "h\x00\u00e9".encode()
