"""UpstreamClient.send against a real HTTP server on loopback: what goes on the wire, and what comes back."""

from __future__ import annotations

import http.server
import socket
import struct
import sys
import threading
import time
import typing as t

import pytest

from wsgi_proxy.config.gateway import UpstreamSpec
from wsgi_proxy.errors import UpstreamStreamInterrupted, UpstreamUnavailable
from wsgi_proxy.upstream import body as body_module
from wsgi_proxy.upstream.body import UpstreamStream
from wsgi_proxy.upstream.client import UpstreamClient, UpstreamRequest


class _Recorder(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: t.ClassVar[list[tuple[int, str, str | None]]] = []  # (client port, raw path, Cookie header)

    def do_GET(self) -> None:  # noqa: N802  # http.server's naming
        _Recorder.seen.append((self.client_address[1], self.path, self.headers.get("Cookie")))
        if self.path.startswith("/v1/cut"):
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b'{"id":')
            self.close_connection = True
            return
        body = b'{"ok":true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Set-Cookie", "upstream_session=SECRET; Path=/")
        if self.path.startswith("/v1/repeated"):
            self.send_header("X-Ratelimit-Note", "a")
            self.send_header("X-Ratelimit-Note", "b")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: t.Any) -> None:
        pass


@pytest.fixture
def upstream() -> t.Iterator[str]:
    _Recorder.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _get(client: UpstreamClient, path: str, query: bytes = b"") -> bytes:
    answer = client.send(UpstreamRequest("GET", path, query, stream=False))
    assert answer.status_code == 200
    return answer.content


def test_calls_reuse_one_pooled_connection(upstream: str) -> None:
    client = UpstreamClient(UpstreamSpec(name="u", url=upstream))
    for _ in range(5):
        assert _get(client, "/models") == b'{"ok":true}'
    assert len(_Recorder.seen) == 5
    assert len({port for port, _, _ in _Recorder.seen}) == 1  # one keep-alive connection, one pool


def test_upstream_cookies_are_never_kept_or_sent_back(upstream: str) -> None:
    client = UpstreamClient(UpstreamSpec(name="u", url=upstream))
    _get(client, "/models")
    _get(client, "/models")
    assert [cookie for _, _, cookie in _Recorder.seen] == [None, None]
    assert not client.session.cookies


def test_repeated_headers_come_back_as_the_upstream_sent_them(upstream: str) -> None:
    answer = UpstreamClient(UpstreamSpec(name="u", url=upstream)).send(
        UpstreamRequest("GET", "/repeated", b"", stream=False)
    )
    notes = [(name, value) for name, value in answer.headers.items() if name.lower() == "x-ratelimit-note"]
    assert notes == [("X-Ratelimit-Note", "a"), ("X-Ratelimit-Note", "b")]  # two lines, relayed as two
    assert answer.headers["x-ratelimit-note"] == "a, b"  # a lookup, any case, joins them
    assert answer.headers.get("CONTENT-TYPE") == "application/json"


def test_query_goes_upstream_byte_for_byte(upstream: str) -> None:
    client = UpstreamClient(UpstreamSpec(name="u", url=upstream))
    # Escapes in upper case, as the SDKs send them: urllib3 upper-cases lower-case ones (RFC 3986's
    # normal form, the same URI to any server), the one change the query may see on its way.
    query = b"stream=true&starting_after=3&include%5B%5D=a%2Fb&x=%7E&y=%22"
    _get(client, "/responses/resp_1", query)
    assert _Recorder.seen[0][1] == "/v1/responses/resp_1?" + query.decode()


def test_a_body_cut_short_is_an_upstream_error_raised_by_send(upstream: str) -> None:
    client = UpstreamClient(UpstreamSpec(name="u", url=upstream))
    with pytest.raises(UpstreamUnavailable):
        client.send(UpstreamRequest("GET", "/cut", b"", stream=False))
    assert _get(client, "/models") == b'{"ok":true}'  # and the pool goes on working


# --- streamed bodies: reading on what has arrived, never waiting for more -----------------------

_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%X\r\n%s\r\n" % (len(data), data)


def _events(first: int, count: int) -> list[bytes]:
    return [b'data: {"type":"d","sequence_number":%d}\n\n' % n for n in range(first, first + count)]


