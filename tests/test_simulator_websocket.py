"""The simulator's WebSocket mode, spoken to directly: what the proxy's tests and benchmarks rely on."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
import typing as t

import pytest
import requests
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.sync.connection import Connection

from wsgi_proxy.simulator import Simulator, SimulatorConfig

KEY = "sk-simulator-ws-key"


@pytest.fixture
def sim() -> t.Iterator[Simulator]:
    with Simulator(config=SimulatorConfig(api_key=KEY, delay_ms=1, words=3)) as running:
        yield running


def _open(sim: Simulator, key: str = KEY) -> ClientConnection:
    url = sim.base_url.replace("http://", "ws://") + "/responses"
    return connect(
        url, additional_headers={"Authorization": f"Bearer {key}"}, max_size=None, compression=None
    )


def _until_end(ws: Connection) -> list[dict[str, t.Any]]:
    events: list[dict[str, t.Any]] = []
    while not events or events[-1]["type"] not in ("response.completed", "error"):
        events.append(json.loads(ws.recv(timeout=10)))
    return events


def _create(**fields: t.Any) -> str:
    return json.dumps({"type": "response.create", "model": "gpt-4o-mini", "input": "hello", **fields})


def test_a_create_streams_the_sse_events_as_frames(sim: Simulator) -> None:
    with _open(sim) as ws:
        ws.send(_create(stream_id="l1"))
        events = _until_end(ws)
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert {e["stream_id"] for e in events} == {"l1"}
    assert sim.frames == [_create(stream_id="l1").encode()]


def test_store_false_chains_live_on_their_connection_only(sim: Simulator) -> None:
    with _open(sim) as ws:
        ws.send(_create(store=False))
        first = _until_end(ws)[-1]["response"]["id"]
        ws.send(_create(store=False, previous_response_id=first))
        assert _until_end(ws)[-1]["type"] == "response.completed"
    with _open(sim) as other:
        other.send(_create(previous_response_id=first))
        error = _until_end(other)[-1]
    assert error["error"]["code"] == "previous_response_not_found"


def test_a_warm_up_returns_an_id_without_output(sim: Simulator) -> None:
    with _open(sim) as ws:
        ws.send(_create(generate=False))
        events = _until_end(ws)
    assert [e["type"] for e in events] == ["response.created", "response.completed"]
    assert events[-1]["response"]["output"] == []


def test_a_stored_response_made_here_can_be_streamed_over_http(sim: Simulator) -> None:
    with _open(sim) as ws:
        ws.send(_create())
        events = _until_end(ws)
    answer = requests.get(
        f"{sim.base_url}/responses/{events[0]['response']['id']}",
        params={"stream": "true", "starting_after": "2"},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=10,
    )
    assert answer.status_code == 200
    assert f'"sequence_number":{len(events) - 1}' in answer.text and '"sequence_number":2,' not in answer.text


@pytest.mark.parametrize(("mode", "code"), [("abort", None), ("clean", 1000)])
def test_sim_cut_after_drops_the_connection(sim: Simulator, mode: str, code: int | None) -> None:
    with _open(sim) as ws:
        ws.send(_create(metadata={"sim_cut_after": "2", "sim_cut_mode": mode}))
        received = [ws.recv(timeout=10), ws.recv(timeout=10)]
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert len(received) == 2
    assert (closed.value.rcvd.code if closed.value.rcvd else None) == code


def test_the_age_limit_sends_openais_error_then_1001() -> None:
    with Simulator(config=SimulatorConfig(websocket_max_age_s=0.3)) as sim, _open(sim) as ws:
        error = json.loads(ws.recv(timeout=10))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert error["error"]["code"] == "websocket_connection_limit_reached"
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001


def test_upgrades_need_the_key_and_the_mode(sim: Simulator) -> None:
    with pytest.raises(InvalidStatus) as refused:
        _open(sim, key="sk-wrong")
    assert refused.value.response.status_code == 401
    with Simulator(config=SimulatorConfig(websockets=False)) as plain:
        with pytest.raises(InvalidStatus) as absent:
            _open(plain)
    assert absent.value.response.status_code == 405


def test_errors_name_the_lane_and_unknown_types_are_refused(sim: Simulator) -> None:
    with _open(sim) as ws:
        ws.send(_create(stream_id="x", background=True))
        background = json.loads(ws.recv(timeout=10))
        ws.send(json.dumps({"type": "mystery", "stream_id": "y"}))
        unknown = json.loads(ws.recv(timeout=10))
    assert (background["stream_id"], background["error"]["param"]) == ("x", "background")
    assert unknown["stream_id"] == "y" and "mystery" in unknown["error"]["message"]


def _raw_upgrade(sim: Simulator) -> socket.socket:
    sock = socket.create_connection((sim.host, sim.port), timeout=5)
    nonce = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /v1/responses HTTP/1.1\r\nHost: {sim.host}\r\nAuthorization: Bearer {KEY}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: {nonce}\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def test_an_idle_session_holds_one_thread_and_answers_pings(sim: Simulator) -> None:
    before = threading.active_count()
    sockets = [_raw_upgrade(sim) for _ in range(20)]
    try:
        assert threading.active_count() - before <= 20  # the handler's own thread, no reader beside it
        mask = b"\x01\x02\x03\x04"
        sockets[0].sendall(bytes([0x89, 0x84]) + mask + bytes(b ^ mask[i] for i, b in enumerate(b"ping")))
        assert sockets[0].recv(64) == bytes([0x8A, 0x04]) + b"ping"  # the pong, unmasked from a server
    finally:
        for sock in sockets:
            sock.close()
    deadline = time.monotonic() + 5
    while sim.open_websockets and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sim.open_websockets == 0
