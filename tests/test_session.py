"""The WebSocket session without Flask or gunicorn: ``Gateway.websocket`` on one end of a socket pair,
the simulator (in this process) as the upstream, websockets' sync client protocol on the other end."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import typing as t
from pathlib import Path

import pytest
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.protocol import OPEN
from websockets.sync.connection import Connection
from websockets.uri import parse_uri

from wsgi_proxy.config import ProxySettings
from wsgi_proxy.errors import WebSocketUnavailable
from wsgi_proxy.gateway import session
from wsgi_proxy.gateway.call import Call
from wsgi_proxy.gateway.core import Gateway
from wsgi_proxy.gateway.session import SessionStats
from wsgi_proxy.gateway.state import GatewayState
from wsgi_proxy.observe.record import RequestRecord
from wsgi_proxy.simulator import Simulator, SimulatorConfig

UPSTREAM_KEY = "sk-session-upstream-key"
CLIENT = "sk-session-client-key-01"
MODEL = "gpt-4o-mini"


@pytest.fixture(scope="module")
def sim() -> t.Iterator[Simulator]:
    with Simulator(config=SimulatorConfig(api_key=UPSTREAM_KEY, delay_ms=1, words=4)) as running:
        yield running


def _gateway(sim: Simulator, **settings: t.Any) -> Gateway:
    values = {"upstream_url": sim.base_url, "upstream_api_key": UPSTREAM_KEY, "api_keys": CLIENT}
    return Gateway.build(ProxySettings.model_validate(values | settings))


class _Served:
    """A session served on a thread, and the client's end of it."""

    def __init__(
        self, gateway: Gateway, query: bytes = b"", *, reading: bool = True, anonymous: bool = False
    ) -> None:
        server_end, self.client_end = socket.socketpair()
        self.record = RequestRecord("req_session", "GET", "websocket_create")
        tenant = gateway.authenticate(None if anonymous else f"Bearer {CLIENT}", self.record)
        call = Call("GET", "/responses", query, (("Authorization", f"Bearer {CLIENT}"),))
        self.stats: SessionStats | None = None
        self.handshakes: list[list[tuple[str, str]]] = []

        def serve() -> None:
            self.stats = gateway.websocket(call, tenant, self.record, server_end, self.handshakes.append)
            server_end.close()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        if reading:  # else nobody reads the client's end: no pong, no close frame
            protocol = ClientProtocol(parse_uri("ws://proxy.test/v1/responses"), state=OPEN, max_size=None)
            self.client = Connection(self.client_end, protocol, ping_interval=None)

    def turn(self, **fields: t.Any) -> list[dict[str, t.Any]]:
        self.client.send(
            json.dumps({"type": "response.create", "model": MODEL, "input": "hi there", **fields})
        )
        events: list[dict[str, t.Any]] = []
        while not events or events[-1]["type"] not in ("response.completed", "error"):
            events.append(json.loads(self.client.recv(timeout=10)))
        return events

    def close(self) -> SessionStats:
        self.client.close()
        self.thread.join(10)
        assert self.stats is not None
        return self.stats


