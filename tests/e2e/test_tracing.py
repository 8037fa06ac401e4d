"""OpenTelemetry traces through real gunicorn workers, exported over OTLP/HTTP to a receiver in the
test: one span per request (continuing the client's ``traceparent``), per upstream attempt and per
resume, with the GenAI conventions' attributes and the proxy's own; and none when not configured."""

from __future__ import annotations

import http.server
import threading
import time
import typing as t

import openai
import pytest
from openai import OpenAI
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from wsgi_proxy.simulator import Simulator

from .conftest import UPSTREAM_KEY, Proxy, simulator_fixture, start_red_and_blue

pytestmark = pytest.mark.e2e

KEYS = {"RED_KEY": "sk-red-trace-0123456789abcdef", "BLUE_KEY": "sk-blue-trace-0123456789abcdef"}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Receiver:
    """An OTLP/HTTP trace receiver on loopback: every span exported to it, with its attributes."""

    def __init__(self) -> None:
        spans: list[dict[str, t.Any]] = []
        lock = threading.Lock()
        self.spans, self.lock = spans, lock

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                with lock:
                    for resource in request.resource_spans:
                        for scope in resource.scope_spans:
                            spans.extend(_span(span) for span in scope.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: t.Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(
        self, predicate: t.Callable[[list[dict[str, t.Any]]], bool], timeout: float = 10.0
    ) -> list[dict[str, t.Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if predicate(self.spans):
                    return list(self.spans)
            time.sleep(0.05)
        with self.lock:
            return list(self.spans)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _span(span: t.Any) -> dict[str, t.Any]:
    def value(v: t.Any) -> t.Any:
        return getattr(v, v.WhichOneof("value"))

    return {
        "name": span.name,
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent": span.parent_span_id.hex(),
        "kind": span.kind,
        "status": span.status.code,
        "attributes": {a.key: value(a.value) for a in span.attributes},
    }


@pytest.fixture(scope="module")
def receiver() -> t.Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


simulator = simulator_fixture(delay_ms=2, words=8)


@pytest.fixture(scope="module")
def traced(
    simulator: Simulator, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory
) -> t.Iterator[Proxy]:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_SERVICE_NAME": "gateway-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    proxy, _ = start_red_and_blue(tmp_path_factory.mktemp("traced"), simulator.base_url, KEYS, env=env)
    yield proxy
    proxy.server.stop()


def _client(proxy: Proxy) -> OpenAI:
    return OpenAI(
        base_url=proxy.base_url,
        api_key=KEYS["RED_KEY"],
        max_retries=0,
        timeout=30,
        default_headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"},
    )


def test_a_create_is_one_span_continuing_the_clients_trace_with_an_attempt_below_it(
    traced: Proxy, receiver: Receiver, simulator: Simulator
) -> None:
    with _client(traced) as client:
        response = client.responses.create(model="gpt-4o-mini", input="trace me")
    spans = receiver.wait_for(lambda spans: any(s["name"] == "POST create" for s in spans))
    (request,) = [s for s in spans if s["name"] == "POST create"]
    assert (request["trace_id"], request["parent"]) == (TRACE_ID, CLIENT_SPAN)
    attributes = request["attributes"]
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert attributes["gen_ai.usage.input_tokens"] == response.usage.input_tokens
    assert attributes["gen_ai.usage.output_tokens"] == response.usage.output_tokens
    assert (attributes["wsgi_proxy.key"], attributes["wsgi_proxy.team"]) == ("red", "red")
    assert (attributes["wsgi_proxy.upstream"], attributes["wsgi_proxy.attempts"]) == ("main", 1)
    assert attributes["http.response.status_code"] == 200 and attributes["wsgi_proxy.cost_usd"] > 0
    attempts = [s for s in spans if s["parent"] == request["span_id"] and s["name"] == "upstream attempt 1"]
    assert len(attempts) == 1 and attempts[0]["attributes"]["wsgi_proxy.upstream"] == "main"
    # The upstream was asked below the request's span, not the client's.
    sent = [r for r in simulator.requests if r.method == "POST" and b"trace me" in r.body][-1]
    assert sent.headers["traceparent"].split("-")[1:3] == [TRACE_ID, request["span_id"]]
    for secret in (*KEYS.values(), UPSTREAM_KEY):
        assert secret not in repr(spans)


def test_a_resumed_stream_has_a_span_per_resume_and_its_response_id(
    traced: Proxy, receiver: Receiver
) -> None:
    with _client(traced) as client:
        events = list(
            client.responses.create(
                model="gpt-4o-mini",
                input="resume me",
                background=True,
                stream=True,
                metadata={"sim_cut_every": "5"},
            )
        )
    final = events[-1]
    assert final.type == "response.completed"

    def done(spans: list[dict[str, t.Any]]) -> bool:
        return any(s["attributes"].get("gen_ai.response.id") == final.response.id for s in spans)

    spans = receiver.wait_for(done)
    (request,) = [s for s in spans if s["attributes"].get("gen_ai.response.id") == final.response.id]
    resumes = [s for s in spans if s["parent"] == request["span_id"] and s["name"] == "resume"]
    assert request["attributes"]["wsgi_proxy.resumes"] == len(resumes) >= 1
    assert all(r["attributes"]["wsgi_proxy.resume.outcome"] == "resumed" for r in resumes)
    assert [r["attributes"]["wsgi_proxy.resume.starting_after"] for r in resumes] == sorted(
        r["attributes"]["wsgi_proxy.resume.starting_after"] for r in resumes
    )


def test_a_failed_request_is_an_error_span(traced: Proxy, receiver: Receiver) -> None:
    with _client(traced) as client, pytest.raises(openai.InternalServerError):
        client.responses.create(model="gpt-4o-mini", input="fail", metadata={"sim_status": "503"})
    spans = receiver.wait_for(
        lambda spans: any(s["attributes"].get("http.response.status_code") == 503 for s in spans)
    )
    failed = [s for s in spans if s["attributes"].get("http.response.status_code") == 503]
    assert failed and failed[0]["status"] == 2  # STATUS_CODE_ERROR


def test_no_span_is_sent_when_the_sdk_is_disabled(
    simulator: Simulator, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory
) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_SDK_DISABLED": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    proxy, _ = start_red_and_blue(tmp_path_factory.mktemp("untraced"), simulator.base_url, KEYS, env=env)
    try:
        with OpenAI(base_url=proxy.base_url, api_key=KEYS["BLUE_KEY"], max_retries=0) as client:
            client.responses.create(model="gpt-4o-mini", input="not traced")
        time.sleep(1.0)  # five batch periods
        assert not [s for s in receiver.spans if s["attributes"].get("wsgi_proxy.key") == "blue"]
    finally:
        proxy.server.stop()
