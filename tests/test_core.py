"""The gateway core without Flask: targets and failover, retries, the upstream-key policy, relay assembly."""

from __future__ import annotations

import typing as t
from pathlib import Path

import flask
import pytest
import requests
import responses

from wsgi_proxy.config import ProxySettings
from wsgi_proxy.errors import UpstreamCredentialsRejected, UpstreamUnavailable
from wsgi_proxy.gateway.call import Call, ResumePlan
from wsgi_proxy.gateway.core import Gateway
from wsgi_proxy.observe.record import RequestRecord
from wsgi_proxy.wire.relay import StreamEnd, StreamRelay

ONE = "http://one.test/v1"
TWO = "http://two.test/v1"
AUTH = "Bearer sk-core-client-0000"
SSE = (
    b'data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_s1"}}\n\n'
    b'data: {"type":"response.completed","sequence_number":1,"response":{"id":"resp_s1","model":"m",'
    b'"usage":{"input_tokens":1,"output_tokens":2,"total_tokens":3}}}\n\n'
)


def _single(**settings: t.Any) -> Gateway:
    values = {"upstream_url": ONE, "upstream_api_key": "sk-core-up", "api_keys": "sk-core-client-0000"}
    return Gateway.build(ProxySettings.model_validate(values | settings))


def _routed(tmp_path: Path) -> Gateway:
    config = tmp_path / "gw.toml"
    config.write_text(
        f'allow_anonymous = true\n[[upstreams]]\nname = "one"\nurl = "{ONE}"\n'
        f'[[upstreams]]\nname = "two"\nurl = "{TWO}"\n'
        '[[models]]\nname = "m"\nroutes = [{ upstream = "one", weight = 1000000 },'
        ' { upstream = "two", weight = 0.000001, deployment = "m-two" }]\n'
    )
    return Gateway.build(ProxySettings(config=config, store_url=f"sqlite:///{tmp_path / 's.db'}"))


def _exchange(gateway: Gateway, call: Call) -> tuple[t.Any, RequestRecord]:
    record = RequestRecord("req_core", call.method, "test")
    tenant = gateway.authenticate(AUTH, record)
    return gateway.forward(call, tenant, record), record


@pytest.fixture
def mocked() -> t.Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def test_the_core_forwards_a_call_without_any_flask_context(mocked: responses.RequestsMock) -> None:
    mocked.add(
        responses.GET, f"{ONE}/responses/resp_1", json={"id": "resp_1"}, headers={"x-request-id": "up_1"}
    )
    answer, record = _exchange(
        _single(), Call("GET", "/responses/resp_1", idempotent=True, owner_id="resp_1")
    )
    assert not flask.has_app_context()
    assert (answer.status, answer.body, answer.streams) == (200, b'{"id": "resp_1"}', False)
    assert (record.attempts, record.upstream, record.upstream_request_id) == (1, "default", "up_1")
    sent = mocked.calls[0].request
    assert sent.headers["Authorization"] == "Bearer sk-core-up" and sent.headers["X-Request-ID"] == "req_core"


@pytest.mark.parametrize("stream", [False, True])
def test_the_upstream_rejecting_the_gateways_key_is_the_operators_502(
    mocked: responses.RequestsMock, stream: bool
) -> None:
    mocked.add(responses.POST, f"{ONE}/responses", status=401, json={"error": {"message": "sk-...-up"}})
    with pytest.raises(UpstreamCredentialsRejected) as info:
        _exchange(_single(), Call("POST", "/responses", body=b"{}", stream=stream, routed=True))
    assert "sk-" not in info.value.message and info.value.status == 502


def test_a_pass_through_upstreams_401_is_the_clients(mocked: responses.RequestsMock) -> None:
    mocked.add(responses.POST, f"{ONE}/responses", status=401, json={"error": {"message": "bad key"}})
    gateway = Gateway.build(ProxySettings(upstream_url=ONE))
    record = RequestRecord("req_core", "POST", "create")
    tenant = gateway.authenticate(None, record)
    call = Call("POST", "/responses", headers=(("Authorization", "Bearer sk-own"),), body=b"{}", routed=True)
    assert gateway.forward(call, tenant, record).status == 401
    assert mocked.calls[0].request.headers["Authorization"] == "Bearer sk-own"


@pytest.mark.parametrize("path", ["/responses", "/responses/input_tokens", "/responses/compact"])
def test_routed_calls_fail_over_to_the_next_route_with_its_deployment(
    tmp_path: Path, mocked: responses.RequestsMock, path: str
) -> None:
    mocked.add(responses.POST, f"{ONE}{path}", body=requests.ConnectionError("refused"))
    mocked.add(responses.POST, f"{TWO}{path}", json={"id": "resp_2", "object": "response"})
    call = Call("POST", path, body=b'{"model":"m","input":"x"}', routed=True, model="m")
    answer, record = _exchange(_routed(tmp_path), call)
    assert answer.status == 200
    assert [c.request.url for c in mocked.calls] == [f"{ONE}{path}", f"{TWO}{path}"]
    assert mocked.calls[1].request.body == b'{"model":"m-two","input":"x"}'
    assert (record.attempts, record.upstream, record.model) == (2, "two", "m")


def test_the_last_routes_failure_is_the_answer(tmp_path: Path, mocked: responses.RequestsMock) -> None:
    for url in (ONE, TWO):
        mocked.add(responses.POST, f"{url}/responses", body=requests.ConnectionError("refused"))
    record = RequestRecord("req_core", "POST", "create")
    gateway = _routed(tmp_path)
    tenant = gateway.authenticate(None, record)
    with pytest.raises(UpstreamUnavailable):
        gateway.forward(
            Call("POST", "/responses", body=b'{"model":"m"}', routed=True, model="m"), tenant, record
        )
    assert record.attempts == 2


def test_a_stream_becomes_a_relay_that_reports_to_the_record_and_the_store(
    tmp_path: Path, mocked: responses.RequestsMock
) -> None:
    mocked.add(responses.POST, f"{ONE}/responses", body=SSE, content_type="text/event-stream")
    gateway = _routed(tmp_path)
    call = Call(
        "POST",
        "/responses",
        body=b'{"model":"m","stream":true,"background":true}',
        stream=True,
        routed=True,
        model="m",
        resume=ResumePlan(b"stream=true"),
        creates=True,
        background=True,
        counts_usage=True,
    )
    answer, record = _exchange(gateway, call)
    assert isinstance(answer.body, StreamRelay) and answer.streams
    assert ("X-Accel-Buffering", "no") in answer.headers
    assert ("Content-Type", "text/event-stream") in answer.headers
    assert b"".join(answer.body) == SSE
    answer.body.close()
    assert record.stream is not None
    assert (record.stream.end, record.stream.events, record.stream.response_id) == (
        StreamEnd.FINISHED,
        2,
        "resp_s1",
    )
    store = gateway.state.store
    located = store.get_response("resp_s1")
    assert located is not None and (located.upstream, located.background) == ("one", True)
    (row,) = store.usage_totals()
    assert (row.model, row.usage.total_tokens) == ("m", 3)
