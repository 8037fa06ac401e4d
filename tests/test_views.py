"""The proxy's HTTP surface, with the Flask test client in front and ``responses`` as the upstream."""

from __future__ import annotations

import gzip
import io
import json
import logging
import typing as t

import pytest
import requests
import responses
import urllib3
from flask import Flask
from werkzeug.test import TestResponse

from .envelope import assert_error

UPSTREAM = "http://upstream.test/v1"
UPSTREAM_KEY = "sk-UPSTREAM-CANARY-1234567890"
CLIENT_KEY = "sk-CLIENT-CANARY-0987654321"
CLIENT_AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
GATEWAY = {"upstream_api_key": UPSTREAM_KEY, "api_keys": CLIENT_KEY}

SSE = (
    b'event: response.created\ndata: {"type":"response.created","sequence_number":0,'
    b'"response":{"id":"resp_1","status":"in_progress"}}\n\n'
    b": keep-alive\n\n"
    b'event: response.output_text.delta\r\ndata: {"type":"response.output_text.delta","sequence_number":1,'
    b'"delta":"\xd0\xbf\xd1\x80\xe2\x80\xa8"}\r\n\r\n'
    b'event: response.completed\ndata: {"type":"response.completed","sequence_number":2,'
    b'"response":{"id":"resp_1","status":"completed"}}\n\n'
)

MakeApp = t.Callable[..., Flask]


def _all_header_values(request: requests.PreparedRequest) -> list[str]:
    return [f"{name}: {value}" for name, value in request.headers.items()]


# --- authentication and credentials ------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer sk-wrong"},
        {"Authorization": f"Basic {CLIENT_KEY}"},
        {"api-key": CLIENT_KEY},
    ],
    ids=["none", "wrong", "wrong_scheme", "api_key_header"],
)
def test_gateway_without_right_key_is_401_and_never_calls_upstream(
    make_app: MakeApp, mocked: responses.RequestsMock, headers: dict[str, str]
) -> None:
    mocked.add(responses.POST, f"{UPSTREAM}/responses", json={"id": "resp_1"})
    client = make_app(**GATEWAY).test_client()
    resp = client.post("/v1/responses", data=b'{"model":"m"}', headers=headers)
    assert_error(resp, 401, code="invalid_api_key")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert len(mocked.calls) == 0


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/responses/..%2Fmodels"),
        ("POST", "/v1/responses/bad.id/cancel"),
        ("GET", "/v1/responses/a?stream=1"),
    ],
)
def test_gateway_authenticates_before_validating_input(
    make_app: MakeApp, mocked: responses.RequestsMock, method: str, path: str
) -> None:
    resp = make_app(**GATEWAY).test_client().open(path, method=method)
    assert_error(resp, 401, code="invalid_api_key")
    assert len(mocked.calls) == 0


