"""The bytes a client receives from an SSE stream are the bytes the upstream sent."""

from __future__ import annotations

import typing as t

import pytest
import requests
from openai import OpenAI

from wsgi_proxy.simulator import Simulator

from .conftest import CLIENT_KEY, UPSTREAM_KEY, Proxy
from .sse import events_of, read_all

pytestmark = pytest.mark.e2e

FAULT_SETS: dict[str, dict[str, str]] = {
    "crlf-split": {"sim_framing": "crlf", "sim_split": "1"},
    "cr-only": {"sim_framing": "cr", "sim_split": "1"},
    "close-delimited": {"sim_transfer": "close", "sim_split": "1"},
    "gzip": {"sim_gzip": "1"},
    "unicode-keepalive-comments": {"sim_unicode": "1", "sim_keepalive_every": "3", "sim_comments": "1"},
    "big-completed": {"sim_words": "4", "sim_delta_bytes": str(1024 * 1024)},
}


def _finished_background(client: OpenAI, metadata: dict[str, str]) -> str:
    stream = client.responses.create(
        model="gpt-4o-mini", input="fidelity", background=True, stream=True, metadata=metadata
    )
    response_id = ""
    for event in stream:  # read it to the end: the response is then complete upstream
        if event.type == "response.created":
            response_id = event.response.id
    return response_id


@pytest.mark.parametrize("faults", list(FAULT_SETS.values()), ids=list(FAULT_SETS))
def test_replay_bytes_equal_direct_and_through_proxy(
    client: OpenAI, proxy: Proxy, simulator: Simulator, faults: dict[str, str]
) -> None:
    response_id = _finished_background(client, faults)
    path = f"/responses/{response_id}?stream=true&starting_after=0"
    headers = {"Accept-Encoding": "identity"}
    with requests.get(
        simulator.base_url + path,
        headers=headers | {"Authorization": f"Bearer {UPSTREAM_KEY}"},
        stream=True,
        timeout=20,
    ) as direct:
        direct_bytes = read_all(direct)
    with requests.get(
        proxy.base_url + path,
        headers=headers | {"Authorization": f"Bearer {CLIENT_KEY}"},
        stream=True,
        timeout=20,
    ) as proxied:
        assert "Content-Length" not in proxied.headers
        assert "Content-Encoding" not in proxied.headers
        assert proxied.headers["Cache-Control"] == "no-cache"
        assert proxied.headers["X-Accel-Buffering"] == "no"
        proxied_bytes = read_all(proxied)
    assert len(events_of(direct_bytes)) > 3
    assert proxied_bytes == direct_bytes


def test_crlf_split_stream_parses_in_the_sdk(client: OpenAI) -> None:
    stream = client.responses.create(
        model="gpt-4o-mini",
        input="crlf",
        stream=True,
        metadata={"sim_framing": "crlf", "sim_split": "1", "sim_unicode": "1"},
    )
    events = list(stream)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output_text
    assert "\u2028" in text and "хорошо" in text


def test_keepalive_events_keep_their_sequence_numbers(client: OpenAI) -> None:
    stream = client.responses.create(
        model="gpt-4o-mini", input="ka", stream=True, metadata={"sim_keepalive_every": "2"}
    )
    events: list[t.Any] = list(stream)
    assert any(e.type == "keepalive" for e in events)
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_upstream_headers_are_allow_listed(proxy: Proxy) -> None:
    answer = requests.post(
        proxy.base_url + "/responses",
        json={"model": "gpt-4o-mini", "input": "headers"},
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        timeout=10,
    )
    assert answer.headers["X-Upstream-Request-ID"].startswith("req_")
    assert answer.headers["X-Request-ID"] != answer.headers["X-Upstream-Request-ID"]
    assert "openai-processing-ms" in answer.headers
    assert "Server" not in answer.headers or "gunicorn" in answer.headers["Server"]
