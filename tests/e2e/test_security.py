"""Authentication, secrets (canaries), and input that must never reach the upstream."""

from __future__ import annotations

import time
import typing as t
from pathlib import Path

import openai
import pytest
import requests

from wsgi_proxy.simulator import Simulator, SimulatorConfig
from wsgi_proxy.tools.launch import ServerProcess, free_port, gunicorn_argv

from ..envelope import assert_error
from .conftest import CLIENT_KEY, GUNICORN_CONF, UPSTREAM_KEY, Proxy, start_proxy

pytestmark = pytest.mark.e2e


def _fragments(secret: str, size: int = 6) -> list[str]:
    return [secret[i : i + size] for i in range(0, len(secret) - size + 1)]


def assert_no_secret(text: str, secret: str) -> None:
    leaked = [f for f in _fragments(secret) if f in text]
    assert not leaked, f"fragments of a secret leaked: {leaked}"


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "no key"),
        ({"Authorization": "Bearer sk-wrong"}, "wrong key"),
        ({"Authorization": CLIENT_KEY}, "no scheme"),
    ],
)
def test_unauthenticated_requests_get_401_and_never_reach_upstream(
    proxy: Proxy, simulator: Simulator, headers: dict[str, str], reason: str
) -> None:
    simulator.clear_requests()
    answer = requests.post(
        proxy.base_url + "/responses", json={"model": "gpt-4o-mini"}, headers=headers, timeout=5
    )
    assert_error(answer, 401, code="invalid_api_key")
    assert simulator.requests == []


def test_sdk_with_wrong_key_raises_authentication_error(proxy: Proxy) -> None:
    with proxy.client(api_key="sk-not-a-proxy-key") as bad, pytest.raises(openai.AuthenticationError):
        bad.responses.create(model="gpt-4o-mini", input="hi")


def test_client_key_never_forwarded_and_upstream_key_never_returned(
    proxy: Proxy, simulator: Simulator
) -> None:
    simulator.clear_requests()
    with proxy.client() as client:
        created = client.responses.create(model="gpt-4o-mini", input="canary")
        list(client.responses.create(model="gpt-4o-mini", input="canary", stream=True))
        raw = client.responses.with_raw_response.retrieve(created.id)
    for request in simulator.requests:
        assert_no_secret(repr(request.headers) + repr(request.body), CLIENT_KEY)
        assert request.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert_no_secret(raw.text + repr(dict(raw.headers)), UPSTREAM_KEY)
    assert_no_secret(proxy.log(), UPSTREAM_KEY)
    assert_no_secret(proxy.log(), CLIENT_KEY)


@pytest.fixture(scope="module")
def rejecting_upstream() -> t.Iterator[Simulator]:
    sim = Simulator(config=SimulatorConfig(api_key="sk-a-different-key-entirely-0000")).start()
    yield sim
    sim.stop()


def test_upstream_rejecting_gateway_key_is_502_without_key_fragments(
    rejecting_upstream: Simulator, tmp_path: Path
) -> None:
    proxy = start_proxy(tmp_path, rejecting_upstream.base_url)
    try:
        with proxy.client() as client, pytest.raises(openai.InternalServerError) as caught:
            client.responses.create(model="gpt-4o-mini", input="hi")
        assert caught.value.status_code == 502
        assert "credentials" in caught.value.message
        text = caught.value.response.text
        assert_no_secret(text, UPSTREAM_KEY)
        assert "***" not in text
        assert_no_secret(proxy.log(), UPSTREAM_KEY)
        stream_answer = requests.get(
            proxy.base_url + "/responses/resp_x?stream=true",
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
            timeout=5,
        )
        assert stream_answer.status_code == 502
        assert_no_secret(stream_answer.text, UPSTREAM_KEY)
    finally:
        proxy.server.stop()


INJECTIONS = [
    "..%2Fmodels",
    "..%2F..%2Fv1%2Fmodels",
    "resp_1%0D%0AX-Injected:%20yes",
    "resp_1%3Fstream=true",
    "resp_1%23frag",
    "resp_1%2Fcancel%2Fx",
    "resp_%00",
    "%20resp_1",
    "resp_" + "a" * 130,
]