def test_gateway_right_key_sends_upstream_key_never_client_key(
    make_app: MakeApp, mocked: responses.RequestsMock
) -> None:
    mocked.add(responses.POST, f"{UPSTREAM}/responses", json={"id": "resp_1"})
    client = make_app(**GATEWAY, upstream_organization="org-gw").test_client()
    resp = client.post(
        "/v1/responses",
        data=b'{"model":"m"}',
        headers={
            **CLIENT_AUTH,
            "api-key": CLIENT_KEY,
            "OpenAI-Organization": "org-client",
            "Cookie": CLIENT_KEY,
        },
    )
    assert resp.status_code == 200
    assert resp.get_json() == {"id": "resp_1"}
    (call,) = mocked.calls
    assert call.request.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert call.request.headers["OpenAI-Organization"] == "org-gw"
    for line in _all_header_values(call.request):
        assert "CLIENT-CANARY" not in line and "org-client" not in line


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_gateway_upstream_rejecting_own_key_is_502_without_key_fragments(
    make_app: MakeApp, mocked: responses.RequestsMock, caplog: pytest.LogCaptureFixture, stream: bool
) -> None:
    echo = {
        "error": {
            "message": "Incorrect API key provided: sk-UP***7890. You can find your API key at"
            " https://platform.openai.com/account/api-keys.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    mocked.add(
        responses.POST, f"{UPSTREAM}/responses", json=echo, status=401, headers={"x-request-id": "req_1"}
    )
    client = make_app(**GATEWAY).test_client()
    with caplog.at_level(logging.DEBUG):
        resp = client.post(
            "/v1/responses", data=json.dumps({"model": "m", "stream": stream}), headers=CLIENT_AUTH
        )
    assert_error(resp, 502, code="upstream_credentials_rejected")
    assert len(mocked.calls) == 1
    # Every 4-character window of the key, except those of "UPSTREAM" that the message's own
    # WSGI_PROXY_UPSTREAM_API_KEY contains.
    windows = {UPSTREAM_KEY[i : i + 4] for i in range(len(UPSTREAM_KEY) - 3)}
    windows -= {w for w in windows if w in "WSGI_PROXY_UPSTREAM_API_KEY"}
    assert {"sk-U", "7890", "CANA"} <= windows
    leaked = resp.data.decode() + "\n".join(f"{k}: {v}" for k, v in resp.headers.items())
    for fragment in [UPSTREAM_KEY, "sk-UP", "***", *windows]:
        assert fragment not in leaked
    assert "CANARY" not in caplog.text and "7890" not in caplog.text


def test_pass_through_forwards_client_credentials(make_app: MakeApp, mocked: responses.RequestsMock) -> None:
    mocked.add(responses.GET, f"{UPSTREAM}/responses/resp_1", json={"id": "resp_1"})
    client = make_app().test_client()
    resp = client.get(
        "/v1/responses/resp_1",
        headers={"Authorization": "Bearer sk-own", "api-key": "azure-own", "OpenAI-Project": "proj_own"},
    )
    assert resp.status_code == 200
    headers = mocked.calls[0].request.headers
    assert headers["Authorization"] == "Bearer sk-own"
    assert headers["api-key"] == "azure-own"
    assert headers["OpenAI-Project"] == "proj_own"


def test_pass_through_upstream_401_relayed(make_app: MakeApp, mocked: responses.RequestsMock) -> None:
    body = (
        b'{"error":{"message":"Incorrect API key provided: sk-ow***","type":"invalid_request_error",'
        b'"param":null,"code":"invalid_api_key"}}'
    )
    mocked.add(responses.GET, f"{UPSTREAM}/models", body=body, status=401, content_type="application/json")
    resp = make_app().test_client().get("/v1/models", headers={"Authorization": "Bearer sk-own"})
    assert resp.status_code == 401
    assert resp.data == body


# --- relaying upstream answers -----------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 404, 409, 429, 500, 503])
def test_upstream_error_status_and_body_relayed(
    make_app: MakeApp, mocked: responses.RequestsMock, status: int
) -> None:
    body = b'{"error": {"message": "No response with id \\u2028 resp_1", "type": "x", "param": null, "code": null}}'
    mocked.add(
        responses.GET,
        f"{UPSTREAM}/responses/resp_1",
        body=body,
        status=status,
        content_type="application/json",
        headers={"x-request-id": "req_9", "retry-after": "3", "Set-Cookie": "track=1", "Server": "upstream"},
    )
    resp = make_app(retry_attempts=0).test_client().get("/v1/responses/resp_1")
    assert resp.status_code == status
    assert resp.data == body
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.headers["X-Upstream-Request-ID"] == "req_9"  # X-Request-ID is the gateway's own
    assert resp.headers["retry-after"] == "3"
    assert "Set-Cookie" not in resp.headers
    assert resp.headers.get("Server") != "upstream"


def test_upstream_success_headers_filtered(make_app: MakeApp, mocked: responses.RequestsMock) -> None:
    mocked.add(
        responses.GET,
        f"{UPSTREAM}/models",
        json={"data": []},
        headers={"openai-processing-ms": "12", "x-ratelimit-remaining-requests": "99", "Connection": "close"},
    )
    resp = make_app().test_client().get("/v1/models")
    assert resp.status_code == 200
    assert resp.headers["openai-processing-ms"] == "12"
    assert resp.headers["x-ratelimit-remaining-requests"] == "99"
    assert "Connection" not in resp.headers


def test_upstream_cookies_never_stored_or_replayed(make_app: MakeApp, mocked: responses.RequestsMock) -> None:
    mocked.add(responses.GET, f"{UPSTREAM}/models", json={}, headers={"Set-Cookie": "sid=tenant-a; Path=/"})
    client = make_app().test_client()
    client.get("/v1/models")
    client.get("/v1/models")
    assert len(mocked.calls) == 2
    assert "Cookie" not in mocked.calls[1].request.headers


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (requests.ConnectionError("refused"), 502, "upstream_unavailable"),
        (requests.ConnectTimeout("slow"), 504, "upstream_timeout"),
        (requests.ReadTimeout("silent"), 504, "upstream_timeout"),
        (requests.exceptions.SSLError("bad cert"), 502, "upstream_unavailable"),
        (requests.exceptions.ContentDecodingError("bad gzip"), 502, "upstream_protocol_error"),
    ],
    ids=["connection", "connect_timeout", "read_timeout", "ssl", "decoding"],
)
def test_transport_failure_before_answer_is_envelope(
    make_app: MakeApp, mocked: responses.RequestsMock, exc: Exception, status: int, code: str
) -> None:
    mocked.add(responses.POST, f"{UPSTREAM}/responses", body=exc)
    resp = make_app(retry_attempts=0).test_client().post("/v1/responses", data=b'{"model":"m"}')
    error = assert_error(resp, status, code=code)
    # The upstream's configured name, never its address: clients need not learn what is behind.
    assert "upstream 'default'" in error["message"] and "upstream.test" not in error["message"]


