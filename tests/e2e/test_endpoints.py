"""Every ``client.responses`` call of the official SDK works through the proxy under gunicorn."""

from __future__ import annotations

import time

import openai
import pytest
from openai import OpenAI

from wsgi_proxy.simulator import Simulator

from .conftest import CLIENT_KEY, Proxy

pytestmark = pytest.mark.e2e


def _wait_status(client: OpenAI, response_id: str, statuses: set[str], limit: float = 10) -> str:
    deadline = time.monotonic() + limit
    while True:
        status = client.responses.retrieve(response_id).status or ""
        if status in statuses or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def test_create_json_returns_completed_response(client: OpenAI) -> None:
    response = client.responses.create(model="gpt-4o-mini", input="hello there")
    assert response.status == "completed"
    assert response.id.startswith("resp_")
    assert response.output_text
    assert response.usage is not None and response.usage.output_tokens > 0


def test_create_stream_yields_ordered_events_and_text(client: OpenAI) -> None:
    stream = client.responses.create(model="gpt-4o-mini", input="stream me", stream=True)
    events = list(stream)
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(len(events)))
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text


def test_background_without_stream_is_queued_then_completes(client: OpenAI) -> None:
    created = client.responses.create(model="gpt-4o-mini", input="later", background=True)
    assert created.status in ("queued", "in_progress")
    assert _wait_status(client, created.id, {"completed"}) == "completed"


def test_retrieve_json_returns_the_stored_response(client: OpenAI) -> None:
    created = client.responses.create(model="gpt-4o-mini", input="keep me")
    fetched = client.responses.retrieve(created.id)
    assert fetched.id == created.id
    assert fetched.output_text == created.output_text


def test_retrieve_unknown_id_stays_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.retrieve("resp_doesnotexist")
    assert "not found" in caught.value.message


def test_cancel_background_response(client: OpenAI) -> None:
    created = client.responses.create(
        model="gpt-4o-mini", input="slow", background=True, metadata={"sim_delay_ms": "200"}
    )
    cancelled = client.responses.cancel(created.id)
    assert cancelled.status == "cancelled"
    assert client.responses.cancel(created.id).status == "cancelled"  # idempotent


def test_cancel_synchronous_response_is_relayed_400(client: OpenAI) -> None:
    created = client.responses.create(model="gpt-4o-mini", input="sync")
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.cancel(created.id)
    assert "synchronous" in caught.value.message


def test_delete_then_retrieve_is_404(client: OpenAI) -> None:
    created = client.responses.create(model="gpt-4o-mini", input="delete me")
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)


def test_input_items_query_reaches_upstream_verbatim(client: OpenAI, simulator: Simulator) -> None:
    created = client.responses.create(model="gpt-4o-mini", input="items please")
    simulator.clear_requests()
    page = client.responses.input_items.list(
        created.id,
        limit=5,
        order="asc",
        include=["message.input_image.image_url", "file_search_call.results"],
    )
    assert page.data
    (seen,) = simulator.requests
    assert seen.path == f"/v1/responses/{created.id}/input_items"
    assert seen.query == (
        "include%5B%5D=message.input_image.image_url&include%5B%5D=file_search_call.results&limit=5&order=asc"
    )


def test_input_tokens_and_compact(client: OpenAI) -> None:
    counted = client.responses.input_tokens.count(model="gpt-4o-mini", input="count these tokens")
    assert counted.input_tokens > 0
    compacted = client.responses.compact(model="gpt-4o-mini", input="compact this")
    assert compacted.object == "response.compaction"


def test_models_list(client: OpenAI) -> None:
    assert {m.id for m in client.models.list()} >= {"gpt-4o-mini"}


def test_create_body_reaches_upstream_byte_identical(proxy: Proxy, simulator: Simulator) -> None:
    import requests

    body = b'{ "model" : "gpt-4o-mini",\n "input":"caf\\u00e9 \xe2\x80\xa8", "x_unknown": [1, 2.50, {"a": null}] }'
    simulator.clear_requests()
    answer = requests.post(
        proxy.base_url + "/responses",
        data=body,
        headers={"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    (seen,) = simulator.requests
    assert seen.body == body


def test_health_probes(proxy: Proxy) -> None:
    import requests

    for path in ("/", "/healthz"):
        assert requests.get(proxy.root_url + path, timeout=5).json() == {"status": "ok"}


def test_one_json_line_per_request_under_gunicorn(proxy: Proxy) -> None:
    import json

    with proxy.client() as sdk:
        created = sdk.responses.create(
            model="gpt-4o-mini", input="logged", extra_headers={"X-Request-ID": "e2e-trace-1"}
        )
        list(
            sdk.responses.create(
                model="gpt-4o-mini",
                input="logged",
                stream=True,
                extra_headers={"X-Request-ID": "e2e-trace-2"},
            )
        )
    lines = [json.loads(line) for line in proxy.log().splitlines() if line.startswith("{")]
    by_id = {line["request_id"]: line for line in lines}
    plain, streamed = by_id["e2e-trace-1"], by_id["e2e-trace-2"]
    assert (plain["route"], plain["status"], plain["model"], plain["upstream"]) == (
        "create",
        200,
        "gpt-4o-mini",
        "default",
    )
    assert plain["usage"] == created.usage.model_dump(
        include={"input_tokens", "output_tokens", "total_tokens"}
    )
    assert plain["upstream_request_id"].startswith("req_")
    assert streamed["events"] > 5 and streamed["bytes"] > 0 and streamed["resumes"] == 0
    assert streamed["usage"]["total_tokens"] > 0 and streamed["ttfe_ms"] is not None
