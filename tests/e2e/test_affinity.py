"""Session affinity: the calls of one session stay on one account of a model with two weighted
routes, until that account is down."""

from __future__ import annotations

import json
import typing as t

import pytest
from openai import OpenAI
from websockets.sync.client import connect as ws_connect

from wsgi_proxy.simulator import Simulator, SimulatorConfig

from .conftest import UPSTREAM_KEY, Proxy, start_proxy

pytestmark = pytest.mark.e2e

KEY = "sk-affinity-team-key-001"
MODEL = "gpt-4o-mini"


@pytest.fixture
def accounts() -> t.Iterator[dict[str, Simulator]]:
    running = {
        name: Simulator(config=SimulatorConfig(api_key=UPSTREAM_KEY, delay_ms=1, words=2)).start()
        for name in ("east", "west")
    }
    yield running
    for sim in running.values():
        sim.stop()


@pytest.fixture
def gateway(accounts: dict[str, Simulator], tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Proxy]:
    directory = tmp_path_factory.mktemp("affinity")
    upstreams = "".join(
        f'[[upstreams]]\nname = "{name}"\nurl = "{sim.base_url}"\napi_key_env = "UPSTREAM_KEY"\n'
        for name, sim in accounts.items()
    )
    path = directory / "gateway.toml"
    path.write_text(
        f'store_url = "sqlite:///{directory / "state.db"}"\n{upstreams}'
        f'[[models]]\nname = "{MODEL}"\nroutes = [{{ upstream = "east" }}, {{ upstream = "west" }}]\n'
        '[teams.t]\n[[keys]]\nname = "k"\nteam = "t"\nkey_env = "CLIENT"\n'
    )
    proxy = start_proxy(
        directory, None, env={"WSGI_PROXY_CONFIG": str(path), "UPSTREAM_KEY": UPSTREAM_KEY, "CLIENT": KEY}
    )
    yield proxy
    proxy.server.stop()


def _served_by(accounts: dict[str, Simulator]) -> dict[str, int]:
    return {name: sum(r.path.endswith("/responses") for r in sim.requests) for name, sim in accounts.items()}


def _turns(proxy: Proxy, count: int, **fields: t.Any) -> None:
    with OpenAI(base_url=proxy.base_url, api_key=KEY, max_retries=0, timeout=30) as client:
        for n in range(count):
            client.responses.create(model=MODEL, input=f"turn {n}", store=False, **fields)


def test_twenty_turns_of_one_session_stay_on_one_account(
    gateway: Proxy, accounts: dict[str, Simulator]
) -> None:
    _turns(gateway, 20, prompt_cache_key="session-a")
    served = _served_by(accounts)
    assert sorted(served.values()) == [0, 20], served
    for sim in accounts.values():
        sim.clear_requests()
    _turns(gateway, 20)  # without a session: the routes' weights spread them
    assert all(n > 0 for n in _served_by(accounts).values())


def test_codexs_session_header_pins_http_and_websocket_calls(
    gateway: Proxy, accounts: dict[str, Simulator]
) -> None:
    headers = {"Session-Id": "codex-session-1"}
    with OpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0, default_headers=headers) as client:
        for n in range(10):
            client.responses.create(model=MODEL, input=f"http {n}")
    url = gateway.base_url.replace("http://", "ws://") + "/responses"
    for _ in range(5):
        with ws_connect(url, additional_headers={"Authorization": f"Bearer {KEY}", **headers}) as ws:
            ws.send(json.dumps({"type": "response.create", "model": MODEL, "input": "ws", "generate": False}))
            while json.loads(ws.recv(timeout=10))["type"] != "response.completed":
                pass
    upgrades = {
        name: sum(r.headers.get("upgrade") == "websocket" for r in sim.requests)
        for name, sim in accounts.items()
    }
    served = _served_by(accounts)
    pinned = max(served, key=lambda name: served[name])
    assert served[pinned] == 10 + 5 and upgrades[pinned] == 5, (served, upgrades)


def test_a_session_leaves_its_account_only_when_it_is_down(
    gateway: Proxy, accounts: dict[str, Simulator]
) -> None:
    _turns(gateway, 5, prompt_cache_key="session-b")
    served = _served_by(accounts)
    pinned = max(served, key=lambda name: served[name])
    other = next(name for name in accounts if name != pinned)
    accounts[pinned].stop()
    _turns(gateway, 10, prompt_cache_key="session-b")
    assert _served_by({other: accounts[other]})[other] == 10
    log = gateway.log()
    assert f"a session pinned to upstream {pinned} was served by {other}" in log
