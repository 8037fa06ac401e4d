"""Streams that survive: transparent resume, keep-alives, safe retries, stalled clients, restarts."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import typing as t
from pathlib import Path

import openai
import pytest
import requests
from openai import OpenAI

from wsgi_proxy.simulator import Simulator

from .conftest import CLIENT_KEY, Proxy, start_background, start_proxy
from .sse import raw_request, read_all, recv_until
from .tcpgate import TcpGate

pytestmark = pytest.mark.e2e

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
FAST = {
    "WSGI_PROXY_KEEPALIVE_INTERVAL": "0.5",
    "WSGI_PROXY_SEND_TIMEOUT": "2",
    "WSGI_PROXY_RESUME_BACKOFF": "0.05",
    "WSGI_PROXY_RESUME_BACKOFF_MAX": "0.4",
    "WSGI_PROXY_RESUME_ATTEMPTS": "6",
    "WSGI_PROXY_RETRY_MAX_WAIT": "1",
}


@pytest.fixture(scope="module")
def gate(simulator: Simulator) -> t.Iterator[TcpGate]:
    forwarder = TcpGate(simulator.port)
    yield forwarder
    forwarder.close()


@pytest.fixture(scope="module")
def proxy(gate: TcpGate, tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Proxy]:
    """The proxy with short keep-alive, send-timeout and backoff settings, behind a cuttable link."""
    running = start_proxy(tmp_path_factory.mktemp("resilient"), f"http://127.0.0.1:{gate.port}/v1", env=FAST)
    yield running
    running.server.stop()


def _background(client: OpenAI, **metadata: str) -> list[t.Any]:
    """Every event of a background streamed create, read to its end through the proxy."""
    stream = client.responses.create(
        model="gpt-4o-mini", input="resilience", background=True, stream=True, metadata=metadata or None
    )
    return list(stream)


def _assert_whole(events: list[t.Any], first: int = 0) -> None:
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(first, first + len(numbers))), numbers
    assert events[-1].type == "response.completed"
    if first == 0:  # the text is whole only when every delta was seen here
        deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert deltas == events[-1].response.output_text


def test_background_stream_cut_once_is_resumed_transparently(client: OpenAI, proxy: Proxy) -> None:
    events = _background(client, sim_cut_after="5")
    _assert_whole(events)
    assert "resumed upstream stream POST /responses after sequence_number 4" in proxy.log()


def test_background_stream_cut_every_k_survives_a_dozen_resumes(client: OpenAI, proxy: Proxy) -> None:
    before = proxy.log().count("resumed upstream stream")
    events = _background(client, sim_cut_every="3", sim_words="36")
    _assert_whole(events)
    assert proxy.log().count("resumed upstream stream") - before >= 12


def test_retrieve_stream_cut_every_k_is_resumed(client: OpenAI) -> None:
    response_id, head = start_background(client, 2)
    rest = list(
        client.responses.retrieve(
            response_id, stream=True, starting_after=2, extra_query={"sim_cut_every": "4"}
        )
    )
    assert head == [0, 1, 2]
    _assert_whole(rest, first=3)


def test_non_background_stream_cut_still_raises(client: OpenAI, proxy: Proxy) -> None:
    stream = client.responses.create(
        model="gpt-4o-mini", input="not resumable", stream=True, metadata={"sim_cut_after": "5"}
    )
    with pytest.raises(openai.APIConnectionError):
        list(stream)
    assert "Traceback" not in proxy.log()  # an abort is a connection reset, not a crash


def test_silence_longer_than_keepalive_interval_gets_comments_at_event_boundaries(proxy: Proxy) -> None:
    body = {
        "model": "gpt-4o-mini",
        "input": "think",
        "stream": True,
        "metadata": {"sim_gap_at": "4", "sim_gap_s": "1.8"},
    }
    with requests.post(
        proxy.base_url + "/responses", json=body, headers=AUTH, stream=True, timeout=20
    ) as answer:
        raw = read_all(answer)
    assert raw.count(b": keep-alive\n\n") >= 2
    # Each keep-alive stands between whole events: the bytes before it end with a blank line.
    for piece in raw.split(b": keep-alive\n\n")[:-1]:
        assert piece == b"" or piece.endswith(b"\n\n")
    assert json.loads(raw.rsplit(b"data: ", 1)[1])["type"] == "response.completed"


def test_sdk_is_untroubled_by_keepalive_comments(client: OpenAI) -> None:
    events = _background(client, sim_gap_at="3", sim_gap_s="1.2")
    _assert_whole(events)


def _stream_in_thread(
    client: OpenAI, metadata: dict[str, str]
) -> tuple[threading.Thread, list[t.Any], list[BaseException]]:
    events: list[t.Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for event in client.responses.create(
                model="gpt-4o-mini", input="gate", background=True, stream=True, metadata=metadata
            ):
                events.append(event)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, events, errors


def _wait_for(predicate: t.Callable[[], bool], limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_upstream_unreachable_during_a_resume_then_back(client: OpenAI, gate: TcpGate) -> None:
    thread, events, errors = _stream_in_thread(client, {"sim_delay_ms": "40", "sim_words": "40"})
    _wait_for(lambda: len(events) >= 5)
    gate.down()  # cuts the stream and refuses the resumes...
    time.sleep(0.6)
    gate.up()  # ...until the upstream is back
    thread.join(20)
    assert not errors, errors
    _assert_whole(events)


def test_upstream_gone_for_good_during_a_resume_aborts_the_client(client: OpenAI, gate: TcpGate) -> None:
    thread, events, errors = _stream_in_thread(client, {"sim_delay_ms": "40", "sim_words": "40"})
    try:
        _wait_for(lambda: len(events) >= 5)
        gate.down()
        thread.join(20)
    finally:
        gate.up()
    assert len(errors) == 1 and isinstance(errors[0], openai.APIConnectionError), errors
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(len(numbers)))  # what arrived is whole, and the client can resume


def test_a_client_leaving_a_resumed_stream_frees_the_resumed_upstream_at_once(
    simulator: Simulator, tmp_path: Path
) -> None:
    """The watchdog shuts down the body the relay reads: after a resume that is the resumed one, not
    the first (already closed), which left the upstream streaming until the relay's next write, a
    keep-alive interval later at best."""
    slow = {**FAST, "WSGI_PROXY_KEEPALIVE_INTERVAL": "30"}
    running = start_proxy(tmp_path, simulator.base_url, env=slow)
    try:
        metadata = {"sim_cut_after": "3", "sim_gap_at": "6", "sim_gap_s": "20", "sim_delay_ms": "10"}
        body = {
            "model": "gpt-4o-mini",
            "input": "leave",
            "background": True,
            "stream": True,
            "metadata": metadata,
        }
        sock = raw_request(
            running.base_url + "/responses",
            "POST",
            {**AUTH, "Content-Type": "application/json"},
            json.dumps(body).encode(),
        )
        try:
            head = recv_until(sock, b'"sequence_number":5')  # after the resume, before the silence
            response_id = head.split(b'"id":"', 1)[1].split(b'"', 1)[0].decode()
        finally:
            # Read before the close: the upstream can be freed before this thread runs again.
            left_at = time.monotonic()
            sock.close()

        def resumed_closed() -> list[t.Any]:
            # The first upstream stream ended as "cut"; only the resumed one can see the client leave.
            return [
                c
                for c in simulator.stream_closures
                if c.response_id == response_id and c.reason == "client_gone"
            ]

        _wait_for(lambda: bool(resumed_closed()), limit=15)
        (closure,) = resumed_closed()
        assert closure.closed_at - left_at < 3
        assert "resumed upstream stream POST /responses after sequence_number" in running.log()
    finally:
        running.server.stop()


def test_stalled_client_is_disconnected_and_upstream_closed(proxy: Proxy, simulator: Simulator) -> None:
    body = json.dumps(
        {
            "model": "gpt-4o-mini",
            "input": "flood",
            "background": True,
            "stream": True,
            "metadata": {"sim_delta_bytes": "65536", "sim_words": "400", "sim_delay_ms": "0"},
        }
    ).encode()
    sock = raw_request(
        proxy.base_url + "/responses", "POST", {**AUTH, "Content-Type": "application/json"}, body
    )
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    head = recv_until(sock, b'"sequence_number":0')
    response_id = head.split(b'"id":"', 1)[1].split(b'"', 1)[0].decode()
    stalled_at = time.monotonic()  # from here on the client reads nothing
    try:
        _wait_for(lambda: any(c.response_id == response_id for c in simulator.stream_closures), limit=15)
    finally:
        sock.close()
    (closure,) = [c for c in simulator.stream_closures if c.response_id == response_id]
    assert closure.reason == "client_gone"
    assert closure.closed_at - stalled_at < 10
    assert "send timeout" in proxy.log()
    # Logged as what it is, not as a clean 200.
    _wait_for(lambda: '"error":"send_timeout"' in proxy.log(), limit=5)
    (line,) = [json.loads(x) for x in proxy.log().splitlines() if x.startswith("{") and '"send_timeout"' in x]
    assert (line["route"], line["status"], line["error"]) == ("create", 200, "send_timeout")


def test_retrieve_is_retried_on_503_and_reports_attempts(proxy: Proxy, simulator: Simulator) -> None:
    simulator.clear_requests()
    answer = requests.get(
        proxy.base_url + "/responses/resp_abc?sim_status=503&sim_retry_after=0.1", headers=AUTH, timeout=10
    )
    assert answer.status_code == 503
    assert answer.headers["X-Upstream-Attempts"] == "3"
    assert len(simulator.requests) == 3


def test_retry_after_longer_than_max_wait_is_relayed_at_once(proxy: Proxy, simulator: Simulator) -> None:
    simulator.clear_requests()
    answer = requests.get(
        proxy.base_url + "/responses/resp_abc?sim_status=429&sim_retry_after=30", headers=AUTH, timeout=10
    )
    assert answer.status_code == 429
    assert answer.headers["retry-after"] == "30"
    assert answer.headers["X-Upstream-Attempts"] == "1"
    assert len(simulator.requests) == 1


def test_create_that_reached_the_upstream_is_never_retried(proxy: Proxy, simulator: Simulator) -> None:
    simulator.clear_requests()
    answer = requests.post(
        proxy.base_url + "/responses",
        json={"model": "gpt-4o-mini", "input": "once", "metadata": {"sim_status": "500"}},
        headers=AUTH,
        timeout=10,
    )
    assert answer.status_code == 500
    assert answer.headers["X-Upstream-Attempts"] == "1"
    assert len(simulator.requests) == 1


def test_create_is_retried_when_the_upstream_refused_the_connection(proxy: Proxy, gate: TcpGate) -> None:
    gate.down()
    timer = threading.Timer(0.3, gate.up)
    timer.start()
    try:
        answer = requests.post(
            proxy.base_url + "/responses",
            json={"model": "gpt-4o-mini", "input": "retry"},
            headers=AUTH,
            timeout=10,
        )
    finally:
        timer.join()
    assert answer.status_code == 200, answer.text
    assert int(answer.headers["X-Upstream-Attempts"]) >= 2


def test_sighup_during_twenty_open_streams_every_client_completes(
    simulator: Simulator, tmp_path: Path
) -> None:
    proxy = start_proxy(tmp_path, simulator.base_url, env={"WSGI_PROXY_GRACEFUL_TIMEOUT": "5"})
    results: list[list[int]] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    resumed = [0]

    def client_run() -> None:
        try:
            with proxy.client() as client:
                numbers: list[int] = []
                stream: t.Iterable[t.Any] = client.responses.create(
                    model="gpt-4o-mini",
                    input="restart",
                    background=True,
                    stream=True,
                    metadata={"sim_delay_ms": "60", "sim_words": "60"},
                )
                response_id = ""
                while True:
                    try:
                        for event in stream:
                            if event.type == "response.created":
                                response_id = event.response.id
                            numbers.append(event.sequence_number)
                        break
                    except openai.APIConnectionError:  # the worker went away: resume elsewhere
                        with lock:
                            resumed[0] += 1
                        stream = client.responses.retrieve(
                            response_id, stream=True, starting_after=numbers[-1]
                        )
                with lock:
                    results.append(numbers)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            failures.append(exc)

    threads = [threading.Thread(target=client_run, daemon=True) for _ in range(20)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        proxy.server.signal(signal.SIGHUP)
        for thread in threads:
            thread.join(60)
    finally:
        proxy.server.stop()
    assert not failures, failures
    assert len(results) == 20
    for numbers in results:
        assert numbers == list(range(len(numbers)))
        assert len(numbers) > 60
    assert resumed[0] > 0  # the restart did cut streams, and their clients resumed to completion
