"""Request ids and the one JSON line per request."""

from __future__ import annotations

import json
import logging
import typing as t

import pytest
import responses
from flask import Flask

from wsgi_proxy.observe import ACCESS_LOGGER, request_id_from, usage_of

UPSTREAM = "http://upstream.test/v1"
UPSTREAM_KEY = "sk-upstream-observe-canary"
CLIENT_KEY = "sk-client-observe-canary"
GATEWAY = {"upstream_api_key": UPSTREAM_KEY, "api_keys": CLIENT_KEY}
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, t.Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


@pytest.fixture
def lines() -> t.Iterator[list[dict[str, t.Any]]]:
    handler = Lines()
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


@pytest.mark.parametrize(
    ("header", "kept"),
    [
        ("abc-123", True),
        ("req_0A:b/c+d=e.f", True),
        ("", False),
        (None, False),
        ("a b", False),
        ("x" * 129, False),
    ],
)
def test_request_id_from_header(header: str | None, kept: bool) -> None:
    rid = request_id_from(header)
    assert (rid == header) is kept
    assert rid.startswith("req_") or kept


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            {"usage": {"input_tokens": 3, "output_tokens": 5, "total_tokens": 8}},
            {"input_tokens": 3, "output_tokens": 5, "total_tokens": 8},
        ),
        ({"usage": {"input_tokens": 3}}, None),
        ({"usage": None}, None),
        ({}, None),
    ],
)
def test_usage_of(payload: dict[str, t.Any], expected: dict[str, int] | None) -> None:
    assert usage_of(payload) == expected


def test_request_id_is_kept_returned_and_sent_upstream(
    make_app: t.Callable[..., Flask], mocked: responses.RequestsMock, lines: list[dict[str, t.Any]]
) -> None:
    mocked.add(
        responses.GET,
        f"{UPSTREAM}/responses/resp_1",
        json={"id": "resp_1"},
        headers={"x-request-id": "req_up"},
    )
    resp = (
        make_app(**GATEWAY)
        .test_client()
        .get("/v1/responses/resp_1", headers={**AUTH, "X-Request-ID": "trace-42"})
    )
    assert resp.headers["X-Request-ID"] == "trace-42"
    assert resp.headers["X-Upstream-Request-ID"] == "req_up"
    assert mocked.calls[0].request.headers["X-Request-ID"] == "trace-42"
    (line,) = lines
    assert line["request_id"] == "trace-42" and line["upstream_request_id"] == "req_up"
    assert (line["route"], line["status"], line["key"], line["team"], line["attempts"]) == (
        "retrieve",
        200,
        "key-1",
        "default",
        1,
    )


def test_json_line_for_a_create_has_model_usage_and_no_secret(
    make_app: t.Callable[..., Flask], mocked: responses.RequestsMock, lines: list[dict[str, t.Any]]
) -> None:
    usage = {"input_tokens": 7, "output_tokens": 11, "total_tokens": 18}
    mocked.add(
        responses.POST, f"{UPSTREAM}/responses", json={"id": "resp_2", "object": "response", "usage": usage}
    )
    make_app(**GATEWAY).test_client().post("/v1/responses", data=b'{"model":"gpt-4o-mini"}', headers=AUTH)
    (line,) = lines
    assert (line["route"], line["model"], line["usage"]) == ("create", "gpt-4o-mini", usage)
    assert UPSTREAM_KEY not in json.dumps(line) and CLIENT_KEY not in json.dumps(line)


def test_rejected_request_is_logged_with_its_error(
    make_app: t.Callable[..., Flask], mocked: responses.RequestsMock, lines: list[dict[str, t.Any]]
) -> None:
    make_app(**GATEWAY).test_client().post(
        "/v1/responses", data=b"{}", headers={"Authorization": "Bearer nope"}
    )
    (line,) = lines
    assert (line["status"], line["error"], line["key"]) == (401, "invalid_api_key", None)


def test_stream_is_logged_when_it_ends_with_events_and_usage(
    make_app: t.Callable[..., Flask], mocked: responses.RequestsMock, lines: list[dict[str, t.Any]]
) -> None:
    sse = (
        b'data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_3"}}\n\n'
        b'data: {"type":"response.completed","sequence_number":1,"response":{"id":"resp_3",'
        b'"usage":{"input_tokens":1,"output_tokens":2,"total_tokens":3}}}\n\n'
    )
    mocked.add(responses.POST, f"{UPSTREAM}/responses", body=sse, content_type="text/event-stream")
    resp = (
        make_app(**GATEWAY)
        .test_client()
        .post("/v1/responses", data=b'{"model":"m","stream":true}', headers=AUTH, buffered=False)
    )
    assert lines == []  # not before the stream has ended
    assert b"".join(resp.response) == sse  # type: ignore[arg-type]
    resp.close()
    (line,) = lines
    assert (line["events"], line["bytes"], line["resumes"]) == (2, len(sse), 0)
    assert line["usage"] == {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}
    assert line["ttfe_ms"] is not None


def test_readiness_follows_the_store(tmp_path: t.Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsgi_proxy import ProxySettings, create_app
    from wsgi_proxy.state import EXTENSION_KEY

    config = tmp_path / "gw.toml"
    config.write_text('allow_anonymous = true\n[[upstreams]]\nname = "u"\nurl = "http://u.test/v1"\n')
    app = create_app(ProxySettings(config=config, store_url=f"sqlite:///{tmp_path / 's.db'}"))
    client = app.test_client()
    assert client.get("/livez").json == {"status": "ok"}
    assert client.get("/readyz").json == {"status": "ready"}
    app.extensions[EXTENSION_KEY].store.close()  # a store that no longer answers
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json == {"status": "unavailable", "store": "unreachable"}


def test_metrics_endpoint_is_off_without_a_token_and_protected_with_one(
    make_app: t.Callable[..., Flask], mocked: responses.RequestsMock
) -> None:
    assert make_app(**GATEWAY).test_client().get("/metrics").status_code == 404
    app = make_app(metrics_token="scrape-secret", **GATEWAY)
    client = app.test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    mocked.add(responses.GET, f"{UPSTREAM}/responses/resp_9", json={"id": "resp_9"})
    client.get("/v1/responses/resp_9", headers=AUTH)
    client.get("/v1/responses/resp_9", headers={"Authorization": "Bearer nope"})
    text = client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"}).get_data(as_text=True)
    assert (
        'wsgi_proxy_requests_total{method="GET",route="retrieve",status="200",upstream="default"} 1.0' in text
    )
    assert 'wsgi_proxy_requests_total{method="GET",route="response",status="401",upstream="none"} 1.0' in text