def test_raw_query_string_reaches_upstream_unchanged(
    make_app: MakeApp, mocked: responses.RequestsMock
) -> None:
    query = "include%5B%5D=a&include%5B%5D=b&include[]=c&x=%7e+%7E&starting_after=3&stream=false"
    mocked.add(responses.GET, f"{UPSTREAM}/responses/resp_1", json={"id": "resp_1"})
    resp = make_app().test_client().get(f"/v1/responses/resp_1?{query}")
    assert resp.status_code == 200
    assert mocked.calls[0].request.url == f"{UPSTREAM}/responses/resp_1?{query}"


def test_input_items_query_reaches_upstream_unchanged(
    make_app: MakeApp, mocked: responses.RequestsMock
) -> None:
    query = "limit=5&order=asc&after=item_1&include%5B%5D=message.input_image.image_url"
    mocked.add(responses.GET, f"{UPSTREAM}/responses/resp_1/input_items", json={"data": []})
    resp = make_app().test_client().get(f"/v1/responses/resp_1/input_items?{query}")
    assert resp.status_code == 200
    assert mocked.calls[0].request.url == f"{UPSTREAM}/responses/resp_1/input_items?{query}"


@pytest.mark.parametrize(
    ("method", "path", "upstream_method", "upstream_path"),
    [
        ("POST", "/v1/responses", "POST", "/responses"),
        ("POST", "/v1/responses/input_tokens", "POST", "/responses/input_tokens"),
        ("POST", "/v1/responses/compact", "POST", "/responses/compact"),
        ("POST", "/v1/responses/resp_1/cancel", "POST", "/responses/resp_1/cancel"),
    ],
)
def test_request_body_reaches_upstream_byte_identical(
    make_app: MakeApp,
    mocked: responses.RequestsMock,
    method: str,
    path: str,
    upstream_method: str,
    upstream_path: str,
) -> None:
    body = (
        b'{ "model" :"gpt-4o",\n\t"input":"caf\\u00e9 \\ud83d\\ude00 \xd0\xbf\xd1\x80\xd0\xb8",'
        b'  "zzz_unknown": [1, {"a":null, "b": 1.50}] ,"stream":false , "metadata":{}}'
    )
    mocked.add(upstream_method, f"{UPSTREAM}{upstream_path}", json={"ok": True})
    resp = make_app().test_client().open(path, method=method, data=body, content_type="application/json")
    assert resp.status_code == 200
    (call,) = mocked.calls
    assert call.request.body == body
    assert call.request.headers["Content-Type"] == "application/json"


