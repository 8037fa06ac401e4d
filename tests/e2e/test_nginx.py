"""nginx in front, as the README deploys it: streams pass through whole, and slow clients are nginx's
problem, never the gunicorn threads'."""

from __future__ import annotations

import os
import shutil
import time
import typing as t

import pytest
import requests
from openai import OpenAI

from wsgi_proxy.simulator import Simulator
from wsgi_proxy.tools.hostile import Dribblers
from wsgi_proxy.tools.launch import ServerProcess, free_port, nginx_server

from .conftest import CLIENT_KEY, Proxy, start_proxy

pytestmark = pytest.mark.e2e

THREADS = 20  # per worker, two workers: 40 requests at once, far fewer than the slow clients below
SLOW_CLIENTS = 150


@pytest.fixture(scope="module")
def small_proxy(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Proxy]:
    proxy = start_proxy(
        tmp_path_factory.mktemp("small"), simulator.base_url, env={"WSGI_PROXY_THREADS": str(THREADS)}
    )
    yield proxy
    proxy.server.stop()


@pytest.fixture(scope="module")
def nginx(small_proxy: Proxy, tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[str]:
    if shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
        if os.environ.get("WSGI_PROXY_REQUIRE_NGINX") == "1":
            pytest.fail("nginx is not installed: apt-get install nginx-light (WSGI_PROXY_REQUIRE_NGINX=1)")
        pytest.skip("nginx is not installed: apt-get install nginx-light to run the nginx tests")
    port = free_port()
    server: ServerProcess = nginx_server(
        port, int(small_proxy.root_url.rsplit(":", 1)[1]), tmp_path_factory.mktemp("nginx")
    )
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.mark.parametrize("kind", ["headers", "body"])
def test_slow_clients_held_by_nginx_leave_the_gateway_free(
    nginx: str, kind: t.Literal["headers", "body"]
) -> None:
    with Dribblers(nginx, kind, SLOW_CLIENTS):
        time.sleep(2.0)  # every slow client is connected and dribbling
        slowest = 0.0
        for _ in range(5):
            started = time.monotonic()
            assert requests.get(nginx + "/healthz", timeout=30).status_code == 200
            slowest = max(slowest, time.monotonic() - started)
    assert slowest < 2.0, f"a request waited {slowest:.1f} s behind {SLOW_CLIENTS} slow clients"


def test_a_stream_through_nginx_arrives_whole_and_resumes(nginx: str) -> None:
    with OpenAI(base_url=nginx + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=30) as client:
        stream = client.responses.create(model="gpt-4o-mini", input="via nginx", stream=True, background=True)
        head = []
        for event in stream:
            head.append(event)
            if event.sequence_number == 4:
                break
        stream.close()
        rest = list(client.responses.retrieve(head[0].response.id, stream=True, starting_after=4))
    numbers = [e.sequence_number for e in head + rest]
    assert numbers == list(range(len(numbers))) and rest[-1].type == "response.completed"


def test_websocket_mode_through_nginx_with_the_sdk(nginx: str) -> None:
    # The README's block forwards Upgrade and Connection: without that nginx turns the upgrade into a
    # plain GET (a 405), and Codex spends seconds retrying before it falls back to HTTP.
    with OpenAI(base_url=nginx + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=30) as client:
        with client.responses.connect() as conn:
            conn.response.create(model="gpt-4o-mini", input="a turn via nginx")
            first = next(e for e in conn if e.type == "response.completed").response
            conn.response.create(model="gpt-4o-mini", input="and the next", previous_response_id=first.id)
            second = next(e for e in conn if e.type in ("response.completed", "error"))
        # Plain requests still reuse nginx's keep-alive connections to gunicorn.
        assert client.responses.retrieve(first.id).status == "completed"
    assert second.type == "response.completed"
    assert second.response.previous_response_id == first.id