def test_a_session_relays_turns_without_an_event_loop_or_a_thread_of_its_own(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_loop(*args: object, **kwargs: object) -> t.NoReturn:
        raise AssertionError("an event loop was made")

    monkeypatch.setattr(asyncio.BaseEventLoop, "__init__", no_loop)
    served = _Served(_gateway(sim))
    first = served.turn()
    # The client's Connection runs one reader thread; the session runs on its own thread only.
    threads = threading.active_count()
    second = served.turn(previous_response_id=first[-1]["response"]["id"], store=False)
    assert threading.active_count() == threads
    stats = served.close()
    assert first[-1]["type"] == second[-1]["type"] == "response.completed"
    assert (stats.creates, stats.frames_in, stats.upstream_connections) == (2, 2, 1)
    assert stats.frames_out == len(first) + len(second)
    assert served.handshakes == [[("X-Request-ID", "req_session")]]


def test_a_drop_mid_response_is_resumed_over_http_into_the_session(sim: Simulator) -> None:
    served = _Served(_gateway(sim, resume_backoff=0.01))
    events = served.turn(metadata={"sim_cut_after": "3"}, stream_id="lane-x")
    after = served.turn()
    stats = served.close()
    assert events[-1]["type"] == "response.completed"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert {e["stream_id"] for e in events} == {"lane-x"}  # resumed events name their lane too
    assert after[-1]["type"] == "response.completed"
    assert (stats.resumes, stats.upstream_connections) == (1, 2)


def test_a_drop_that_cannot_be_resumed_is_an_error_frame_not_an_end(sim: Simulator) -> None:
    served = _Served(_gateway(sim))
    events = served.turn(metadata={"sim_cut_after": "3"}, store=False)
    served.close()
    assert events[-1]["type"] == "error"
    assert events[-1]["status"] == 502 and events[-1]["error"]["code"] == "upstream_unavailable"
    assert len(events) == 4


def test_the_age_limit_waits_for_the_running_response(sim: Simulator) -> None:
    served = _Served(_gateway(sim, websocket_max_age=0.2))
    events = served.turn(metadata={"sim_delay_ms": "60"})  # runs past the limit
    limit = json.loads(served.client.recv(timeout=10))
    with pytest.raises(ConnectionClosed) as closed:
        served.client.recv(timeout=10)
    served.thread.join(10)
    assert events[-1]["type"] == "response.completed"
    assert limit["error"]["code"] == "websocket_connection_limit_reached"
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert served.stats is not None and served.stats.ended_by == "age_limit"


def test_a_client_silent_past_the_ping_interval_is_dropped(sim: Simulator) -> None:
    served = _Served(_gateway(sim, websocket_ping_interval=0.2), reading=False)
    served.thread.join(10)
    served.client_end.close()
    assert served.stats is not None and served.stats.ended_by == "client_silent"


def test_the_mode_off_or_an_upstream_without_it_is_a_426_before_anything(
    sim: Simulator, tmp_path: Path
) -> None:
    for gateway in (_gateway(sim, websockets=False), _gateway(sim, upstream_websockets="off")):
        record = RequestRecord("req_off", "GET", "websocket_create")
        tenant = gateway.authenticate(f"Bearer {CLIENT}", record)
        server_end, client_end = socket.socketpair()
        with server_end, client_end, pytest.raises(WebSocketUnavailable):
            gateway.websocket(Call("GET", "/responses"), tenant, record, server_end, lambda extra: None)


def test_a_connection_stays_with_its_upstream(sim: Simulator, tmp_path: Path) -> None:
    with Simulator(config=SimulatorConfig(delay_ms=1, words=2)) as other:
        config = tmp_path / "gw.toml"
        config.write_text(
            f'allow_anonymous = true\nstore_url = "sqlite:///{tmp_path / "s.db"}"\n'
            f'[[upstreams]]\nname = "one"\nurl = "{sim.base_url}"\napi_key_env = "UP"\n'
            f'[[upstreams]]\nname = "two"\nurl = "{other.base_url}"\n'
            '[[models]]\nname = "gpt-4o-mini"\nupstream = "one"\n'
            '[[models]]\nname = "gpt-5"\nupstream = "two"\n'
        )
        gateway = Gateway(GatewayState.build(ProxySettings(config=config), {"UP": UPSTREAM_KEY}))
        elsewhere = _Served(gateway, anonymous=True)
        on_two = elsewhere.turn(model="gpt-5")[-1]["response"]["id"]
        elsewhere.close()
        served = _Served(gateway, anonymous=True)
        assert served.turn()[-1]["type"] == "response.completed"  # gpt-4o-mini: bound to "one"
        other_model = served.turn(model="gpt-5")[-1]
        other_previous = served.turn(previous_response_id=on_two)[-1]
        served.close()
    assert (other_model["type"], other_model["error"]["param"]) == ("error", "model")
    assert other_previous["type"] == "error" and on_two in other_previous["error"]["message"]
    assert "new WebSocket connection" in other_model["error"]["message"]


class _CountingGate:
    """The departures' semaphore, counting how many sessions are inside at once."""

    def __init__(self, size: int) -> None:
        self._semaphore = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self.inside = self.most = self.passed = 0

    def __enter__(self) -> None:
        self._semaphore.acquire()
        with self._lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
        time.sleep(0.02)  # long enough for the others to pile up at the gate

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.inside -= 1
            self.passed += 1
        self._semaphore.release()


def test_sessions_that_end_together_release_what_they_hold_a_few_at_a_time(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = _CountingGate(2)
    monkeypatch.setattr(session, "_departures", gate)
    gateway = _gateway(sim)
    served = [_Served(gateway) for _ in range(12)]
    for one in served:
        assert one.turn()[-1]["type"] == "response.completed"  # each holds its upstream connection
    leaving = [threading.Thread(target=one.close) for one in served]
    for thread in leaving:
        thread.start()
    for thread in leaving:
        thread.join(20)
    assert all(one.stats is not None and one.stats.ended_by == "client" for one in served)
    assert gate.passed == 12 and gate.most == 2  # all released, never more than two at once