def test_end_to_end_headers_pass_and_hop_by_hop_do_not(
    make_app: MakeApp, mocked: responses.RequestsMock
) -> None:
    mocked.add(responses.GET, f"{UPSTREAM}/models", json={})
    headers = {
        "OpenAI-Beta": "responses=v1",
        "X-Stainless-Lang": "python",
        "Idempotency-Key": "idem-1",
        "X-Forwarded-For": "10.0.0.1",
        "Connection": "X-Secret-Hop",
        "X-Secret-Hop": "1",
        "Accept-Encoding": "br",
    }
    make_app().test_client().get("/v1/models", headers=headers)
    sent = mocked.calls[0].request.headers
    assert sent["OpenAI-Beta"] == "responses=v1"
    assert sent["X-Stainless-Lang"] == "python"
    assert sent["Idempotency-Key"] == "idem-1"
    assert "X-Forwarded-For" not in sent
    assert "X-Secret-Hop" not in sent
    assert sent["Accept-Encoding"] != "br"


def test_delete_forwarded(make_app: MakeApp, mocked: responses.RequestsMock) -> None:
    mocked.add(responses.DELETE, f"{UPSTREAM}/responses/resp_1", json={"id": "resp_1", "deleted": True})
    resp = make_app().test_client().delete("/v1/responses/resp_1")
    assert resp.status_code == 200
    assert mocked.calls[0].request.method == "DELETE"


# --- rejected before the upstream --------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "param"),
    [
        ("GET", "/v1/responses/..%2Fmodels", None, "response_id"),
        ("GET", "/v1/responses/resp_1%2F..%2F..%2Fmodels", None, "response_id"),
        ("GET", "/v1/responses/a%0D%0AX-Injected:%201", None, "response_id"),
        ("GET", "/v1/responses/resp%3F1", None, "response_id"),
        ("GET", "/v1/responses/resp%231", None, "response_id"),
        ("GET", "/v1/responses/resp_1/", None, "response_id"),
        ("GET", "/v1/responses/" + "x" * 129, None, "response_id"),
        ("GET", "/v1/responses/r%C3%A9sp_1", None, "response_id"),
        ("DELETE", "/v1/responses/a.b", None, "response_id"),
        ("POST", "/v1/responses/..%2Fx/cancel", b"{}", "response_id"),
        ("GET", "/v1/responses/a%2Fb/input_items", None, "response_id"),
        ("GET", "/v1/responses/resp_1?stream=1", None, "stream"),
        ("GET", "/v1/responses/resp_1?stream=True", None, "stream"),
        ("GET", "/v1/responses/resp_1?stream=true&stream=true", None, "stream"),
        ("GET", "/v1/responses/resp_1?stream=true&starting_after=-1", None, "starting_after"),
        ("GET", "/v1/responses/resp_1?starting_after=1.5", None, "starting_after"),
        ("GET", "/v1/responses/resp_1?starting_after=" + "1" * 20, None, "starting_after"),
        ("POST", "/v1/responses", b"not json", None),
        ("POST", "/v1/responses", b"", None),
        ("POST", "/v1/responses", b"[]", None),
        ("POST", "/v1/responses", b'{"model": 5}', "model"),
        ("POST", "/v1/responses", b'{"model": "m", "stream": "true"}', "stream"),
        ("POST", "/v1/responses", b'{"background": 1}', "background"),
        ("POST", "/v1/responses", b'{"store": "no"}', "store"),
        ("POST", "/v1/responses", b'{"previous_response_id": "../x"}', "previous_response_id"),
        ("POST", "/v1/responses/input_tokens", b"[1]", None),
        ("POST", "/v1/responses/input_tokens", b'"text"', None),
        ("POST", "/v1/responses/compact", b"{", None),
    ],
)
def test_bad_input_is_400_naming_param_without_upstream_call(
    make_app: MakeApp,
    mocked: responses.RequestsMock,
    method: str,
    path: str,
    body: bytes | None,
    param: str | None,
) -> None:
    mocked.add(responses.GET, f"{UPSTREAM}/models", json={})  # the target of a traversal
    client = make_app(**GATEWAY).test_client()
    resp = client.open(path, method=method, data=body, headers=CLIENT_AUTH)
    error = assert_error(resp, 400, param=param)
    assert error["type"] == "invalid_request_error"
    assert "\r" not in error["message"] and "\n" not in error["message"]
    assert len(mocked.calls) == 0


