"""Two upstreams (one speaking Azure's wire), teams and limits from a config file, under gunicorn,
with the store in Redis shared by two gateway instances."""

from __future__ import annotations

import time
import typing as t
from pathlib import Path

import openai
import pytest
import requests
from openai import OpenAI

from wsgi_proxy.simulator import Simulator, SimulatorConfig
from wsgi_proxy.tools.launch import free_port

from ..envelope import assert_error
from .conftest import Proxy, start_background, start_proxy, usage_rows

pytestmark = pytest.mark.e2e

KEYS = {
    "RED_KEY": "sk-red-team-key-01",
    "BLUE_KEY": "sk-blue-team-key-02",
    "LIMITED_KEY": "sk-red-limited-k3",
}
SECRETS = {"MAIN_UPSTREAM_KEY": "sk-main-upstream-s1", "AZURE_UPSTREAM_KEY": "azure-upstream-s2"}


def _config(main: Simulator, azure: Simulator, store_url: str) -> str:
    return f"""
store_url = "{store_url}"

[[upstreams]]
name = "main"
url = "{main.base_url}"
api_key_env = "MAIN_UPSTREAM_KEY"

[[upstreams]]
name = "azure"
kind = "azure"
url = "{azure.base_url}"
api_key_env = "AZURE_UPSTREAM_KEY"

[[upstreams]]
name = "down"
url = "http://127.0.0.1:{free_port()}/v1"
api_key_env = "MAIN_UPSTREAM_KEY"

[[models]]
name = "gpt-4o-mini"
upstream = "main"

[[models]]
name = "gpt-azure"
routes = [{{ upstream = "azure", deployment = "azure-mini" }}]

[[models]]
name = "gpt-failover"
routes = [{{ upstream = "down", weight = 1000000 }}, {{ upstream = "main", weight = 0.000001 }}]

[teams.red]
[teams.blue]

[[keys]]
name = "red"
team = "red"
key_env = "RED_KEY"

[[keys]]
name = "blue"
team = "blue"
key_env = "BLUE_KEY"

[[keys]]
name = "limited"
team = "red"
key_env = "LIMITED_KEY"
rpm = 3
"""


@pytest.fixture(scope="module")
def upstreams() -> t.Iterator[tuple[Simulator, Simulator]]:
    main = Simulator(config=SimulatorConfig(api_key=SECRETS["MAIN_UPSTREAM_KEY"], delay_ms=10)).start()
    azure = Simulator(
        config=SimulatorConfig(api_key=SECRETS["AZURE_UPSTREAM_KEY"], delay_ms=10, flavor="azure-v1")
    ).start()
    yield main, azure
    main.stop()
    azure.stop()


