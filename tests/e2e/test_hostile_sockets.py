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