def test_request_body_over_limit_is_413(make_app: MakeApp, mocked: responses.RequestsMock) -> None:
    mocked.add(responses.POST, f"{UPSTREAM}/responses", json={})
    client = make_app(max_request_bytes=1024).test_client()
    ok = client.post("/v1/responses", data=b'{"input":"' + b"x" * 1000 + b'"}')
    assert ok.status_code == 200
    resp = client.post("/v1/responses", data=b'{"input":"' + b"x" * 1013 + b'"}')  # 1025 bytes
    assert_error(resp, 413, code="request_too_large")
    assert len(mocked.calls) == 1


@pytest.mark.parametrize(("size", "status"), [(1000, 200), (1013, 413), (100_000, 413)])
def test_chunked_request_body_without_length_is_limited(
    make_app: MakeApp, mocked: responses.RequestsMock, size: int, status: int
) -> None:
    # No Content-Length: only the bounded read can notice (gunicorn sets wsgi.input_terminated).
    mocked.add(responses.POST, f"{UPSTREAM}/responses", json={})
    body = b'{"input":"' + b"x" * size + b'"}'
    resp = (
        make_app(max_request_bytes=1024)
        .test_client()
        .post(
            "/v1/responses",
            input_stream=io.BytesIO(body),
            headers={"Transfer-Encoding": "chunked"},
            environ_overrides={"wsgi.input_terminated": True},
        )
    )
    if status == 413:
        assert_error(resp, 413, code="request_too_large")
        assert len(mocked.calls) == 0
    else:
        assert resp.status_code == 200
        assert mocked.calls[0].request.body == body


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v1/responses", "POST"),
        ("DELETE", "/v1/responses", "POST"),
        ("PUT", "/v1/responses/resp_1", "DELETE, GET"),
        ("POST", "/v1/responses/resp_1", "DELETE, GET"),
        ("GET", "/v1/responses/resp_1/cancel", "POST"),
        ("POST", "/v1/responses/resp_1/input_items", "GET"),
        ("GET", "/v1/responses/input_tokens", "POST"),
        ("PATCH", "/v1/models", "GET"),
    ],
)
def test_wrong_method_is_405_envelope_with_allow(
    make_app: MakeApp, mocked: responses.RequestsMock, method: str, path: str, allow: str
) -> None:
    resp = make_app().test_client().open(path, method=method, data=b"{}")
    assert_error(resp, 405, code="method_not_allowed")
    assert resp.headers["Allow"] == allow
    assert len(mocked.calls) == 0


@pytest.mark.parametrize(
    "path", ["/v1", "/v1/", "/v1/nope", "/v1/chat/completions/x", "/v1/models/gpt-4o/x", "/v1/a%0Ab"]
)
def test_unknown_path_under_prefix_is_404_envelope(
    make_app: MakeApp, mocked: responses.RequestsMock, path: str
) -> None:
    resp = make_app().test_client().post(path, data=b"{}")
    assert_error(resp, 404, code="unknown_url")
    assert len(mocked.calls) == 0


@pytest.mark.parametrize("path", ["/", "/healthz"])
def test_health_probes_answer_without_upstream(
    make_app: MakeApp, mocked: responses.RequestsMock, path: str
) -> None:
    resp = make_app(**GATEWAY).test_client().get(path)
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "ok"}
    assert len(mocked.calls) == 0


# --- streaming ---------------------------------------------------------------------------------


def _stream_create(make_app: MakeApp, **settings: t.Any) -> TestResponse:
    client = make_app(**settings).test_client()
    return client.post("/v1/responses", data=b'{"model":"m","stream":true}', content_type="application/json")


