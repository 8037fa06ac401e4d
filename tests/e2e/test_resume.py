"""Background streams: the seed scenario (stop after K, resume with starting_after), cuts,
disconnects during upstream silence, and delivery without buffering."""

from __future__ import annotations

import json
import time
import typing as t

import openai
import pytest
import requests
from openai import OpenAI

from wsgi_proxy.simulator import Simulator

from .conftest import CLIENT_KEY, Proxy, start_background
from .sse import events_of, raw_request, read_all, recv_until, timed_events

pytestmark = pytest.mark.e2e

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}


def test_seed_scenario_sdk_resume_is_gap_and_duplicate_free(client: OpenAI) -> None:
    k = 6
    response_id, first = start_background(client, k, sim_delay_ms="30")
    assert first == list(range(k + 1))
    rest = list(client.responses.retrieve(response_id, stream=True, starting_after=k))
    numbers = first + [e.sequence_number for e in rest]
    assert numbers == list(range(len(numbers)))
    assert rest[0].sequence_number == k + 1
    assert rest[-1].type == "response.completed"


def test_seed_scenario_raw_http(proxy: Proxy) -> None:
    body = {"model": "gpt-4o-mini", "input": "raw", "background": True, "stream": True}
    with requests.post(
        proxy.base_url + "/responses", json=body, headers=AUTH, stream=True, timeout=10
    ) as first:
        assert first.headers["Content-Type"].startswith("text/event-stream")
        head = recv_events(first, 4)
    response_id = head[0]["response"]["id"]
    url = f"{proxy.base_url}/responses/{response_id}?stream=true&starting_after=3"
    with requests.get(url, headers=AUTH, stream=True, timeout=10) as second:
        assert second.status_code == 200
        rest = events_of(read_all(second))
    numbers = [e["sequence_number"] for e in head + rest]
    assert numbers == list(range(len(numbers)))
    assert rest[-1]["type"] == "response.completed"


def recv_events(response: requests.Response, count: int) -> list[dict[str, t.Any]]:
    buffer = b""
    while len(events_of(buffer)) < count:
        chunk = response.raw.read1(65536)
        assert chunk, "the stream ended early"
        buffer += chunk
    return events_of(buffer)[:count]


def test_resume_after_completion_replays_the_rest(client: OpenAI) -> None:
    response_id, _ = start_background(client, 2)
    deadline = time.monotonic() + 10
    while client.responses.retrieve(response_id).status != "completed" and time.monotonic() < deadline:
        time.sleep(0.05)
    rest = list(client.responses.retrieve(response_id, stream=True, starting_after=2))
    assert [e.sequence_number for e in rest] == list(range(3, 3 + len(rest)))
    assert rest[-1].type == "response.completed"


def test_resume_past_the_end_is_an_empty_stream(client: OpenAI) -> None:
    response_id, _ = start_background(client, 1)
    final = list(client.responses.retrieve(response_id, stream=True))[-1]
    assert (
        list(client.responses.retrieve(response_id, stream=True, starting_after=final.sequence_number)) == []
    )


def test_stream_helper_replays_from_zero(client: OpenAI, simulator: Simulator) -> None:
    response_id, _ = start_background(client, 3, sim_delay_ms="20")
    simulator.clear_requests()
    with client.responses.stream(response_id=response_id, starting_after=3) as stream:
        seen = [e.sequence_number for e in stream]
        final = stream.get_final_response()
    assert seen[0] == 4
    assert final.status == "completed" and final.output_text
    (request,) = simulator.requests
    assert request.query == "stream=true"  # the helper asks for the whole replay and filters locally


def test_retrieve_stream_of_non_background_response_is_relayed_400(client: OpenAI) -> None:
    created = client.responses.create(model="gpt-4o-mini", input="not background")
    with pytest.raises(openai.BadRequestError) as caught:
        list(client.responses.retrieve(created.id, stream=True))
    assert caught.value.param == "stream"


def test_cut_close_delimited_upstream_is_not_a_clean_end(proxy: Proxy) -> None:
    # Not background, so not resumable: a close-delimited cut must reach the client as an error.
    body = {
        "model": "gpt-4o-mini",
        "input": "close",
        "stream": True,
        "metadata": {"sim_transfer": "close", "sim_cut_after": "4"},
    }
    with requests.post(
        proxy.base_url + "/responses", json=body, headers=AUTH, stream=True, timeout=10
    ) as answer:
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            answer.content  # noqa: B018


def _closures_for(simulator: Simulator, response_id: str) -> list[tuple[str, float]]:
    return [(c.reason, c.closed_at) for c in simulator.stream_closures if c.response_id == response_id]


def test_client_disconnect_during_upstream_silence_closes_upstream(
    proxy: Proxy, simulator: Simulator
) -> None:
    body = json.dumps(
        {
            "model": "gpt-4o-mini",
            "input": "think hard",
            "background": True,
            "stream": True,
            "metadata": {"sim_gap_at": "4", "sim_gap_s": "20"},
        }
    ).encode()
    sock = raw_request(
        proxy.base_url + "/responses", "POST", {**AUTH, "Content-Type": "application/json"}, body
    )
    head = recv_until(sock, b'"sequence_number":3')
    response_id = head.split(b'"id":"', 1)[1].split(b'"', 1)[0].decode()
    time.sleep(0.3)  # the upstream is now silent
    sock.close()
    left_at = time.monotonic()
    deadline = left_at + 5
    while not _closures_for(simulator, response_id) and time.monotonic() < deadline:
        time.sleep(0.02)
    ((reason, closed_at),) = _closures_for(simulator, response_id)
    assert reason == "client_gone"
    assert closed_at - left_at < 2.0
    # A disconnect never cancels a background response: it is still running upstream.
    status = requests.get(f"{proxy.base_url}/responses/{response_id}", headers=AUTH, timeout=5).json()[
        "status"
    ]
    assert status in ("queued", "in_progress")
    requests.post(f"{proxy.base_url}/responses/{response_id}/cancel", headers=AUTH, timeout=5)


def test_events_arrive_while_the_upstream_is_still_producing(proxy: Proxy) -> None:
    body = {
        "model": "gpt-4o-mini",
        "input": "slowly",
        "stream": True,
        "metadata": {"sim_delay_ms": "150", "sim_words": "8", "sim_transfer": "close"},
    }
    start = time.monotonic()
    with requests.post(
        proxy.base_url + "/responses", json=body, headers=AUTH, stream=True, timeout=20
    ) as answer:
        arrivals = timed_events(answer)
    offsets = [at - start for at, _ in arrivals]
    # 14 events generated 150 ms apart: unbuffered delivery spreads them over ~2 s; each
    # consecutive pair arrives at least ~100 ms apart instead of all at the end.
    assert len(offsets) >= 14
    gaps = [b - a for a, b in zip(offsets[2:], offsets[3:], strict=False)]
    assert min(gaps) > 0.08, gaps
    assert offsets[-1] - offsets[0] > 1.5


def test_silent_gap_shorter_than_read_timeout_is_relayed(client: OpenAI) -> None:
    stream = client.responses.create(
        model="gpt-4o-mini", input="pause", stream=True, metadata={"sim_gap_at": "3", "sim_gap_s": "1.5"}
    )
    events = list(stream)
    assert events[-1].type == "response.completed"
