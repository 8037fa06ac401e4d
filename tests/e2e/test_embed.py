"""The proxy mounted inside an existing Flask app, served by gunicorn."""

from __future__ import annotations

import typing as t

import pytest
import requests

from wsgi_proxy.simulator import Simulator

from ..envelope import assert_error
from .conftest import CLIENT_KEY, REPO, Proxy, start_proxy

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def hosted(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Proxy]:
    running = start_proxy(
        tmp_path_factory.mktemp("host"),
        simulator.base_url,
        app="tests.e2e.hostapp:app",
        prefix="/llm/v1",
        ready_path="/api/ping",
        extra=["--chdir", str(REPO)],
    )
    yield running
    running.server.stop()


def test_sdk_background_resume_through_embedded_proxy(hosted: Proxy) -> None:
    with hosted.client() as client:
        stream = client.responses.create(model="gpt-4o-mini", input="embedded", background=True, stream=True)
        head = []
        for event in stream:
            head.append(event)
            if event.sequence_number == 3:
                break
        stream.close()
        response_id = head[0].response.id
        rest = list(client.responses.retrieve(response_id, stream=True, starting_after=3))
    numbers = [e.sequence_number for e in head + rest]
    assert numbers == list(range(len(numbers)))
    assert rest[-1].type == "response.completed"


def test_host_routes_and_error_pages_are_untouched(hosted: Proxy) -> None:
    root = hosted.root_url
    assert requests.get(root + "/", timeout=5).text == "host home"
    assert requests.get(root + "/api/ping", timeout=5).json() == {"pong": True}
    missing = requests.get(root + "/nowhere", timeout=5)
    assert (missing.status_code, missing.text) == (404, "host 404 page")
    # The proxy is only under its prefix: /v1 belongs to the host (and is not found there).
    assert requests.get(root + "/v1/models", timeout=5).text == "host 404 page"


def test_errors_under_the_prefix_are_openai_shaped(hosted: Proxy) -> None:
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
    unknown = requests.get(hosted.base_url + "/nowhere", headers=auth, timeout=5)
    assert_error(unknown, 404, code="unknown_url")
    wrong_method = requests.put(hosted.base_url + "/responses", headers=auth, timeout=5)
    assert wrong_method.status_code == 405
    assert wrong_method.headers["Allow"] == "POST"