def test_stream_create_relays_bytes_with_sse_headers(
    make_app: MakeApp, mocked: responses.RequestsMock
) -> None:
    mocked.add(
        responses.POST,
        f"{UPSTREAM}/responses",
        body=SSE,
        content_type="text/event-stream; charset=utf-8",
        headers={"x-request-id": "req_s", "Content-Encoding": "identity", "Set-Cookie": "a=1"},
    )
    resp = _stream_create(make_app)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Accel-Buffering"] == "no"
    assert resp.headers["X-Upstream-Request-ID"] == "req_s"
    for name in ("Content-Length", "Content-Encoding", "Transfer-Encoding", "Set-Cookie"):
        assert name not in resp.headers
    assert resp.data == SSE
    assert mocked.calls[0].request.headers["Accept-Encoding"] == "identity"


def test_stream_retrieve_relays_bytes(make_app: MakeApp, mocked: responses.RequestsMock) -> None:
    mocked.add(responses.GET, f"{UPSTREAM}/responses/resp_1", body=SSE, content_type="text/event-stream")
    resp = make_app().test_client().get("/v1/responses/resp_1?stream=true&starting_after=0")
    assert resp.status_code == 200
    assert resp.data == SSE
    assert mocked.calls[0].request.url == f"{UPSTREAM}/responses/resp_1?stream=true&starting_after=0"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_compressed_upstream_body_is_decoded(
    make_app: MakeApp, mocked: responses.RequestsMock, stream: bool
) -> None:
    # The proxy never copies Content-Encoding, so it must never pass compressed bytes on.
    body = SSE if stream else b'{"id": "resp_1", "output_text": "\\u00e9"}'
    mocked.add(
        responses.POST,
        f"{UPSTREAM}/responses",
        body=gzip.compress(body),
        content_type="text/event-stream" if stream else "application/json",
        headers={"Content-Encoding": "gzip"},
    )
    resp = make_app().test_client().post("/v1/responses", data=json.dumps({"stream": stream}))
    assert resp.status_code == 200
    assert resp.data == body
    assert "Content-Encoding" not in resp.headers


def test_stream_request_answered_with_json_is_502(make_app: MakeApp, mocked: responses.RequestsMock) -> None:
    mocked.add(responses.POST, f"{UPSTREAM}/responses", json={"id": "resp_1", "object": "response"})
    assert_error(_stream_create(make_app), 502, code="upstream_protocol_error")


def test_stream_request_answered_with_error_is_relayed(
    make_app: MakeApp, mocked: responses.RequestsMock
) -> None:
    body = b'{"error":{"message":"bad model","type":"invalid_request_error","param":"model","code":null}}'
    mocked.add(
        responses.POST, f"{UPSTREAM}/responses", body=body, status=400, content_type="application/json"
    )
    resp = _stream_create(make_app)
    assert resp.status_code == 400
    assert resp.data == body


# --- upstream kinds --------------------------------------------------------------------------------


def test_azure_upstream_gets_api_key_header_and_never_a_bearer(
    make_app: MakeApp, mocked: responses.RequestsMock
) -> None:
    mocked.add(responses.POST, f"{UPSTREAM}/responses", json={"id": "resp_1"})
    app = make_app(upstream_kind="azure", **GATEWAY)
    resp = app.test_client().post(
        "/v1/responses", data=b'{"model":"m"}', headers={"Authorization": f"Bearer {CLIENT_KEY}"}
    )
    assert resp.status_code == 200
    sent = mocked.calls[0].request.headers
    assert sent["api-key"] == UPSTREAM_KEY
    assert "Authorization" not in sent


def test_azure_legacy_api_version_is_merged_into_every_query(
    make_app: MakeApp, mocked: responses.RequestsMock
) -> None:
    mocked.add(responses.GET, f"{UPSTREAM}/responses/resp_1", json={"id": "resp_1"})
    mocked.add(responses.DELETE, f"{UPSTREAM}/responses/resp_1", json={"deleted": True})
    app = make_app(upstream_kind="azure", upstream_api_version="2025-04-01-preview", **GATEWAY)
    client = app.test_client()
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
    client.get("/v1/responses/resp_1?api-version=1999-01-01&include%5B%5D=a&starting_after=3", headers=auth)
    client.delete("/v1/responses/resp_1", headers=auth)
    urls = [call.request.url for call in mocked.calls]
    assert urls == [
        f"{UPSTREAM}/responses/resp_1?api-version=2025-04-01-preview&include%5B%5D=a&starting_after=3",
        f"{UPSTREAM}/responses/resp_1?api-version=2025-04-01-preview",
    ]


