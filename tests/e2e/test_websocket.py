"""The Responses API's WebSocket mode through the proxy under gunicorn, with the official SDK's
``client.responses.connect()`` (and a raw ``websockets`` client where a test needs the frames or
close codes themselves), the simulator as the upstream."""

from __future__ import annotations

import json
import signal
import socket
import time
import typing as t
from pathlib import Path

import pytest
from openai import OpenAI
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect
from websockets.sync.connection import Connection

from wsgi_proxy.simulator import Simulator, SimulatorConfig
from wsgi_proxy.store import open_store

from .conftest import CLIENT_KEY, UPSTREAM_KEY, Proxy, start_proxy, start_red_and_blue

pytestmark = pytest.mark.e2e

MODEL = "gpt-4o-mini"


def _ws_url(proxy: Proxy, query: str = "") -> str:
    return proxy.base_url.replace("http://", "ws://") + "/responses" + query


def _raw(proxy: Proxy, key: str = CLIENT_KEY, query: str = "") -> ClientConnection:
    return ws_connect(
        _ws_url(proxy, query),
        additional_headers={"Authorization": f"Bearer {key}"},
        max_size=None,
        compression=None,
        ping_interval=None,
        open_timeout=10,
    )


def _frames_until_end(ws: Connection, ends: int = 1) -> list[bytes]:
    """Frames up to the ``ends``-th response end or error."""
    frames: list[bytes] = []
    while ends:
        frame = ws.recv(timeout=20, decode=False)
        frames.append(frame)
        if json.loads(frame)["type"] in ("response.completed", "response.failed", "error"):
            ends -= 1
    return frames


def _sdk_events(conn: t.Iterable[t.Any]) -> list[t.Any]:
    """The SDK connection's events up to the end of one response (or an error)."""
    events = []
    for event in conn:
        events.append(event)
        if event.type in ("response.completed", "error"):
            break
    return events


def _types(frames: list[bytes]) -> list[str]:
    return [json.loads(f)["type"] for f in frames]