@pytest.fixture(scope="module")
def config_env(
    upstreams: tuple[Simulator, Simulator], redis_server: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    path = tmp_path_factory.mktemp("gateway") / "gateway.toml"
    path.write_text(_config(*upstreams, redis_server))
    return {"WSGI_PROXY_CONFIG": str(path), **KEYS, **SECRETS}


@pytest.fixture(scope="module")
def gateways(config_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[list[Proxy]]:
    """Two gateway instances on different ports sharing one Redis."""
    running = [start_proxy(tmp_path_factory.mktemp(f"gw{n}"), None, env=config_env) for n in (1, 2)]
    yield running
    for proxy in running:
        proxy.server.stop()


def _client(proxy: Proxy, key: str) -> OpenAI:
    return OpenAI(base_url=proxy.base_url, api_key=KEYS[key], max_retries=0, timeout=30)


def test_models_go_to_their_upstreams_with_their_wire(
    gateways: list[Proxy], upstreams: tuple[Simulator, Simulator]
) -> None:
    main, azure = upstreams
    main.clear_requests()
    azure.clear_requests()
    with _client(gateways[0], "RED_KEY") as client:
        client.responses.create(model="gpt-4o-mini", input="to main")
        client.responses.create(model="gpt-azure", input="to azure")
    (to_main,) = main.requests
    (to_azure,) = azure.requests
    assert to_main.headers["authorization"] == f"Bearer {SECRETS['MAIN_UPSTREAM_KEY']}"
    assert to_azure.headers["api-key"] == SECRETS["AZURE_UPSTREAM_KEY"]
    assert "authorization" not in to_azure.headers
    assert to_azure.json()["model"] == "azure-mini"


def test_lifecycle_reaches_the_holder_from_either_gateway(
    gateways: list[Proxy], upstreams: tuple[Simulator, Simulator]
) -> None:
    main, azure = upstreams
    with _client(gateways[0], "RED_KEY") as first:
        response_id, head = start_background(first, 3, sim_delay_ms="20")
    azure.clear_requests()
    main.clear_requests()
    with _client(gateways[1], "RED_KEY") as second:  # created on one instance, resumed on the other
        rest = list(second.responses.retrieve(response_id, stream=True, starting_after=3))
        second.responses.input_items.list(response_id)
        second.responses.retrieve(response_id)
        second.responses.delete(response_id)
    numbers = head + [e.sequence_number for e in rest]
    assert numbers == list(range(len(numbers)))
    assert len(main.requests) == 4 and azure.requests == []


def test_create_fails_over_when_the_first_upstream_is_down(
    gateways: list[Proxy], upstreams: tuple[Simulator, Simulator]
) -> None:
    main, _ = upstreams
    main.clear_requests()
    with _client(gateways[0], "RED_KEY") as client:
        response = client.responses.create(model="gpt-failover", input="fail over")
        assert response.status == "completed"
        assert client.responses.retrieve(response.id).id == response.id  # remembered as main's
    assert len(main.requests) == 2


def test_another_team_cannot_see_resume_cancel_delete_or_continue(
    gateways: list[Proxy], upstreams: tuple[Simulator, Simulator]
) -> None:
    main, azure = upstreams
    with _client(gateways[0], "RED_KEY") as red:
        created = red.responses.create(
            model="gpt-azure", input="red's", background=True, metadata={"sim_delay_ms": "100"}
        )
    main.clear_requests()
    azure.clear_requests()
    rid = created.id
    with _client(gateways[1], "BLUE_KEY") as blue:
        attempts: list[t.Callable[[], object]] = [
            lambda: blue.responses.retrieve(rid),
            lambda: list(blue.responses.retrieve(rid, stream=True, starting_after=0)),
            lambda: blue.responses.cancel(rid),
            lambda: blue.responses.delete(rid),
            lambda: blue.responses.input_items.list(rid),
            lambda: blue.responses.create(model="gpt-azure", input="mine now", previous_response_id=rid),
        ]
        for attempt in attempts:
            with pytest.raises(openai.NotFoundError) as caught:
                attempt()
            assert "not found" in caught.value.message
    assert main.requests == [] and azure.requests == []
    with _client(gateways[0], "RED_KEY") as red:
        assert red.responses.cancel(rid).status == "cancelled"  # the owner still can


def _away_from_a_minute_boundary() -> None:
    # Limits count per clock minute: a run that straddles two minutes would count in both.
    if 60 - time.time() % 60 < 3:
        time.sleep(3.1)


def test_limits_are_counted_across_gateway_instances(gateways: list[Proxy]) -> None:
    _away_from_a_minute_boundary()
    answers = []
    for proxy in (gateways[0], gateways[1], gateways[0], gateways[1]):
        answers.append(
            requests.get(
                proxy.base_url + "/models",
                headers={"Authorization": f"Bearer {KEYS['LIMITED_KEY']}"},
                timeout=5,
            )
        )
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert_error(answers[-1], 429, code="rate_limit_exceeded")
    assert int(answers[-1].headers["Retry-After"]) >= 1


def test_models_lists_the_gateway_catalogue(gateways: list[Proxy]) -> None:
    with _client(gateways[1], "BLUE_KEY") as client:
        assert sorted(m.id for m in client.models.list()) == ["gpt-4o-mini", "gpt-azure", "gpt-failover"]


def test_bad_config_file_stops_gunicorn_with_one_sentence(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[upstreams]]\nname = "x"\nurl = "ftp://nowhere"\n')
    with pytest.raises(RuntimeError, match="exited with status") as caught:
        start_proxy(tmp_path, None, env={"WSGI_PROXY_CONFIG": str(path)})
    log = str(caught.value)
    assert "upstreams[0] (name 'x').url" in log
    assert "Traceback" not in log


def test_client_keys_never_reach_an_upstream_and_no_secret_is_logged(
    gateways: list[Proxy], upstreams: tuple[Simulator, Simulator]
) -> None:
    main, azure = upstreams
    with _client(gateways[0], "RED_KEY") as client:
        client.responses.create(model="gpt-azure", input="canary")
        list(client.responses.create(model="gpt-4o-mini", input="canary", stream=True))
    seen = repr([(r.headers, r.body) for r in main.requests + azure.requests])
    for secret in KEYS.values():
        assert secret not in seen
    logs = gateways[0].log() + gateways[1].log()
    for secret in [*KEYS.values(), *SECRETS.values()]:
        assert secret not in logs


def test_usage_of_a_resumed_and_replayed_stream_is_counted_once(
    gateways: list[Proxy], config_env: dict[str, str]
) -> None:
    with _client(gateways[0], "BLUE_KEY") as client:
        events = list(
            client.responses.create(
                model="gpt-4o-mini",
                input="usage",
                background=True,
                stream=True,
                metadata={"sim_cut_every": "7"},
            )
        )
        final = events[-1].response
        replayed = list(client.responses.retrieve(final.id, stream=True))  # the client replays it all again
        client.responses.retrieve(final.id)  # and polls it
    assert replayed[-1].type == "response.completed"
    rows = usage_rows(config_env_store(config_env), 1, lambda row: row.key_name == "blue")
    time.sleep(0.5)  # a second count, if there were one, would land within this
    rows = usage_rows(config_env_store(config_env), 1, lambda row: row.key_name == "blue")
    assert sum(r.responses for r in rows) == 1
    assert sum(r.usage.total_tokens for r in rows) == final.usage.total_tokens


def config_env_store(config_env: dict[str, str]) -> str:
    import tomllib

    return str(tomllib.loads(Path(config_env["WSGI_PROXY_CONFIG"]).read_text())["store_url"])
