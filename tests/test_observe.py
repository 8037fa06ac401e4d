"""Request ids and the one JSON line per request."""

from __future__ import annotations

import json
import logging
import typing as t

import pytest
import requests
import responses
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from wsgi_proxy.observe.record import ACCESS_LOGGER, RequestRecord, request_id_from
from wsgi_proxy.observe.tracing import tracing_from_env

from .envelope import assert_error

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
    from wsgi_proxy.web.hooks import EXTENSION_KEY

    config = tmp_path / "gw.toml"
    config.write_text('allow_anonymous = true\n[[upstreams]]\nname = "u"\nurl = "http://u.test/v1"\n')
    app = create_app(ProxySettings(config=config, store_url=f"sqlite:///{tmp_path / 's.db'}"))
    client = app.test_client()
    assert client.get("/livez").json == {"status": "ok"}
    assert client.get("/readyz").json == {"status": "ready"}
    app.extensions[EXTENSION_KEY].state.store.close()  # a store that no longer answers
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
    for without_bearer in ("scrape-secret", "Basic scrape-secret", "Token scrape-secret"):
        assert client.get("/metrics", headers={"Authorization": without_bearer}).status_code == 401
    mocked.add(responses.GET, f"{UPSTREAM}/responses/resp_9", json={"id": "resp_9"})
    client.get("/v1/responses/resp_9", headers=AUTH)
    client.get("/v1/responses/resp_9", headers={"Authorization": "Bearer nope"})
    text = client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"}).get_data(as_text=True)
    assert (
        'wsgi_proxy_requests_total{method="GET",route="retrieve",status="200",upstream="default"} 1.0' in text
    )
    assert 'wsgi_proxy_requests_total{method="GET",route="response",status="401",upstream="none"} 1.0' in text


# --- the attempts every answer reports --------------------------------------------------------------


def test_a_proxy_made_error_after_failed_retries_reports_every_attempt(
    make_app: t.Callable[..., Flask], mocked: responses.RequestsMock, lines: list[dict[str, t.Any]]
) -> None:
    for _ in range(3):
        mocked.add(responses.GET, f"{UPSTREAM}/responses/resp_9", body=requests.ConnectionError("reset"))
    app = make_app(**GATEWAY, retry_attempts=2, retry_max_wait=0)
    answer = app.test_client().get("/v1/responses/resp_9", headers=AUTH)
    assert_error(answer, 502, code="upstream_unavailable")
    assert answer.headers["X-Upstream-Attempts"] == "3"
    assert len(mocked.calls) == 3
    (line,) = lines
    assert (line["status"], line["attempts"], line["error"]) == (502, 3, "upstream_unavailable")


def test_an_answer_that_never_went_upstream_reports_zero_attempts(
    make_app: t.Callable[..., Flask], mocked: responses.RequestsMock, lines: list[dict[str, t.Any]]
) -> None:
    answer = make_app(**GATEWAY).test_client().get("/v1/responses/resp_9")
    assert_error(answer, 401, code="invalid_api_key")
    assert answer.headers["X-Upstream-Attempts"] == "0"
    (line,) = lines
    assert line["attempts"] == 0


# --- the label values the proxy really emits ----------------------------------------------------------

#: Every ``kind`` of wsgi_proxy_upstream_errors_total, as the metrics docstring and README name them.
UPSTREAM_ERROR_KINDS = {
    "upstream_timeout",
    "upstream_unavailable",
    "upstream_protocol_error",
    "upstream_credentials_rejected",
    "stream_aborted",
}


def _labels(app: Flask, metric: str, label: str) -> set[str]:
    from wsgi_proxy.web.hooks import EXTENSION_KEY

    text, _ = app.extensions[EXTENSION_KEY].state.metrics.render()
    return {
        sample.labels[label]
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
        if sample.name == metric
    }


def test_metric_label_values_are_the_ones_documented(
    make_app: t.Callable[..., Flask], mocked: responses.RequestsMock
) -> None:
    app = make_app(**GATEWAY, retry_attempts=0, resume_attempts=0)
    client = app.test_client()
    base = f"{UPSTREAM}/responses"
    mocked.add(responses.GET, f"{base}/resp_t", body=requests.ReadTimeout("slow"))
    mocked.add(responses.GET, f"{base}/resp_u", body=requests.ConnectionError("down"))
    mocked.add(responses.GET, f"{base}/resp_p", json={"id": "resp_p"})  # JSON to a stream request
    mocked.add(responses.GET, f"{base}/resp_c", status=401, json={"error": {"message": "sk-...abcd"}})
    cut = b'data: {"type":"response.created","sequence_number":0}\n\ndata: {"ty'
    mocked.add(responses.GET, f"{base}/resp_a", body=cut, content_type="text/event-stream")
    for rid, query in [("resp_t", ""), ("resp_u", ""), ("resp_p", "?stream=true"), ("resp_c", "")]:
        assert client.get(f"/v1/responses/{rid}{query}", headers=AUTH).status_code in (502, 504)
    aborted = client.get("/v1/responses/resp_a?stream=true", headers=AUTH)
    with pytest.raises(ConnectionResetError):
        aborted.get_data()
    assert _labels(app, "wsgi_proxy_upstream_errors_total", "kind") == UPSTREAM_ERROR_KINDS
    assert _labels(app, "wsgi_proxy_requests_total", "route") == {"retrieve"}
    assert _labels(app, "wsgi_proxy_requests_total", "upstream") == {"default"}


def test_readiness_is_lost_when_the_store_directory_is_deleted(tmp_path: t.Any) -> None:
    import shutil

    from wsgi_proxy import ProxySettings, create_app

    directory = tmp_path / "state"
    directory.mkdir()
    config = tmp_path / "gw.toml"
    config.write_text('allow_anonymous = true\n[[upstreams]]\nname = "u"\nurl = "http://u.test/v1"\n')
    app = create_app(ProxySettings(config=config, store_url=f"sqlite:///{directory / 's.db'}"))
    client = app.test_client()
    assert client.get("/readyz").status_code == 200
    shutil.rmtree(directory)
    answer = client.get("/readyz")
    assert answer.status_code == 503 and answer.json == {"status": "unavailable", "store": "unreachable"}


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "false"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_SERVICE_NAME": "gw"}, False),  # a name alone exports nowhere
    ],
)
def test_traces_are_on_only_when_the_standard_variables_ask(environ: dict[str, str], on: bool) -> None:
    assert (tracing_from_env(environ) is not None) is on


def test_a_record_without_a_trace_touches_no_opentelemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # any import of it would now fail
    record = RequestRecord("req_1", "POST", "create")
    record.attempt("default")
    record.answered("req_up")
    record.reopened(3, 0.0, "resumed")
    record.sent(200)
    assert record.trace is None and record.attempts == 1