class _Scripted:
    """A one-connection server that sends each step's bytes after the request, then waits on a gate."""

    def __init__(self, steps: list[bytes | threading.Event | None]) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/v1"
        self._steps = steps
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        with conn:
            conn.recv(65536)
            for step in self._steps:
                if isinstance(step, threading.Event):
                    step.wait(10)
                elif step is None:  # a reset, not a clean close
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                else:
                    conn.sendall(step)

    def close(self) -> None:
        self._listener.close()
        self._thread.join(10)


@pytest.fixture
def scripted() -> t.Iterator[t.Callable[[list[bytes | threading.Event | None]], UpstreamStream]]:
    servers: list[_Scripted] = []

    def open_stream(steps: list[bytes | threading.Event | None]) -> UpstreamStream:
        server = _Scripted(steps)
        servers.append(server)
        client = UpstreamClient(UpstreamSpec(name="u", url=server.url, read_timeout=10))
        return UpstreamStream(client.send(UpstreamRequest("GET", "/s", b"", stream=True)))

    yield open_stream
    for server in servers:
        server.close()


def test_a_read_takes_every_chunk_that_has_arrived(scripted: t.Any) -> None:
    events = _events(0, 50)
    first, then = threading.Event(), threading.Event()
    # After the headers, so that none waits in the reader's buffer (what comes with the headers is
    # returned first, up to that buffer: the next test).
    stream = scripted(
        [_HEAD, first, b"".join(_chunk(e) for e in events), then, _chunk(b"late\n\n") + _chunk(b"")]
    )
    first.set()
    time.sleep(0.2)  # all 50 chunks are in the kernel before the first read
    assert stream.read() == b"".join(events)  # one read, not fifty
    then.set()
    assert stream.read() == b"late\n\n"
    assert stream.read() == b""


def test_what_came_with_the_headers_is_read_first_then_the_rest(scripted: t.Any) -> None:
    events = _events(0, 100)  # ~4.5 KB: more than the reader's buffer holds
    stream = scripted([_HEAD + b"".join(_chunk(e) for e in events) + _chunk(b"")])
    time.sleep(0.2)
    received = [stream.read(), stream.read()]
    assert b"".join(received) == b"".join(events)  # the buffer's part, then the kernel's in one read
    assert stream.read() == b""


def test_a_read_never_waits_for_a_chunk_still_on_its_way(scripted: t.Any) -> None:
    gate = threading.Event()
    events = _events(0, 2)
    # The second chunk's size line has arrived, its bytes have not: the first event must go now.
    stream = scripted(
        [_HEAD + _chunk(events[0]) + b"%X\r\n" % len(events[1]), gate, events[1] + b"\r\n0\r\n\r\n"]
    )
    time.sleep(0.2)
    started = time.monotonic()
    assert stream.read() == events[0]
    assert time.monotonic() - started < 1.0
    gate.set()
    assert stream.read() == events[1]
    assert stream.read() == b""


