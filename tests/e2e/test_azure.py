"""The Azure wire through the proxy: the api-key header, and api-version on every legacy call."""

from __future__ import annotations

import typing as t

import pytest

from wsgi_proxy.simulator import Simulator, SimulatorConfig

from .conftest import UPSTREAM_KEY, Proxy, start_background, start_proxy

pytestmark = pytest.mark.e2e

API_VERSION = "2025-04-01-preview"


@pytest.fixture(scope="module", params=["azure-v1", "azure-legacy"])
def azure(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> t.Iterator[tuple[Simulator, Proxy]]:
    flavor = request.param
    sim = Simulator(
        config=SimulatorConfig(api_key=UPSTREAM_KEY, flavor=flavor, api_version=API_VERSION)
    ).start()
    env = {"WSGI_PROXY_UPSTREAM_KIND": "azure"}
    if flavor == "azure-legacy":
        env["WSGI_PROXY_UPSTREAM_API_VERSION"] = API_VERSION
    proxy = start_proxy(tmp_path_factory.mktemp(flavor), sim.base_url, env=env)
    yield sim, proxy
    proxy.server.stop()
    sim.stop()


def test_every_endpoint_speaks_the_azure_wire(azure: tuple[Simulator, Proxy]) -> None:
    sim, proxy = azure
    sim.clear_requests()
    with proxy.client() as client:
        created = client.responses.create(model="gpt-4o-mini", input="azure")
        client.responses.retrieve(created.id)
        client.responses.input_items.list(created.id, limit=2)
        client.responses.input_tokens.count(model="gpt-4o-mini", input="count")
        client.responses.compact(model="gpt-4o-mini", input="compact")
        background = client.responses.create(model="gpt-4o-mini", input="bg", background=True)
        client.responses.cancel(background.id)
        client.responses.delete(created.id)
        client.models.list()
    seen = sim.requests
    assert len(seen) == 9
    for request in seen:
        assert request.headers.get("api-key") == UPSTREAM_KEY
        assert "authorization" not in request.headers
        if sim.base_url.endswith("/openai"):  # legacy: the version first, on every call
            assert request.query.startswith(f"api-version={API_VERSION}")


def test_background_stream_resume_carries_the_api_version(azure: tuple[Simulator, Proxy]) -> None:
    sim, proxy = azure
    with proxy.client() as client:
        response_id, head = start_background(client, 3, sim_delay_ms="20")
        sim.clear_requests()
        rest = list(client.responses.retrieve(response_id, stream=True, starting_after=3))
    numbers = head + [e.sequence_number for e in rest]
    assert numbers == list(range(len(numbers)))
    assert rest[-1].type == "response.completed"
    (resume,) = sim.requests
    expected = "stream=true&starting_after=3"
    if sim.base_url.endswith("/openai"):
        expected = f"api-version={API_VERSION}&starting_after=3&stream=true"
    assert sorted(resume.query.split("&")) == sorted(expected.split("&"))


def test_transparent_resume_against_azure(azure: tuple[Simulator, Proxy]) -> None:
    _sim, proxy = azure
    with proxy.client() as client:
        events = list(
            client.responses.create(
                model="gpt-4o-mini",
                input="cut",
                background=True,
                stream=True,
                metadata={"sim_cut_every": "5"},
            )
        )
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(len(numbers)))
    assert events[-1].type == "response.completed"
