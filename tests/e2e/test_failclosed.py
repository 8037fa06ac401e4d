"""Streams that fail never pass for a clean end: silent upstreams, early ends, events without cursors.

The proxy runs under gunicorn in front of the simulator, whose fault knobs make the upstream go
silent (``sim_gap_*``), end cleanly before its terminal event (``sim_cut_mode=clean``), follow an
``error`` event with silence, or send events without ``sequence_number`` (``sim_no_sequence``).
"""

from __future__ import annotations

import json
import time
import typing as t

import openai
import pytest
import requests
import urllib3

from wsgi_proxy.simulator import Simulator
from wsgi_proxy.wire.sse import EventSplitter, parse_event

from .conftest import CLIENT_KEY, Proxy, start_proxy

pytestmark = pytest.mark.e2e

READ_TIMEOUT = 2.0
#: Far longer than the read timeout: a stream still open after it was never cut.
GAP = "60"
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def strict(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Proxy]:
    """A proxy with a short read timeout, keep-alives well inside it, and one resume per break."""
    env = {
        "WSGI_PROXY_READ_TIMEOUT": str(READ_TIMEOUT),
        "WSGI_PROXY_KEEPALIVE_INTERVAL": "0.5",
        "WSGI_PROXY_RESUME_ATTEMPTS": "1",
        "WSGI_PROXY_RESUME_BACKOFF": "0.1",
    }
    proxy = start_proxy(tmp_path_factory.mktemp("strict"), simulator.base_url, env=env)
    yield proxy
    proxy.server.stop()


def _sdk_stream(proxy: Proxy, **metadata: str) -> tuple[list[t.Any], BaseException | None, float]:
    """Read a streamed create with the SDK; its events, the error that ended it, and how long it took."""
    events: list[t.Any] = []
    started = time.monotonic()
    background = metadata.pop("background", None) == "1"
    with proxy.client().with_options(timeout=120) as client:
        try:
            stream = client.responses.create(
                model="gpt-4o-mini", input="x", stream=True, background=background, metadata=metadata
            )
            for event in stream:
                events.append(event)
        except (openai.APIConnectionError, openai.APIError) as exc:
            return events, exc, time.monotonic() - started
    return events, None, time.monotonic() - started


def _errors(proxy: Proxy) -> set[str]:
    """The errors of the create requests in the proxy's JSON log lines."""
    lines = [json.loads(line) for line in proxy.log().splitlines() if line.startswith("{")]
    return {line.get("error", "") for line in lines if line["route"] == "create"}


def test_a_silent_foreground_stream_is_aborted_at_the_read_timeout_despite_keepalives(strict: Proxy) -> None:
    events, error, took = _sdk_stream(strict, sim_gap_at="3", sim_gap_s=GAP)
    assert isinstance(error, openai.APIConnectionError), error
    assert [e.sequence_number for e in events] == [0, 1, 2]
    assert took < float(GAP) / 2  # cut by the proxy, long before the upstream spoke again
    assert "aborted: the upstream was silent for 2 s (its read timeout)" in _errors(strict)


def test_a_silent_background_stream_is_resumed_then_aborted(strict: Proxy) -> None:
    events, error, took = _sdk_stream(strict, sim_gap_at="3", sim_gap_s=GAP, background="1")
    assert isinstance(error, openai.APIConnectionError), error
    assert [e.sequence_number for e in events] == [0, 1, 2]
    assert took < float(GAP) / 2
    assert "resuming failed 1 times" in strict.log()


def test_an_error_event_followed_by_silence_ends_the_stream(strict: Proxy) -> None:
    # The simulator's error takes sequence number 3; the response.failed after it never comes.
    events, error, took = _sdk_stream(
        strict, sim_error="flat", sim_error_at="3", sim_gap_at="4", sim_gap_s=GAP
    )
    assert error is None
    assert events[-1].type == "error"
    assert took < float(GAP) / 2


def test_a_foreground_stream_ended_cleanly_before_its_terminal_event_is_aborted(strict: Proxy) -> None:
    events, error, _ = _sdk_stream(strict, sim_cut_after="3", sim_cut_mode="clean")
    assert isinstance(error, openai.APIConnectionError), error
    assert len(events) == 3 and events[-1].type != "response.completed"
    assert "aborted: the upstream stream ended before its terminal event" in _errors(strict)


def test_a_stream_without_sequence_numbers_is_aborted_instead_of_resumed_with_duplicates(
    strict: Proxy,
) -> None:
    body = {
        "model": "gpt-4o-mini",
        "input": "x",
        "stream": True,
        "background": True,
        "metadata": {"sim_no_sequence": "1", "sim_cut_after": "5", "sim_words": "12"},
    }
    received: list[bytes] = []
    splitter = EventSplitter()
    with requests.post(
        strict.base_url + "/responses", data=json.dumps(body), headers=AUTH, stream=True
    ) as answer:
        assert answer.status_code == 200
        with pytest.raises(urllib3.exceptions.ProtocolError):
            while chunk := answer.raw.read1(65536):
                received += [e for e in splitter.feed(chunk) if parse_event(e).type is not None]
    assert len(received) == 5 and len(set(received)) == 5  # each event once, then the abort
    assert all(parse_event(e).sequence_number is None for e in received)
    assert "no sequence_number to resume after" in strict.log()