def _wait(condition: t.Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture(scope="module")
def simulator() -> t.Iterator[Simulator]:
    sim = Simulator(config=SimulatorConfig(api_key=UPSTREAM_KEY, delay_ms=5, words=8)).start()
    yield sim
    sim.stop()


# --- one connection, the SDK's way ----------------------------------------------------------------


def test_one_turn_relays_the_upstreams_frames_byte_for_byte(proxy: Proxy, simulator: Simulator) -> None:
    with _raw(proxy) as ws:
        ws.send(json.dumps({"type": "response.create", "model": MODEL, "input": "one turn please"}))
        frames = _frames_until_end(ws)
    response_id = json.loads(frames[0])["response"]["id"]
    record = simulator.store.get(response_id)
    assert record is not None
    assert frames == [event.data for event in record.events]  # the very bytes the upstream sent
    assert _types(frames)[-1] == "response.completed"


def test_two_chained_turns_with_the_sdk(client: OpenAI) -> None:
    with client.responses.connect() as conn:
        conn.response.create(model=MODEL, input="first turn")
        first = next(e for e in conn if e.type == "response.completed").response
        # store=false: only the upstream connection's cache holds the first turn.
        conn.response.create(model=MODEL, input="second turn", previous_response_id=first.id, store=False)
        events = _sdk_events(conn)
    assert events[-1].type == "response.completed", events[-1]
    assert events[-1].response.previous_response_id == first.id
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_two_lanes_run_interleaved_each_whole(proxy: Proxy) -> None:
    with _raw(proxy) as ws:
        for lane in ("a", "b"):
            create = {
                "type": "response.create",
                "model": MODEL,
                "input": f"lane {lane} " * 4,
                "stream_id": lane,
            }
            ws.send(json.dumps(create))
        frames = _frames_until_end(ws, ends=2)
    lanes = [json.loads(f)["stream_id"] for f in frames]
    assert set(lanes) == {"a", "b"}
    assert lanes != sorted(lanes), "the lanes ran one after the other, not side by side"
    for lane in ("a", "b"):
        mine = [json.loads(f) for f in frames if json.loads(f)["stream_id"] == lane]
        assert [e["sequence_number"] for e in mine] == list(range(len(mine)))
        assert mine[-1]["type"] == "response.completed"


def test_frames_the_proxy_does_not_know_pass_through_untouched(proxy: Proxy, simulator: Simulator) -> None:
    steer = json.dumps({"type": "response.steer", "previous_response_id": "resp_x", "input": "left"})
    custom = '{"type":"x.custom.event" , "odd":[1,2.50,"\\u00e9"]}'
    with _raw(proxy) as ws:
        ws.send(json.dumps({"type": "response.create", "model": MODEL, "input": "warm", "generate": False}))
        warm = _frames_until_end(ws)
        response_id = json.loads(warm[0])["response"]["id"]
        steer = steer.replace("resp_x", response_id)  # a response of this connection's
        ws.send(steer)
        accepted = json.loads(ws.recv(timeout=10))
        ws.send(custom)
        unknown = json.loads(ws.recv(timeout=10))
    assert _types(warm) == ["response.created", "response.completed"]
    assert accepted["type"] == "response.steer.accepted"
    assert unknown["type"] == "error" and "x.custom.event" in unknown["error"]["message"]  # the upstream's
    assert simulator.frames[-2:] == [steer.encode(), custom.encode()]


def test_a_refused_key_gets_a_401_and_never_reaches_the_upstream(proxy: Proxy, simulator: Simulator) -> None:
    before = len(simulator.requests)
    with pytest.raises(InvalidStatus) as caught:
        _raw(proxy, key="sk-not-a-key-of-this-gateway")
    assert caught.value.response.status_code == 401
    assert json.loads(caught.value.response.body)["error"]["code"] == "invalid_api_key"
    assert len(simulator.requests) == before


def test_an_upstream_drop_mid_response_is_resumed_into_the_same_socket(
    client: OpenAI, simulator: Simulator
) -> None:
    with client.responses.connect() as conn:
        conn.response.create(model=MODEL, input="cut me " * 3, metadata={"sim_cut_after": "4"})
        events = _sdk_events(conn)
        # The connection is still usable: the next create opens a new upstream socket.
        conn.response.create(model=MODEL, input="after the cut")
        after = next(e for e in conn if e.type in ("response.completed", "error"))
    assert events[-1].type == "response.completed", events[-1]
    assert [e.sequence_number for e in events] == list(range(len(events)))  # nothing lost, nothing twice
    assert after.type == "response.completed"


def test_a_gone_client_closes_the_upstream_socket_at_once(proxy: Proxy, simulator: Simulator) -> None:
    assert _wait(lambda: simulator.open_websockets == 0)
    ws = _raw(proxy)
    ws.send(json.dumps({"type": "response.create", "model": MODEL, "input": "x", "generate": False}))
    _frames_until_end(ws)
    assert simulator.open_websockets == 1
    ws.socket.shutdown(socket.SHUT_RDWR)  # gone without a closing handshake
    ws.socket.close()
    started = time.monotonic()
    assert _wait(lambda: simulator.open_websockets == 0, timeout=5)
    assert time.monotonic() - started < 2


def test_secrets_stay_where_they_belong(proxy: Proxy, simulator: Simulator) -> None:
    with _raw(proxy) as ws:
        ws.send(
            json.dumps({"type": "response.create", "model": MODEL, "input": "secrets", "generate": False})
        )
        frames = _frames_until_end(ws)
    upgrade = [r for r in simulator.requests if r.headers.get("upgrade") == "websocket"][-1]
    assert upgrade.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert CLIENT_KEY not in json.dumps(upgrade.raw_headers)
    assert all(UPSTREAM_KEY.encode() not in f for f in frames)
    assert UPSTREAM_KEY not in proxy.log() and CLIENT_KEY not in proxy.log()


def test_each_create_and_each_connection_get_one_log_line(proxy: Proxy) -> None:
    with _raw(proxy) as ws:
        ws.send(json.dumps({"type": "response.create", "model": MODEL, "input": "log me"}))
        frames = _frames_until_end(ws)
    response_id = json.loads(frames[0])["response"]["id"]

    def lines() -> list[dict[str, t.Any]]:
        return [json.loads(line) for line in proxy.log().splitlines() if line.startswith('{"ts"')]

    def connections() -> list[dict[str, t.Any]]:
        return [
            ln for ln in lines() if ln["route"] == "websocket_create" and ln.get("frames_out") == len(frames)
        ]

    assert _wait(lambda: bool(connections()))
    creates = [ln for ln in lines() if ln["route"] == "ws_create" and ln.get("usage")]
    assert any(ln["status"] == 200 and ln["model"] == MODEL for ln in creates)
    connection = connections()
    assert connection[-1]["status"] == 101 and connection[-1]["close_code"] == 1000
    assert connection[-1]["creates"] == 1 and response_id


def test_serving_sessions_adds_no_thread_per_session(simulator: Simulator, tmp_path: Path) -> None:
    proxy = start_proxy(tmp_path, simulator.base_url, env={"WSGI_PROXY_WORKERS": "1"})

    def worker_threads() -> int:
        (child,) = Path(f"/proc/{proxy.server.pid}/task/{proxy.server.pid}/children").read_text().split()
        return len(list(Path(f"/proc/{child}/task").iterdir()))

    def hold(n: int) -> list[ClientConnection]:
        sockets = [_raw(proxy) for _ in range(n)]
        for ws in sockets:
            ws.send(json.dumps({"type": "response.create", "model": MODEL, "input": "x", "generate": False}))
            _frames_until_end(ws)
        return sockets

    try:
        for ws in hold(8):  # let gunicorn's thread pool grow to what eight connections take
            ws.close()
        time.sleep(0.3)
        before = worker_threads()
        held = hold(8)
        during = worker_threads()
        for ws in held:
            ws.close()
    finally:
        proxy.server.stop()
    # One thread per open socket (gunicorn's own): no reader thread, no event loop thread.
    assert during <= before, (before, during)


# --- limits and the lifecycle, each on a proxy of its own ------------------------------------------


def test_websocket_mode_off_gets_a_json_426(simulator: Simulator, tmp_path: Path) -> None:
    proxy = start_proxy(tmp_path, simulator.base_url, env={"WSGI_PROXY_WEBSOCKETS": "false"})
    try:
        with pytest.raises(InvalidStatus) as caught:
            _raw(proxy)
        assert caught.value.response.status_code == 426
        assert json.loads(caught.value.response.body)["error"]["code"] == "websocket_unavailable"
    finally:
        proxy.server.stop()


def test_an_upstream_without_websocket_mode_gets_clients_a_426(tmp_path: Path) -> None:
    config = SimulatorConfig(api_key=UPSTREAM_KEY, websockets=False)
    with Simulator(config=config) as plain:
        proxy = start_proxy(tmp_path, plain.base_url)
        try:
            with pytest.raises(InvalidStatus) as caught:
                _raw(proxy)
            assert caught.value.response.status_code == 426  # the upstream's 405, as clients need it
            with proxy.client() as client:  # and HTTP works, as the clients fall back to it
                assert client.responses.create(model=MODEL, input="http").status == "completed"
        finally:
            proxy.server.stop()


def test_the_age_limit_ends_an_idle_connection_with_openais_error_and_1001(
    simulator: Simulator, tmp_path: Path
) -> None:
    proxy = start_proxy(tmp_path, simulator.base_url, env={"WSGI_PROXY_WEBSOCKET_MAX_AGE": "1.5"})
    try:
        with _raw(proxy) as ws:
            ws.send(json.dumps({"type": "response.create", "model": MODEL, "input": "limit"}))
            assert _types(_frames_until_end(ws))[-1] == "response.completed"
            error = json.loads(ws.recv(timeout=10))
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
        assert error["error"]["code"] == "websocket_connection_limit_reached"
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    finally:
        proxy.server.stop()


def test_a_client_that_stops_answering_pings_is_dropped(simulator: Simulator, tmp_path: Path) -> None:
    proxy = start_proxy(tmp_path, simulator.base_url, env={"WSGI_PROXY_WEBSOCKET_PING_INTERVAL": "0.5"})
    try:
        assert _wait(lambda: simulator.open_websockets == 0)
        with socket.create_connection(
            ("127.0.0.1", int(proxy.root_url.rsplit(":", 1)[1])), timeout=10
        ) as sock:
            sock.sendall(
                b"GET /v1/responses HTTP/1.1\r\nHost: proxy\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                + f"Authorization: Bearer {CLIENT_KEY}\r\n\r\n".encode()
            )
            assert sock.recv(4096).startswith(b"HTTP/1.1 101 ")
            assert _wait(lambda: simulator.open_websockets == 1)
            # This peer reads nothing and answers no ping: after two intervals it is gone.
            assert _wait(lambda: simulator.open_websockets == 0, timeout=5)
        assert '"ended_by":"client_silent"' in proxy.log()
    finally:
        proxy.server.stop()


def test_sighup_closes_open_sessions_with_1012(simulator: Simulator, tmp_path: Path) -> None:
    proxy = start_proxy(tmp_path, simulator.base_url)
    try:
        sockets = [_raw(proxy) for _ in range(3)]
        for ws in sockets:
            ws.send(json.dumps({"type": "response.create", "model": MODEL, "input": "x", "generate": False}))
            _frames_until_end(ws)
        proxy.server.signal(signal.SIGHUP)
        codes = []
        for ws in sockets:
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
            codes.append(closed.value.rcvd.code if closed.value.rcvd else None)
        assert codes == [1012, 1012, 1012]
        # The new workers serve the reconnect.
        with _raw(proxy) as again:
            again.send(json.dumps({"type": "response.create", "model": MODEL, "input": "again"}))
            assert _types(_frames_until_end(again))[-1] == "response.completed"
    finally:
        proxy.server.stop()


# --- teams, limits and usage (a config file, a SQLite store) ---------------------------------------

KEYS = {
    "RED_KEY": "sk-red-ws-team-key-01",
    "BLUE_KEY": "sk-blue-ws-team-key-2",
    "SLOW_KEY": "sk-red-limited-ws-k3",
    "ONE_KEY": "sk-red-one-socket-k4",
}


@pytest.fixture(scope="module")
def gateway(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[tuple[Proxy, str]]:
    extra = (
        '[[keys]]\nname = "slow"\nteam = "red"\nkey_env = "SLOW_KEY"\nrpm = 2\n'
        '[[keys]]\nname = "one"\nteam = "red"\nkey_env = "ONE_KEY"\nmax_streams = 1\n'
    )
    proxy, store_url = start_red_and_blue(
        tmp_path_factory.mktemp("wsgw"), simulator.base_url, KEYS, extra=extra
    )
    yield proxy, store_url
    proxy.server.stop()


def _sdk(proxy: Proxy, key: str) -> OpenAI:
    return OpenAI(base_url=proxy.base_url, api_key=KEYS[key], max_retries=0, timeout=30)


def test_another_teams_previous_response_id_is_refused_not_relayed(
    gateway: tuple[Proxy, str], simulator: Simulator
) -> None:
    proxy, _ = gateway
    with _sdk(proxy, "RED_KEY") as red, red.responses.connect() as conn:
        conn.response.create(model=MODEL, input="red's own")
        red_id = next(e for e in conn if e.type == "response.completed").response.id
    frames_before = len(simulator.frames)
    with _raw(proxy, key=KEYS["BLUE_KEY"]) as ws:
        ws.send(
            json.dumps(
                {"type": "response.create", "model": MODEL, "input": "steal", "previous_response_id": red_id}
            )
        )
        refused = json.loads(ws.recv(timeout=10))
        ws.send(json.dumps({"type": "response.steer", "previous_response_id": red_id, "input": "steer it"}))
        steer_refused = json.loads(ws.recv(timeout=10))
    for frame in (refused, steer_refused):
        assert frame["type"] == "error" and frame["status"] == 404
        assert frame["error"]["param"] is None or frame["error"]["param"] == "previous_response_id"
        assert red_id in frame["error"]["message"]
    assert len(simulator.frames) == frames_before  # neither reached the upstream


def test_a_teams_own_response_continues_on_a_new_connection_and_usage_counts_once(
    gateway: tuple[Proxy, str],
) -> None:
    proxy, store_url = gateway
    with _sdk(proxy, "BLUE_KEY") as blue:
        with blue.responses.connect() as conn:
            conn.response.create(model=MODEL, input="blue counts")
            first = next(e for e in conn if e.type == "response.completed").response
        with blue.responses.connect() as conn:  # stored: another connection may continue it
            conn.response.create(model=MODEL, input="and on", previous_response_id=first.id)
            second = next(e for e in conn if e.type in ("response.completed", "error"))
    assert second.type == "response.completed"
    store = open_store(store_url)
    try:
        assert _wait(lambda: sum(r.responses for r in store.usage_totals() if r.key_name == "blue") == 2)
        rows = [r for r in store.usage_totals() if r.key_name == "blue"]
        assert (
            sum(r.usage.total_tokens for r in rows)
            == first.usage.total_tokens + second.response.usage.total_tokens
        )
        assert store.get_response(first.id) is not None and store.get_response(first.id).team == "blue"
    finally:
        store.close()


def test_creates_count_against_the_keys_requests_per_minute(gateway: tuple[Proxy, str]) -> None:
    proxy, _ = gateway
    create = json.dumps({"type": "response.create", "model": MODEL, "input": "x", "generate": False})
    with _raw(proxy, key=KEYS["SLOW_KEY"]) as ws:  # the handshake was the first request of the minute
        ws.send(create)
        first = _frames_until_end(ws)
        ws.send(create)
        limited = json.loads(ws.recv(timeout=10))
    assert _types(first)[-1] == "response.completed"
    assert limited["type"] == "error" and limited["status"] == 429
    assert "Retry-After" in limited["error"]["headers"]


def test_an_open_connection_holds_one_of_the_keys_stream_slots(gateway: tuple[Proxy, str]) -> None:
    proxy, _ = gateway
    with _raw(proxy, key=KEYS["ONE_KEY"]):
        with pytest.raises(InvalidStatus) as caught:
            _raw(proxy, key=KEYS["ONE_KEY"])
        assert caught.value.response.status_code == 429
        assert json.loads(caught.value.response.body)["error"]["type"] == "rate_limit_error"
    # Closed, the slot is free again (released when the session ends).
    assert _wait(lambda: _opens(proxy, KEYS["ONE_KEY"]))


def _opens(proxy: Proxy, key: str) -> bool:
    try:
        with _raw(proxy, key=key):
            return True
    except InvalidStatus:
        return False


def test_a_bad_create_gets_an_error_frame_naming_the_field(
    gateway: tuple[Proxy, str], simulator: Simulator
) -> None:
    proxy, _ = gateway
    before = len(simulator.frames)
    with _raw(proxy, key=KEYS["RED_KEY"]) as ws:
        ws.send(
            json.dumps({"type": "response.create", "model": MODEL, "input": "x", "stream_id": "bad lane!"})
        )
        bad_lane = json.loads(ws.recv(timeout=10))
        ws.send(json.dumps({"type": "response.create", "model": MODEL, "background": True}))
        background = json.loads(ws.recv(timeout=10))
        ws.send("not json")
        not_json = json.loads(ws.recv(timeout=10))
    assert (bad_lane["error"]["param"], bad_lane["error"]["code"]) == ("stream_id", "invalid_stream_id")
    assert background["error"]["param"] == "background"
    assert not_json["status"] == 400 and not_json["error"]["type"] == "invalid_request_error"
    assert len(simulator.frames) == before


def test_the_sdk_sees_an_error_frame_as_an_error_event(gateway: tuple[Proxy, str]) -> None:
    proxy, _ = gateway
    with _sdk(proxy, "RED_KEY") as red, red.responses.connect() as conn:
        conn.response.create(model=MODEL, input="x", previous_response_id="resp_nobody_has_this")
        event = next(iter(conn))
    assert event.type == "error"
    assert event.error.code is None or isinstance(event.error.code, str)
