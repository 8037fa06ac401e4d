"""UpstreamClient.send against a real HTTP server on loopback: what goes on the wire, and what comes back."""

from __future__ import annotations

import http.server
import threading
import typing as t

import pytest

from wsgi_proxy.errors import UpstreamUnavailable
from wsgi_proxy.upstream import UpstreamClient, UpstreamSpec


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
    answer = client.send("GET", path, query=query, headers={}, body=None, stream=False)
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
        client.send("GET", "/cut", query=b"", headers={}, body=None, stream=False)
    assert _get(client, "/models") == b'{"ok":true}'  # and the pool goes on working