@pytest.mark.parametrize("path", INJECTIONS)
@pytest.mark.parametrize("suffix", ["", "/cancel", "/input_items"])
def test_path_injection_never_reaches_upstream(
    proxy: Proxy, simulator: Simulator, path: str, suffix: str
) -> None:
    simulator.clear_requests()
    method = "POST" if suffix == "/cancel" else "GET"
    answer = requests.request(
        method,
        f"{proxy.base_url}/responses/{path}{suffix}",
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        timeout=5,
    )
    assert answer.status_code in (400, 404), answer.text
    assert answer.json()["error"]["param"] in ("response_id", None)
    assert simulator.requests == []


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("stream=1", "stream"),
        ("stream=True", "stream"),
        ("stream=true&stream=false", "stream"),
        ("stream=true&starting_after=-1", "starting_after"),
        ("stream=true&starting_after=1.5", "starting_after"),
        ("stream=true&starting_after=12345678901234567890", "starting_after"),
        ("stream=true&starting_after=", "starting_after"),
    ],
)
def test_bad_retrieve_query_is_400_naming_param(
    proxy: Proxy, simulator: Simulator, query: str, param: str
) -> None:
    simulator.clear_requests()
    with proxy.client() as client, pytest.raises(openai.BadRequestError) as caught:
        client.get(f"/responses/resp_abc?{query}", cast_to=object)
    assert caught.value.param == param
    assert simulator.requests == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"not json", None),
        (b"[1, 2]", None),
        (b'{"model": 5}', "model"),
        (b'{"model": "gpt-4o-mini", "stream": "true"}', "stream"),
        (b'{"model": "gpt-4o-mini", "background": 1}', "background"),
        (b'{"model": "gpt-4o-mini", "store": "no"}', "store"),
        (b'{"model": "gpt-4o-mini", "previous_response_id": "../models"}', "previous_response_id"),
    ],
)
def test_bad_create_body_is_400_and_never_reaches_upstream(
    proxy: Proxy, simulator: Simulator, body: bytes, param: str | None
) -> None:
    simulator.clear_requests()
    answer = requests.post(
        proxy.base_url + "/responses",
        data=body,
        headers={"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"},
        timeout=5,
    )
    error = assert_error(answer, 400, param=param)
    assert error["message"].endswith(".")
    assert "pydantic" not in error["message"] and "Traceback" not in answer.text
    assert simulator.requests == []


def test_upstream_down_is_502(tmp_path: Path) -> None:
    proxy = start_proxy(tmp_path, f"http://127.0.0.1:{free_port()}/v1")
    try:
        with proxy.client() as client, pytest.raises(openai.InternalServerError) as caught:
            client.responses.create(model="gpt-4o-mini", input="hi")
        assert caught.value.status_code == 502
        assert caught.value.code == "upstream_unavailable"
    finally:
        proxy.server.stop()


def test_upstream_timeout_is_504(simulator: Simulator, tmp_path: Path) -> None:
    proxy = start_proxy(tmp_path, simulator.base_url, env={"WSGI_PROXY_READ_TIMEOUT": "0.5"})
    try:
        with proxy.client() as client, pytest.raises(openai.APIStatusError) as caught:
            client.responses.create(
                model="gpt-4o-mini", input="slow", metadata={"sim_gap_at": "1", "sim_gap_s": "3"}
            )
        assert caught.value.status_code == 504
    finally:
        proxy.server.stop()


def test_refuses_to_start_with_upstream_key_but_no_client_keys(tmp_path: Path) -> None:
    port = free_port()
    server = ServerProcess(
        gunicorn_argv(f"127.0.0.1:{port}", config=GUNICORN_CONF),
        ready_url=f"http://127.0.0.1:{port}/healthz",
        env={"WSGI_PROXY_UPSTREAM_API_KEY": UPSTREAM_KEY, "WSGI_PROXY_API_KEYS": ""},
        cwd=tmp_path,
        log_path=tmp_path / "refused.log",
    )
    with pytest.raises(RuntimeError, match="exited with status"):
        server.start()
    log = server.log()
    assert "WSGI_PROXY_API_KEYS" in log and "WSGI_PROXY_ALLOW_ANONYMOUS" in log
    assert "Traceback" not in log
    assert_no_secret(log, UPSTREAM_KEY)


def test_refuses_to_start_with_a_store_its_workers_could_not_open(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'allow_anonymous = true\nstore_url = "sqlite:///{tmp_path}/no-such-directory/state.db"\n'
        '[[upstreams]]\nname = "u"\nurl = "http://127.0.0.1:9/v1"\n'
    )
    port = free_port()
    server = ServerProcess(
        gunicorn_argv(f"127.0.0.1:{port}", config=GUNICORN_CONF),
        ready_url=f"http://127.0.0.1:{port}/healthz",
        env={"WSGI_PROXY_CONFIG": str(config)},
        cwd=tmp_path,
        log_path=tmp_path / "refused.log",
    )
    with pytest.raises(RuntimeError, match="exited with status 2"):
        server.start()
    log = server.log()
    assert log.startswith("wsgi-proxy: The SQLite store at ") and "no-such-directory" in log
    assert "Booting worker" not in log and "Traceback" not in log


def test_the_access_log_never_shows_a_basic_auth_user_name(simulator: Simulator, tmp_path: Path) -> None:
    import base64

    proxy = start_proxy(tmp_path, simulator.base_url, env={"WSGI_PROXY_ACCESS_LOG": "-"})
    try:
        basic = base64.b64encode(f"{CLIENT_KEY}:".encode()).decode()
        answer = requests.get(
            proxy.base_url + "/models", headers={"Authorization": f"Basic {basic}"}, timeout=5
        )
        assert answer.status_code == 401
        time.sleep(0.3)  # gunicorn writes its access line after the answer
        log = proxy.log()
        assert '"GET /v1/models HTTP/1.1" 401' in log  # the access log is on
        assert_no_secret(log, CLIENT_KEY)
    finally:
        proxy.server.stop()