def test_upstream_headers_setting_is_sent_and_client_headers_win(
    make_app: MakeApp, mocked: responses.RequestsMock
) -> None:
    mocked.add(responses.GET, f"{UPSTREAM}/models", json={"data": []})
    app = make_app(upstream_headers={"X-Vendor": "v1", "OpenAI-Beta": "operator"}, **GATEWAY)
    app.test_client().get(
        "/v1/models", headers={"Authorization": f"Bearer {CLIENT_KEY}", "OpenAI-Beta": "client"}
    )
    sent = mocked.calls[0].request.headers
    assert (sent["X-Vendor"], sent["OpenAI-Beta"]) == ("v1", "client")


# --- retries -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_idempotent_call_is_retried_and_reports_attempts(
    make_app: MakeApp, mocked: responses.RequestsMock, status: int
) -> None:
    mocked.add(responses.GET, f"{UPSTREAM}/responses/resp_1", status=status, headers={"retry-after-ms": "10"})
    mocked.add(responses.GET, f"{UPSTREAM}/responses/resp_1", json={"id": "resp_1"})
    resp = make_app().test_client().get("/v1/responses/resp_1")
    assert resp.status_code == 200
    assert resp.headers["X-Upstream-Attempts"] == "2"
    assert len(mocked.calls) == 2


def test_create_answered_500_is_not_sent_again(make_app: MakeApp, mocked: responses.RequestsMock) -> None:
    mocked.add(responses.POST, f"{UPSTREAM}/responses", status=503, json={"error": {"message": "busy"}})
    resp = make_app().test_client().post("/v1/responses", data=b'{"model":"m"}')
    assert resp.status_code == 503
    assert resp.headers["X-Upstream-Attempts"] == "1"
    assert len(mocked.calls) == 1


def test_create_dropped_after_sending_is_not_sent_again(
    make_app: MakeApp, mocked: responses.RequestsMock
) -> None:
    # The connection broke after the request went out: it may have been received, so no retry.
    mocked.add(
        responses.POST, f"{UPSTREAM}/responses", body=requests.ConnectionError("Connection reset by peer")
    )
    resp = make_app().test_client().post("/v1/responses", data=b'{"model":"m"}')
    assert_error(resp, 502, code="upstream_unavailable")
    assert len(mocked.calls) == 1


def test_create_is_retried_when_no_connection_could_be_made(
    make_app: MakeApp, mocked: responses.RequestsMock
) -> None:
    refused = urllib3.exceptions.NewConnectionError(None, "Connection refused")  # type: ignore[arg-type]
    never_sent = requests.ConnectionError(
        urllib3.exceptions.MaxRetryError(None, "/responses", reason=refused)  # type: ignore[arg-type]
    )
    mocked.add(responses.POST, f"{UPSTREAM}/responses", body=never_sent)
    mocked.add(responses.POST, f"{UPSTREAM}/responses", json={"id": "resp_1"})
    resp = make_app(retry_max_wait=0.01).test_client().post("/v1/responses", data=b'{"model":"m"}')
    assert resp.status_code == 200
    assert resp.headers["X-Upstream-Attempts"] == "2"


# --- hostile upstreams: what one answer may cost ----------------------------------------------------


def test_an_upstream_answer_larger_than_the_limit_is_a_502(
    make_app: MakeApp, mocked: responses.RequestsMock
) -> None:
    big = b'{"id":"resp_1","pad":"' + b"a" * (2 * 1024 * 1024) + b'"}'
    mocked.add(responses.GET, f"{UPSTREAM}/responses/resp_1", body=big, content_type="application/json")
    app = make_app(**GATEWAY, max_answer_bytes=1024 * 1024)
    resp = app.test_client().get("/v1/responses/resp_1", headers=CLIENT_AUTH)
    error = assert_error(resp, 502, code="upstream_protocol_error")
    assert "WSGI_PROXY_MAX_ANSWER_BYTES" in error["message"] and UPSTREAM not in error["message"]


