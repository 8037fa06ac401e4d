"""The extension inside a host app: mounted under a prefix, configured from app.config, once per app,
and leaving the host's routes, hooks, error pages and loggers as they were."""

from __future__ import annotations

import logging

import pytest
import responses
from flask import Flask

from wsgi_proxy import ProxySettings, ResponsesProxy

from .envelope import assert_error

UPSTREAM = "http://upstream.test/v1"


def _host_app() -> Flask:
    app = Flask("host")

    @app.route("/hello")
    def hello() -> str:
        return "host hello"

    @app.errorhandler(404)
    def host_not_found(exc: Exception) -> tuple[str, int]:
        return "host 404 page", 404

    return app


def test_extension_serves_under_prefix_and_leaves_host_alone(mocked: responses.RequestsMock) -> None:
    mocked.add(responses.GET, f"{UPSTREAM}/responses/resp_1", json={"id": "resp_1"})
    app = _host_app()
    ResponsesProxy(app, url_prefix="/llm/v1", settings=ProxySettings(upstream_url=UPSTREAM))
    client = app.test_client()

    resp = client.get("/llm/v1/responses/resp_1")
    assert resp.status_code == 200
    assert mocked.calls[0].request.url == f"{UPSTREAM}/responses/resp_1"

    assert_error(client.get("/llm/v1/nope"), 404, code="unknown_url")
    assert client.get("/hello").data == b"host hello"
    for path in ("/v1/responses/resp_1", "/nope", "/llm/nope"):
        resp = client.get(path)
        assert (resp.status_code, resp.data) == (404, b"host 404 page")
    assert len(mocked.calls) == 1


def test_extension_init_app_reads_app_config(mocked: responses.RequestsMock) -> None:
    mocked.add(responses.GET, "http://other.test/api/v1/models", json={"data": []})
    app = _host_app()
    app.config["WSGI_PROXY_UPSTREAM_URL"] = "http://other.test/api/v1"
    proxy = ResponsesProxy()
    proxy.init_app(app)
    assert app.test_client().get("/v1/models").status_code == 200
    assert len(mocked.calls) == 1


def test_extension_init_app_twice_raises() -> None:
    app = _host_app()
    proxy = ResponsesProxy(app, settings=ProxySettings(upstream_url=UPSTREAM))
    with pytest.raises(RuntimeError, match=r"already registered.*\.$"):
        proxy.init_app(app)
    with pytest.raises(RuntimeError, match="already registered"):
        ResponsesProxy(app, url_prefix="/other", settings=ProxySettings(upstream_url=UPSTREAM))


def test_extension_one_instance_serves_two_apps(mocked: responses.RequestsMock) -> None:
    mocked.add(responses.GET, f"{UPSTREAM}/models", json={})
    proxy = ResponsesProxy(settings=ProxySettings(upstream_url=UPSTREAM))
    first, second = _host_app(), _host_app()
    proxy.init_app(first)
    proxy.init_app(second)
    assert first.test_client().get("/v1/models").status_code == 200
    assert second.test_client().get("/v1/models").status_code == 200
    assert first.extensions["wsgi_proxy"] is not second.extensions["wsgi_proxy"]


def test_extension_leaves_the_hosts_loggers_alone(mocked: responses.RequestsMock) -> None:
    levels = {name: logging.getLogger(name).level for name in ("urllib3", "wsgi_proxy", "")}
    ResponsesProxy(_host_app(), settings=ProxySettings(upstream_url=UPSTREAM))
    assert {name: logging.getLogger(name).level for name in levels} == levels


def test_extension_answers_upgrades_under_its_prefix_and_leaves_the_hosts_alone() -> None:
    app = _host_app()
    ResponsesProxy(app, url_prefix="/llm/v1", settings=ProxySettings(upstream_url=UPSTREAM))
    client = app.test_client()
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"}
    # No gunicorn socket to serve the mode on (the test client, the werkzeug server): a 426 saying so.
    answer = client.get("/llm/v1/responses", headers=upgrade)
    assert_error(answer, 426, code="websocket_unavailable")
    assert "gunicorn" in answer.get_json()["error"]["message"]
    assert_error(client.get("/llm/v1/models", headers=upgrade), 426, code="websocket_unavailable")
    assert client.get("/llm/nope").data == b"host 404 page"  # the host's own error pages stay its own
