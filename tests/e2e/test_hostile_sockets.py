"""Sockets that hold the server's resources, under the repository's gunicorn.conf.py: no key needed."""

from __future__ import annotations

import json
import signal
import socket
import time
import typing as t
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from wsgi_proxy.simulator import Simulator
from wsgi_proxy.tools.hostile import IdleClosers

from .conftest import CLIENT_KEY, Proxy, start_proxy
from .sse import raw_request, recv_until

pytestmark = pytest.mark.e2e

IDLE_SOCKETS = 100


@pytest.fixture
def idle_closers(proxy: Proxy) -> t.Iterator[IdleClosers]:
    with IdleClosers(proxy.root_url, IDLE_SOCKETS) as sockets:
        yield sockets


def test_idle_connection_close_sockets_do_not_stall_other_requests(
    proxy: Proxy, idle_closers: IdleClosers
) -> None:
    # gunicorn 26+ lingers up to 2 s per such close on the worker's event loop: 100 of them kept
    # every new request waiting for minutes. Each request here must be answered well within that.
    time.sleep(0.5)  # let the workers reach the closes
    slowest = 0.0
    for _ in range(5):
        started = time.monotonic()
        answer = requests.get(proxy.root_url + "/healthz", timeout=60)
        slowest = max(slowest, time.monotonic() - started)
        assert answer.status_code == 200
    assert slowest < IDLE_SOCKETS * 2.0 / 10, f"a request waited {slowest:.1f} s behind idle sockets"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "sighup"])
def test_new_connections_are_refused_or_served_at_once_while_workers_drain(
    simulator: Simulator, tmp_path: Path, signum: int
) -> None:
    proxy = start_proxy(tmp_path, simulator.base_url, env={"WSGI_PROXY_GRACEFUL_TIMEOUT": "10"})
    try:
        body = {
            "model": "m",
            "input": "x",
            "stream": True,
            "metadata": {"sim_words": "2000", "sim_delay_ms": "20"},
        }
        auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
        with requests.post(
            proxy.base_url + "/responses", json=body, headers=auth, stream=True, timeout=30
        ) as held:
            assert held.raw.read1(100)  # a foreground stream keeps its worker draining for seconds
            proxy.server.signal(signum)
            time.sleep(1.5)  # the workers have seen the signal and stopped accepting
            outcomes = []
            for _ in range(3):
                started = time.monotonic()
                try:
                    outcome: object = requests.get(proxy.root_url + "/healthz", timeout=30).status_code
                except requests.ConnectionError:
                    outcome = "refused"
                outcomes.append((outcome, round(time.monotonic() - started, 2)))
        assert all(took < 2.0 for _, took in outcomes), outcomes  # never left hanging in a queue
        # Stopping, gunicorn refuses them or still serves them; reloading, its new workers serve them.
        allowed = {"refused", 200} if signum == signal.SIGTERM else {200}
        assert {outcome for outcome, _ in outcomes} <= allowed, outcomes
    finally:
        proxy.server.stop()


def _accept_queue(port: int) -> int:
    """How many connections the kernel holds on the listening socket of ``port`` that no worker has
    accepted yet (``/proc/net/tcp`` gives a listener's accept queue as its receive queue)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"nothing listens on port {port}")


def test_a_worker_whose_threads_are_all_held_leaves_new_connections_to_the_others(
    simulator: Simulator, tmp_path: Path
) -> None:
    """gthread accepts up to worker_connections and queues what its busy threads cannot take: a
    connection queued behind streams waited as long as they lasted, even with another worker idle."""
    proxy = start_proxy(tmp_path, simulator.base_url, env={"WSGI_PROXY_THREADS": "2"})  # two workers
    port = urlsplit(proxy.root_url).port
    assert port is not None
    long_stream = json.dumps(
        {"model": "m", "input": "x", "stream": True, "metadata": {"sim_words": "2000", "sim_delay_ms": "100"}}
    ).encode()
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}
    held: list[socket.socket] = []
    try:
        for _ in range(4):  # a thread each, on whichever worker has one free
            held.append(raw_request(proxy.base_url + "/responses", "POST", headers, long_stream))
            recv_until(held[-1], b'"sequence_number":0')
        waiting = raw_request(proxy.root_url + "/healthz", "GET", {})
        held.append(waiting)
        time.sleep(1.0)  # a worker's loop would have accepted it by now
        assert _accept_queue(port) == 1  # left to the kernel, for the first worker to free a thread
        held.pop(0).close()
        assert recv_until(waiting, b"\r\n\r\n").startswith(b"HTTP/1.1 200")
        assert _accept_queue(port) == 0
    finally:
        for sock in held:
            sock.close()
        proxy.server.stop()


@pytest.mark.parametrize("path", ["/v1/realtime", "/v1/responses/input_tokens", "/responses", "/"])
def test_a_websocket_upgrade_gets_a_json_426_so_clients_fall_back_to_http(proxy: Proxy, path: str) -> None:
    parts = urlsplit(proxy.root_url)
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=10) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: proxy\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {CLIENT_KEY}\r\n\r\n".encode()
        )
        answer = b""
        while b"}}" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 426 "), head
    assert b"application/json" in head.lower()
    assert json.loads(body)["error"]["code"] == "websocket_unavailable"


def test_a_base_url_without_v1_gets_a_json_404_that_says_so(proxy: Proxy) -> None:
    import openai

    with openai.OpenAI(base_url=proxy.root_url, api_key=CLIENT_KEY, max_retries=0, timeout=10) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            client.responses.create(model="gpt-4o-mini", input="hi")
    assert "end your client's base URL with it" in caught.value.message and "/v1" in caught.value.message


def _post(path: str, body: bytes, key: str) -> tuple[bytes, bytes]:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode(), body


def _answer(sock: socket.socket) -> bytes:
    """One whole answer with a Content-Length, read off ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _length(data):
        piece = sock.recv(65536)
        assert piece, f"the connection closed after {data!r}"
        data += piece
    return data


def _length(data: bytes) -> int:
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1").lower()
    return int(head.partition("content-length: ")[2].partition("\r\n")[0] or 0)


@pytest.mark.parametrize(
    ("path", "key", "status"),
    [("/v1/chat/completions", "sk-not-a-key", b"401"), ("/nowhere", CLIENT_KEY, b"404")],
    ids=["refused-key", "unknown-route"],
)
def test_a_refusal_reads_the_body_first_so_the_next_request_on_the_connection_is_answered(
    proxy: Proxy, path: str, key: str, status: bytes
) -> None:
    """SDKs send a body just after its headers. An answer given before the body was read left it to
    gunicorn, which read the body after answering; a next request that came in the same read sat in
    gunicorn's buffer until the keep-alive timeout closed the connection without an answer (seen as
    a rare "Server disconnected" in CI). The refusal now waits for the body."""
    first = _post(path, b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}', key)
    second = _post("/v1/embeddings", b'{"model":"text-embedding-3-small","input":"x"}', CLIENT_KEY)
    address = urlsplit(proxy.root_url)
    with socket.create_connection((address.hostname, address.port)) as sock:
        sock.settimeout(0.5)
        sock.sendall(first[0])
        with pytest.raises(TimeoutError):
            sock.recv(65536)  # nothing yet: the body is still to come
        sock.settimeout(4)  # under gunicorn's keep-alive timeout (5 s), which ended the old hang
        sock.sendall(first[1])
        assert _answer(sock).split(b" ")[1] == status
        sock.sendall(b"".join(second))
        assert _answer(sock).startswith(b"HTTP/1.1 200 ")