def test_a_gzip_bomb_costs_no_more_than_the_limit(make_app: MakeApp, mocked: responses.RequestsMock) -> None:
    import tracemalloc

    bomb = gzip.compress(b"0" * (100 * 1024 * 1024), compresslevel=9)  # ~100 KB that inflate to 100 MiB
    assert len(bomb) < 1024 * 1024
    mocked.add(
        responses.GET,
        f"{UPSTREAM}/responses/resp_1",
        body=bomb,
        headers={"Content-Encoding": "gzip"},
        content_type="application/json",
    )
    app = make_app(**GATEWAY, max_answer_bytes=1024 * 1024)
    tracemalloc.start()
    try:
        resp = app.test_client().get("/v1/responses/resp_1", headers=CLIENT_AUTH)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_error(resp, 502, code="upstream_protocol_error")
    assert peak < 8 * 1024 * 1024, peak  # the limit and some buffers, not the 100 MiB


def test_a_large_error_body_answering_a_stream_is_a_502_not_a_truncated_body(
    make_app: MakeApp, mocked: responses.RequestsMock
) -> None:
    big = json.dumps({"error": {"message": "x" * (2 * 1024 * 1024)}}).encode()
    mocked.add(responses.POST, f"{UPSTREAM}/responses", status=500, body=big, content_type="application/json")
    resp = _stream_create(make_app)
    assert_error(resp, 502, code="upstream_protocol_error")


def test_deeply_nested_upstream_json_is_relayed_not_a_500(
    make_app: MakeApp, mocked: responses.RequestsMock
) -> None:
    nested = b'{"id":"resp_1","usage":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    mocked.add(responses.POST, f"{UPSTREAM}/responses", body=nested, content_type="application/json")
    resp = make_app(**GATEWAY).test_client().post("/v1/responses", data=b'{"model":"m"}', headers=CLIENT_AUTH)
    assert resp.status_code == 200 and resp.data == nested


# --- the gateway's key is never relayed, whatever the upstream echoes ---------------------------------------


def test_an_upstream_echoing_the_gateways_key_is_scrubbed_from_bodies_and_headers(
    make_app: MakeApp, mocked: responses.RequestsMock
) -> None:
    echo = {"error": {"message": f"Key {UPSTREAM_KEY} is over its quota.", "type": "insufficient_quota"}}
    mocked.add(
        responses.GET,
        f"{UPSTREAM}/responses/resp_1",
        status=429,
        json=echo,
        headers={"openai-debug": f"key={UPSTREAM_KEY}"},
    )
    resp = (
        make_app(**GATEWAY, retry_attempts=0).test_client().get("/v1/responses/resp_1", headers=CLIENT_AUTH)
    )
    assert resp.status_code == 429
    assert UPSTREAM_KEY not in resp.get_data(as_text=True) and "<redacted>" in resp.get_data(as_text=True)
    assert all(UPSTREAM_KEY not in value for value in resp.headers.values())
    assert resp.headers["openai-debug"] == "key=<redacted>"


def test_an_upstream_echoing_the_gateways_key_in_an_event_is_scrubbed(
    make_app: MakeApp, mocked: responses.RequestsMock
) -> None:
    echoed = SSE.replace(
        b'"status":"in_progress"', b'"status":"in_progress","note":"' + UPSTREAM_KEY.encode() + b'"'
    )
    mocked.add(responses.POST, f"{UPSTREAM}/responses", body=echoed, content_type="text/event-stream")
    client = make_app(**GATEWAY).test_client()
    resp = client.post("/v1/responses", data=b'{"model":"m","stream":true}', headers=CLIENT_AUTH)
    assert resp.status_code == 200
    assert UPSTREAM_KEY.encode() not in resp.data and b'"note":"<redacted>"' in resp.data