def test_a_wait_finds_the_body_that_came_with_the_headers_and_then_is_one_poll(
    scripted: t.Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate, hold = threading.Event(), threading.Event()
    events = _events(0, 2)
    # The first event arrives with the headers: http.client's reader holds it, the kernel nothing.
    # The body's end comes with the last event, and the connection stays open after it.
    stream = scripted([_HEAD + _chunk(events[0]), gate, _chunk(events[1]) + _chunk(b""), hold])
    started = time.monotonic()
    assert stream.wait(5.0)
    assert time.monotonic() - started < 1.0
    assert stream.read() == events[0]
    peeks, polls = [], []
    peek, poll = body_module._peek_without_blocking, stream._poll

    def counted_peek(*args: t.Any) -> bytes:
        peeks.append(args)
        return peek(*args)

    def counted_poll(*args: t.Any) -> bool:
        polls.append(args)
        return bool(poll(*args))

    monkeypatch.setattr(body_module, "_peek_without_blocking", counted_peek)
    monkeypatch.setattr(stream, "_poll", counted_poll)
    assert not stream.wait(0.2)  # silence: with the reader's buffer empty, one poll and nothing else
    assert (len(polls), peeks) == (1, [])
    gate.set()
    assert stream.wait(5.0)
    assert stream.read() == events[1]  # and the terminating chunk, read with it: nothing to wait for
    started = time.monotonic()
    assert stream.wait(5.0)
    assert time.monotonic() - started < 1.0
    assert stream.read() == b""
    hold.set()


def test_headers_longer_than_the_read_buffer_arrive_whole_and_the_buffer_stays_small() -> None:
    long = b"".join(b"X-Long-%d: %s\r\n" % (n, b"v" * 100) for n in range(60))  # ~7 KB of headers
    events = _events(0, 3)
    head = _HEAD[:-2] + long + b"\r\n"
    server = _Scripted([head + b"".join(_chunk(e) for e in events) + _chunk(b"")])
    try:
        client = UpstreamClient(UpstreamSpec(name="u", url=server.url, read_timeout=10))
        answer = client.send(UpstreamRequest("GET", "/s", b"", stream=True))
        assert [answer.headers[f"X-Long-{n}"] for n in (0, 59)] == ["v" * 100] * 2
        assert answer.headers["Content-Type"] == "text/event-stream"
        # The reader an open stream keeps: its size counts its buffer (http.client's own is 8 KiB).
        assert sys.getsizeof(answer.raw._fp.fp) < 4096
        stream = UpstreamStream(answer)
        received = b""
        while chunk := stream.read():
            received += chunk
        assert received == b"".join(events)
    finally:
        server.close()


def test_a_shutdown_tells_the_upstream_at_once_that_its_client_left() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []
    event = _events(0, 1)[0]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(_HEAD + _chunk(event))
            conn.settimeout(5)
            seen.append(conn.recv(1))  # b"": the proxy's side of the connection is over

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    client = UpstreamClient(UpstreamSpec(name="u", url=url, read_timeout=10))
    stream = UpstreamStream(client.send(UpstreamRequest("GET", "/s", b"", stream=True)))
    try:
        assert stream.read() == event
        stream.shutdown()  # what the watchdog does when the client has gone; nothing is closed yet
        thread.join(5)
        assert seen == [b""]
        with pytest.raises(UpstreamStreamInterrupted):  # and the relay's next read ends the stream
            stream.read()
    finally:
        stream.close()
        listener.close()


def test_a_failure_after_arrived_chunks_comes_after_them(scripted: t.Any) -> None:
    events = _events(0, 3)
    cut = _chunk(events[2])[:-5]  # the last chunk is cut short, then the connection reset
    stream = scripted([_HEAD + _chunk(events[0]) + _chunk(events[1]) + cut, None])
    time.sleep(0.2)
    got = b""
    with pytest.raises(UpstreamStreamInterrupted):
        while piece := stream.read():
            got += piece
    assert got.startswith(events[0] + events[1])  # whole events first; the relay drops the half one


def test_an_https_upstream_keeps_certificate_verification_on_its_one_pool() -> None:
    client = UpstreamClient(UpstreamSpec(name="u", url="https://127.0.0.1:1/v1", connect_timeout=1))
    for _ in range(2):  # refused: nothing listens on port 1
        with pytest.raises(UpstreamUnavailable):
            client.send(UpstreamRequest("GET", "/models", b"", stream=False))
    pools = list(client.session.get_adapter("https://127.0.0.1:1/v1")._pools.values())  # type: ignore[attr-defined]
    assert len(pools) == 1
    assert pools[0].cert_reqs == "CERT_REQUIRED"
    assert pools[0].ca_certs or pools[0].ca_cert_dir


def test_a_clean_close_inside_a_chunk_is_an_interruption_not_an_end(scripted: t.Any) -> None:
    event = _events(0, 1)[0]
    stream = scripted([_HEAD + _chunk(event) + b"%X\r\npart" % 20])  # then a FIN, not the last chunk
    assert stream.read() == event + b"part"
    with pytest.raises(UpstreamStreamInterrupted, match="closed inside its chunked body"):
        stream.read()


def test_broken_chunked_framing_is_an_interruption(scripted: t.Any) -> None:
    stream = scripted([_HEAD + b"5\r\nhello!!\r\n"])
    with pytest.raises(UpstreamStreamInterrupted, match="ChunkedFramingError"):
        stream.read()
