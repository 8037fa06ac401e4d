"""Small raw-HTTP helpers for the end-to-end tests (bytes exactly as they arrive)."""

from __future__ import annotations

import json
import socket
import time
import typing as t
from urllib.parse import urlsplit

import requests

from wsgi_proxy.wire.sse import EventSplitter, parse_event


def read_all(response: requests.Response) -> bytes:
    """Every body byte of a streamed answer, decoded, read with read1 until the end."""
    out = bytearray()
    while chunk := response.raw.read1(65536, decode_content=True):
        out += chunk
    return bytes(out)


def events_of(body: bytes) -> list[dict[str, t.Any]]:
    """The JSON payloads of the data-bearing events in an SSE body."""
    splitter = EventSplitter()
    found = []
    for event in splitter.feed(body):
        for line in event.splitlines():
            if line.startswith(b"data:"):
                found.append(json.loads(line[5:]))
    return found


def timed_events(response: requests.Response) -> list[tuple[float, int | None]]:
    """(arrival time, sequence_number) of each event as it arrives."""
    splitter = EventSplitter()
    out = []
    while chunk := response.raw.read1(65536, decode_content=True):
        now = time.monotonic()
        for event in splitter.feed(chunk):
            info = parse_event(event)
            if info.type is not None:
                out.append((now, info.sequence_number))
    return out


def raw_request(url: str, method: str, headers: dict[str, str], body: bytes = b"") -> socket.socket:
    """Send one HTTP/1.1 request on a plain socket and return the socket (the caller reads/closes)."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=10)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return sock


def recv_until(sock: socket.socket, needle: bytes, limit: float = 10.0) -> bytes:
    """Read from ``sock`` until ``needle`` has been seen (or raise after ``limit`` seconds)."""
    data = b""
    deadline = time.monotonic() + limit
    while needle not in data:
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} did not arrive; got {data[-300:]!r}")
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before {needle!r}; got {data[-300:]!r}")
        data += chunk
    return data
