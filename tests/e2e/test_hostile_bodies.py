"""Bodies a careless or hostile client sends, over raw sockets to gunicorn: every one a JSON 4xx that
never reaches the upstream, never a 500 or a traceback."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import pytest

from wsgi_proxy.simulator import Simulator

from .conftest import CLIENT_KEY, Proxy

pytestmark = pytest.mark.e2e


def _exchange(proxy: Proxy, head: bytes, body: bytes = b"", *, half_close: bool = False) -> tuple[int, bytes]:
    """Send a request's raw bytes; return the answer's status and body."""
    parts = urlsplit(proxy.base_url)
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=10) as sock:
        sock.sendall(head + body)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        headers, _, rest = answer.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in headers.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        while len(rest) < length:
            rest += sock.recv(65536)
    return int(headers.split(b" ", 2)[1]), rest[:length]


def _head(proxy: Proxy, *lines: str) -> bytes:
    path = urlsplit(proxy.base_url).path + "/responses"
    fixed = [
        f"POST {path} HTTP/1.1",
        "Host: proxy",
        f"Authorization: Bearer {CLIENT_KEY}",
        "Connection: close",
    ]
    return ("\r\n".join([*fixed, "Content-Type: application/json", *lines]) + "\r\n\r\n").encode()


def _assert_refused(status: int, body: bytes, says: str) -> None:
    assert status == 400, body
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and says in error["message"], error
    assert b"Traceback" not in body


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
        (b'{"model": "gpt-4o-mini", "input": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested too deeply"),
        (b'\xef\xbb\xbf{"model": "gpt-4o-mini"}', "byte order mark"),
        ('{"model": "gpt-4o-mini"}'.encode("utf-16"), "not valid UTF-8"),
        (b'{"model": "gpt-4o-mini", "temperature": NaN}', "holds NaN"),
    ],
    ids=["deep_array", "deep_field", "bom", "utf16", "nan"],
)
def test_bodies_a_stricter_upstream_would_read_otherwise_are_refused(
    proxy: Proxy, simulator: Simulator, body: bytes, says: str
) -> None:
    simulator.clear_requests()
    status, answer = _exchange(proxy, _head(proxy, f"Content-Length: {len(body)}"), body)
    _assert_refused(status, answer, says)
    assert simulator.requests == []


def test_a_body_shorter_than_its_content_length_is_refused(proxy: Proxy, simulator: Simulator) -> None:
    simulator.clear_requests()
    body = b'{"model": "gpt-4o-mini", "input": "hi"}'
    status, answer = _exchange(
        proxy, _head(proxy, f"Content-Length: {len(body) + 50}"), body, half_close=True
    )
    _assert_refused(status, answer, f"ended after {len(body)} of the {len(body) + 50} bytes")
    assert simulator.requests == []


@pytest.mark.parametrize(
    "chunked",
    [
        b"zz\r\n{}\r\n0\r\n\r\n",  # not a hexadecimal size
        b"2\r\n{}XX0\r\n\r\n",  # a chunk without its CRLF
        b"2\r\n{}\r\n0\r\nX-Trailer: \x00\r\n\r\n",  # a broken trailer
    ],
    ids=["bad_size", "missing_crlf", "bad_trailer"],
)
def test_a_malformed_chunked_body_is_refused(proxy: Proxy, simulator: Simulator, chunked: bytes) -> None:
    simulator.clear_requests()
    status, answer = _exchange(proxy, _head(proxy, "Transfer-Encoding: chunked"), chunked, half_close=True)
    _assert_refused(status, answer, "chunked transfer coding is malformed")
    assert simulator.requests == []
    assert "Traceback" not in proxy.log()


def test_the_worker_survives_them_all(proxy: Proxy) -> None:
    body = b'{"model": "gpt-4o-mini", "input": "still here"}'
    status, answer = _exchange(proxy, _head(proxy, f"Content-Length: {len(body)}"), body)
    assert status == 200 and json.loads(answer)["status"] == "completed"
