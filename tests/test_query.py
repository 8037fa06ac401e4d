"""Raw query editing: one parameter replaced, every other byte and order kept."""

from __future__ import annotations

import pytest

from wsgi_proxy.upstream.resume import resume_query
from wsgi_proxy.wire.query import replace_param


@pytest.mark.parametrize(
    ("query", "name", "value", "first", "expected"),
    [
        (b"", "starting_after", b"3", False, b"starting_after=3"),
        (b"stream=true", "starting_after", b"3", False, b"stream=true&starting_after=3"),
        (b"starting_after=1&stream=true", "starting_after", b"9", False, b"stream=true&starting_after=9"),
        (b"starting_after=1&starting_after=2", "starting_after", b"9", False, b"starting_after=9"),
        (b"starting%5Fafter=1&stream=true", "starting_after", b"9", False, b"stream=true&starting_after=9"),
        (
            b"include%5B%5D=a&include%5B%5D=b&stream=true",
            "starting_after",
            b"4",
            False,
            b"include%5B%5D=a&include%5B%5D=b&stream=true&starting_after=4",
        ),
        (b"", "api-version", b"2025-04-01-preview", True, b"api-version=2025-04-01-preview"),
        (b"stream=true", "api-version", b"v", True, b"api-version=v&stream=true"),
        (b"api%2Dversion=old&a=1", "api-version", b"v", True, b"api-version=v&a=1"),
        (b"a=1&&b=2&stream=true", "stream", None, False, b"a=1&b=2"),
    ],
)
def test_replace_param(query: bytes, name: str, value: bytes | None, first: bool, expected: bytes) -> None:
    assert replace_param(query, name, value, first=first) == expected


def test_resume_query_keeps_the_client_query_when_nothing_was_forwarded() -> None:
    assert resume_query(b"stream=true&starting_after=5&x=%20", None) == b"stream=true&starting_after=5&x=%20"
