"""Tests for the simulator's Azure OpenAI flavors (``azure-v1`` and ``azure-legacy``).

``azure-legacy`` is driven by the official ``AzureOpenAI`` client, ``azure-v1`` by the plain ``OpenAI``
client (Bearer) and by raw requests with an ``api-key`` header.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import typing as t

import openai
import pytest
import requests
from openai import AzureOpenAI, OpenAI

from wsgi_proxy.simulator import Simulator, SimulatorConfig
from wsgi_proxy.simulator.config import Flavor

KEY = "azure-key-0123456789abcdef"
VERSION = "2025-04-01-preview"
ACCESS_DENIED = {
    "error": {
        "code": "401",
        "message": "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a"
        " valid key for an active subscription and use a correct regional API endpoint for your resource.",
    }
}
NOT_FOUND = {"error": {"code": "404", "message": "Resource not found"}}
BAD_VERSION = {"error": {"code": "BadRequest", "message": "API version not supported"}}


def start(flavor: Flavor, **config: t.Any) -> Simulator:
    return Simulator(config=SimulatorConfig(flavor=flavor, delay_ms=1, words=4, **config)).start()


@pytest.fixture
def legacy() -> t.Iterator[Simulator]:
    sim = start("azure-legacy", api_key=KEY)
    yield sim
    sim.stop()


@pytest.fixture
def v1() -> t.Iterator[Simulator]:
    sim = start("azure-v1", api_key=KEY)
    yield sim
    sim.stop()


def parse_sse(body: bytes) -> list[dict[str, t.Any]]:
    events = []
    for block in body.split(b"\n\n"):
        if block:
            name, data = block.split(b"\n")
            event = json.loads(data.removeprefix(b"data: "))
            assert name == b"event: " + event["type"].encode()
            events.append(event)
    return events


def query_values(query: str, name: str) -> list[str]:
    return [v for k, v in (p.partition("=")[::2] for p in query.split("&")) if k == name]


class Api:
    """Raw calls below a simulator's ``base_url`` with fixed headers and query parameters."""

    def __init__(self, sim: Simulator, headers: dict[str, str], query: str = "") -> None:
        self.sim = sim
        self.headers = headers
        self.query = query

    def __call__(self, method: str, path: str, query: str = "", body: object = None) -> requests.Response:
        joined = "&".join(q for q in (self.query, query) if q)
        url = self.sim.base_url + path + ("?" + joined if joined else "")
        return requests.request(method, url, json=body, headers=self.headers, timeout=5)

    def exercise(self) -> None:
        """Every endpoint answers 2xx; resume returns exactly the events after 3."""
        body = {"model": "gpt-4o-mini", "input": "alpha beta", "background": True, "stream": True}
        created = self("POST", "/responses", body=body)
        assert created.status_code == 200, created.text
        assert created.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(created.content)
        response_id = events[0]["response"]["id"]
        assert events[-1]["type"] == "response.completed"

        resumed = self("GET", f"/responses/{response_id}", "stream=true&starting_after=3")
        assert resumed.status_code == 200, resumed.text
        assert parse_sse(resumed.content) == events[4:]
        assert self("GET", f"/responses/{response_id}").json()["status"] == "completed"
        items = self("GET", f"/responses/{response_id}/input_items", "limit=5&order=asc").json()
        assert items["object"] == "list" and len(items["data"]) == 1
        assert self("POST", "/responses/input_tokens", body={"input": "a b c"}).json()["input_tokens"] > 0
        compact = self("POST", "/responses/compact", body={"model": "gpt-4o-mini", "input": "a"})
        assert compact.json()["object"] == "response.compaction"
        assert self("GET", "/models").json()["object"] == "list"
        assert self("GET", "/models/gpt-4o").json()["id"] == "gpt-4o"

        slow = {"model": "m", "input": "a", "background": True, "metadata": {"sim_delay_ms": "1000"}}
        queued = self("POST", "/responses", body=slow).json()
        cancelled = self("POST", f"/responses/{queued['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        deleted = self("DELETE", f"/responses/{response_id}")
        assert deleted.json() == {"id": response_id, "object": "response", "deleted": True}
        assert self("GET", f"/responses/{response_id}").status_code == 404


ENDPOINTS = [
    ("POST", "/responses"),
    ("GET", "/responses/resp_x"),
    ("DELETE", "/responses/resp_x"),
    ("POST", "/responses/resp_x/cancel"),
    ("GET", "/responses/resp_x/input_items"),
    ("POST", "/responses/input_tokens"),
    ("POST", "/responses/compact"),
    ("GET", "/models"),
    ("GET", "/models/gpt-4o"),
]


# -- both flavors ---------------------------------------------------------------------------------------


def test_base_url_per_flavor() -> None:
    for flavor, suffix in [("openai", "/v1"), ("azure-v1", "/openai/v1"), ("azure-legacy", "/openai")]:
        sim = start(t.cast(Flavor, flavor))
        try:
            assert sim.base_url == sim.url + suffix
            assert requests.get(sim.url + "/health", timeout=5).ok
        finally:
            sim.stop()


def test_unknown_flavor_is_refused() -> None:
    with pytest.raises(ValueError, match="azure-legacy"):
        SimulatorConfig(flavor="azure")  # type: ignore[arg-type]


def test_openai_flavor_does_not_serve_azure_paths() -> None:
    with Simulator(config=SimulatorConfig(delay_ms=0)) as sim:
        for path in ("/openai/v1/models", f"/openai/models?api-version={VERSION}"):
            resp = requests.get(sim.url + path, timeout=5)
            assert resp.status_code == 404
            assert resp.json()["error"]["message"].startswith("Invalid URL (GET /openai/")
        assert "apim-request-id" not in requests.get(sim.base_url + "/models", timeout=5).headers


@pytest.mark.parametrize("flavor", ["azure-v1", "azure-legacy"])
def test_other_flavors_paths_are_azure_404s_and_sim_endpoints_stay(flavor: Flavor) -> None:
    sim = start(flavor, api_key=KEY)
    try:
        other = {
            "azure-v1": ["/v1/models", "/openai/models"],
            "azure-legacy": ["/v1/models", "/openai/v1/models"],
        }
        for path in [*other[flavor], "/openai/nothing", "/models", "/openai/v1/responses/a/b/c"]:
            resp = requests.get(f"{sim.url}{path}?api-version={VERSION}", headers={"api-key": KEY}, timeout=5)
            assert (resp.status_code, resp.json()) == (404, NOT_FOUND), path
        # An unknown path is a 404 before the key is looked at.
        assert requests.get(sim.url + "/v1/models", timeout=5).status_code == 404
        assert requests.get(sim.url + "/health", timeout=5).json() == {"status": "ok"}
        recorded = requests.get(sim.url + "/_sim/requests", timeout=5).json()
        assert recorded[0]["path"] == other[flavor][0]
        assert requests.post(sim.url + "/_sim/reset", timeout=5).ok
        assert requests.get(sim.url + "/_sim/streams", timeout=5).json()["open"] == 0
    finally:
        sim.stop()


@pytest.mark.slow
@pytest.mark.parametrize("flavor", ["azure-v1", "azure-legacy"])
def test_serve_prints_the_flavor_base_url(flavor: str) -> None:
    code = (
        "from wsgi_proxy.simulator import SimulatorConfig, serve;"
        f" serve('127.0.0.1', 0, SimulatorConfig(flavor={flavor!r}))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    suffix = {"azure-v1": "/openai/v1", "azure-legacy": "/openai"}[flavor]
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            match = re.fullmatch(
                r"simulator listening on (http://127\.0\.0\.1:\d+)" + re.escape(suffix), line
            )
            assert match, line
            models = requests.get(f"{match.group(1)}{suffix}/models?api-version={VERSION}", timeout=5)
            assert models.ok
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=5) == 0
        finally:
            proc.kill()


# -- azure-legacy ---------------------------------------------------------------------------------------


def test_legacy_sdk_uses_openai_paths_api_key_and_api_version(legacy: Simulator) -> None:
    with AzureOpenAI(
        api_key=KEY, api_version=VERSION, azure_endpoint=legacy.url, max_retries=0, timeout=10
    ) as client:
        events = list(client.responses.create(model="gpt-4o-mini", input="a b", background=True, stream=True))
        response_id = events[0].response.id
        resumed = list(
            client.responses.retrieve(
                response_id, stream=True, starting_after=3, include=["reasoning.encrypted_content"]
            )
        )
        assert [e.sequence_number for e in resumed] == [e.sequence_number for e in events[4:]]
        assert resumed[-1].type == "response.completed"
        assert client.responses.retrieve(response_id).status == "completed"
        assert len(client.responses.input_items.list(response_id, limit=5).data) == 1
        assert client.responses.input_tokens.count(model="gpt-4o-mini", input="a b").input_tokens > 0
        assert client.responses.compact(model="gpt-4o-mini", input="a").object == "response.compaction"
        assert client.models.retrieve("gpt-4o").id == "gpt-4o"
        assert len(client.models.list().data) > 0
        queued = client.responses.create(
            model="m", input="a", background=True, metadata={"sim_delay_ms": "1000"}
        )
        assert client.responses.cancel(queued.id).status == "cancelled"
        client.responses.delete(response_id)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(response_id)

    calls = [(r.method, r.path.replace(response_id, "ID").replace(queued.id, "Q")) for r in legacy.requests]
    assert calls == [
        ("POST", "/openai/responses"),
        ("GET", "/openai/responses/ID"),
        ("GET", "/openai/responses/ID"),
        ("GET", "/openai/responses/ID/input_items"),
        ("POST", "/openai/responses/input_tokens"),
        ("POST", "/openai/responses/compact"),
        ("GET", "/openai/models/gpt-4o"),
        ("GET", "/openai/models"),
        ("POST", "/openai/responses"),
        ("POST", "/openai/responses/Q/cancel"),
        ("DELETE", "/openai/responses/ID"),
        ("GET", "/openai/responses/ID"),
    ]
    for request in legacy.requests:
        assert request.headers["api-key"] == KEY and "authorization" not in request.headers
        assert query_values(request.query, "api-version") == [VERSION]
    assert legacy.requests[1].query == (
        f"api-version={VERSION}&include%5B%5D=reasoning.encrypted_content&starting_after=3&stream=true"
    )


def test_legacy_raw_every_endpoint(legacy: Simulator) -> None:
    Api(legacy, {"api-key": KEY}, f"api-version={VERSION}").exercise()
    # api-version after the other parameters works the same.
    sse = {"model": "m", "input": "a", "background": True, "stream": True}
    response_id = parse_sse(
        requests.post(
            f"{legacy.base_url}/responses?api-version={VERSION}",
            json=sse,
            headers={"api-key": KEY},
            timeout=5,
        ).content
    )[0]["response"]["id"]
    target = f"{legacy.base_url}/responses/{response_id}?stream=true&starting_after=3&api-version={VERSION}"
    events = parse_sse(requests.get(target, headers={"api-key": KEY}, timeout=5).content)
    assert events[0]["sequence_number"] == 4 and events[-1]["type"] == "response.completed"


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_legacy_api_version_is_required_exactly(legacy: Simulator, method: str, path: str) -> None:
    api = Api(legacy, {"api-key": KEY})
    cases = [
        ("", 404, NOT_FOUND),
        ("stream=true", 404, NOT_FOUND),
        ("api-version=2024-10-21", 400, BAD_VERSION),
        ("api-version=preview", 400, BAD_VERSION),
        (f"api-version={VERSION}&api-version={VERSION}", 400, BAD_VERSION),
    ]
    for query, status, body in cases:
        resp = api(method, path, query)
        assert (resp.status_code, resp.json()) == (status, body), query
        assert resp.headers["x-request-id"].startswith("req_") and resp.headers["apim-request-id"]
    # The version check comes before the key check.
    resp = Api(legacy, {})(method, path)
    assert (resp.status_code, resp.json()) == (404, NOT_FOUND)


def test_legacy_auth_is_the_api_key_header_only(legacy: Simulator) -> None:
    url = f"{legacy.base_url}/models?api-version={VERSION}"
    for headers in ({}, {"api-key": "wrong"}, {"Authorization": f"Bearer {KEY}"}, {"api-key": ""}):
        resp = requests.get(url, headers=headers, timeout=5)
        assert (resp.status_code, resp.json()) == (401, ACCESS_DENIED), headers
    assert requests.get(url, headers={"api-key": KEY}, timeout=5).ok
    with AzureOpenAI(
        api_key="wrong", api_version=VERSION, azure_endpoint=legacy.url, max_retries=0
    ) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            client.responses.create(model="m", input="a")
    assert caught.value.body == ACCESS_DENIED["error"]


def test_legacy_without_api_key_config_takes_any_caller() -> None:
    sim = start("azure-legacy", api_version="2024-12-01-preview")
    try:
        assert requests.get(f"{sim.base_url}/models?api-version=2024-12-01-preview", timeout=5).ok
        assert requests.get(f"{sim.base_url}/models?api-version={VERSION}", timeout=5).status_code == 400
    finally:
        sim.stop()


def test_legacy_faults_and_openai_errors_still_apply(legacy: Simulator) -> None:
    api = Api(legacy, {"api-key": KEY}, f"api-version={VERSION}")
    injected = api("GET", "/models", "sim_status=503&sim_retry_after=1")
    assert injected.status_code == 503 and injected.headers["retry-after"] == "1"
    missing = api("GET", "/responses/resp_nope")
    assert missing.json()["error"]["message"] == "Response with id 'resp_nope' not found."
    assert api("GET", "/responses/resp_nope", "sim_nope=1").json()["error"]["param"] == "sim_nope"


# -- azure-v1 -------------------------------------------------------------------------------------------


def test_v1_openai_sdk_with_bearer(v1: Simulator) -> None:
    with OpenAI(base_url=v1.base_url, api_key=KEY, max_retries=0, timeout=10) as client:
        events = list(client.responses.create(model="gpt-4o-mini", input="a b", background=True, stream=True))
        resumed = list(client.responses.retrieve(events[0].response.id, stream=True, starting_after=3))
        assert [e.sequence_number for e in resumed] == [e.sequence_number for e in events[4:]]
        assert len(client.models.list().data) > 0
        client.responses.delete(events[0].response.id)
    response_id = events[0].response.id
    assert [(r.method, r.path) for r in v1.requests] == [
        ("POST", "/openai/v1/responses"),
        ("GET", f"/openai/v1/responses/{response_id}"),
        ("GET", "/openai/v1/models"),
        ("DELETE", f"/openai/v1/responses/{response_id}"),
    ]
    for request in v1.requests:
        assert request.headers["authorization"] == f"Bearer {KEY}" and "api-key" not in request.headers
        assert request.path.startswith("/openai/v1/") and "api-version" not in request.query


@pytest.mark.parametrize("query", ["", "api-version=preview", "api-version=v1", f"api-version={VERSION}"])
def test_v1_raw_every_endpoint_with_api_key_header(v1: Simulator, query: str) -> None:
    Api(v1, {"api-key": KEY}, query).exercise()
    for request in v1.requests:
        assert request.headers["api-key"] == KEY and "authorization" not in request.headers
        assert request.query.startswith(query)


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_v1_api_version_and_auth_refusals(v1: Simulator, method: str, path: str) -> None:
    for query in ("api-version=2024-10-21", "api-version=", "api-version=preview&api-version=preview"):
        resp = Api(v1, {"api-key": KEY})(method, path, query)
        assert (resp.status_code, resp.json()) == (400, BAD_VERSION), query
    for headers in ({}, {"api-key": "wrong"}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        resp = Api(v1, headers)(method, path, "api-version=preview")
        assert (resp.status_code, resp.json()) == (401, ACCESS_DENIED), headers
        assert resp.headers["x-request-id"].startswith("req_")
