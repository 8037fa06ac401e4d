"""Several upstreams and teams from a config file: routing, failover, ownership, limits."""

from __future__ import annotations

import hashlib
import json
import time
import typing as t
from pathlib import Path

import pytest
import requests
import responses
from flask import Flask
from flask.testing import FlaskClient

from wsgi_proxy import ProxySettings, create_app
from wsgi_proxy.store import ResponseRecord

from .envelope import assert_error

ALPHA = "http://alpha.test/v1"
BETA = "http://beta.test/openai/v1"
KEYS = {"RED": "sk-red-key-1-000000", "RED2": "sk-red-limited-2-0000", "BLUE": "sk-blue-key-3-000000"}

CONFIG = f"""
[[upstreams]]
name = "alpha"
url = "{ALPHA}"
api_key_env = "ALPHA_KEY"

[[upstreams]]
name = "beta"
kind = "azure"
url = "{BETA}"
api_key_env = "BETA_KEY"

[[models]]
name = "gpt-a"
upstream = "alpha"

[[models]]
name = "gpt-b"
routes = [{{ upstream = "beta", deployment = "b-deploy" }}]

[[models]]
name = "gpt-fail"
routes = [{{ upstream = "alpha", weight = 1000000 }}, {{ upstream = "beta", weight = 0.000001 }}]

[[models]]
name = "o-*"
upstream = "beta"

[teams.red]
rpm = 1000

[teams.blue]
models = ["gpt-a"]
max_streams = 1

[[keys]]
name = "red-1"
team = "red"
key_env = "RED_KEY"

[[keys]]
name = "red-limited"
team = "red"
key_env = "RED2_KEY"
rpm = 2

[[keys]]
name = "blue-1"
team = "blue"
sha256 = "{hashlib.sha256(KEYS["BLUE"].encode()).hexdigest()}"
"""


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Flask:
    path = tmp_path / "gateway.toml"
    path.write_text(CONFIG)
    monkeypatch.setenv("ALPHA_KEY", "sk-alpha-upstream")
    monkeypatch.setenv("BETA_KEY", "beta-azure-upstream")
    monkeypatch.setenv("RED_KEY", KEYS["RED"])
    monkeypatch.setenv("RED2_KEY", KEYS["RED2"])
    flask_app = create_app(ProxySettings(config=path, store_url=f"sqlite:///{tmp_path / 'state.db'}"))
    flask_app.testing = True
    return flask_app


@pytest.fixture
def mocked() -> t.Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def _as(app: Flask, who: str) -> tuple[FlaskClient, dict[str, str]]:
    return app.test_client(), {"Authorization": f"Bearer {KEYS[who]}"}


def _create(app: Flask, who: str, body: dict[str, t.Any]) -> t.Any:
    client, auth = _as(app, who)
    return client.post("/v1/responses", data=json.dumps(body), headers=auth)


def _json(answer: t.Any) -> dict[str, t.Any]:
    return t.cast(dict[str, t.Any], answer.json)


def _response(rid: str) -> dict[str, t.Any]:
    return {"id": rid, "object": "response", "status": "completed"}


def test_models_route_to_their_upstream_with_its_credentials(
    app: Flask, mocked: responses.RequestsMock
) -> None:
    mocked.add(responses.POST, f"{ALPHA}/responses", json=_response("resp_a1"))
    mocked.add(responses.POST, f"{BETA}/responses", json=_response("resp_b1"))
    assert _create(app, "RED", {"model": "gpt-a", "input": "x"}).status_code == 200
    assert _create(app, "RED", {"model": "gpt-b", "input": "x"}).status_code == 200
    alpha, beta = (call.request for call in mocked.calls)
    assert alpha.headers["Authorization"] == "Bearer sk-alpha-upstream"
    assert beta.headers["api-key"] == "beta-azure-upstream" and "Authorization" not in beta.headers
    assert json.loads(t.cast(bytes, beta.body))["model"] == "b-deploy"  # the alias's deployment name


def test_pattern_routes_and_unknown_model(app: Flask, mocked: responses.RequestsMock) -> None:
    mocked.add(responses.POST, f"{BETA}/responses", json=_response("resp_o1"))
    assert _create(app, "RED", {"model": "o-mini", "input": "x"}).status_code == 200
    missing = _create(app, "RED", {"model": "gpt-nope", "input": "x"})
    assert_error(missing, 404, param="model", code="model_not_found")
    assert len(mocked.calls) == 1


def test_model_not_allowed_for_the_team_is_404_and_never_sent(
    app: Flask, mocked: responses.RequestsMock
) -> None:
    answer = _create(app, "BLUE", {"model": "gpt-b", "input": "x"})
    assert_error(answer, 404, param="model", code="model_not_found")
    assert len(mocked.calls) == 0


@pytest.mark.parametrize(
    "failure",
    [{"status": 503, "json": {"error": {"message": "busy"}}}, {"body": requests.ConnectionError("refused")}],
    ids=["503", "connection"],
)
def test_create_fails_over_to_the_next_route_before_the_first_byte(
    app: Flask, mocked: responses.RequestsMock, failure: dict[str, t.Any]
) -> None:
    mocked.add(responses.POST, f"{ALPHA}/responses", **failure)
    mocked.add(responses.POST, f"{BETA}/responses", json=_response("resp_fo"))
    answer = _create(app, "RED", {"model": "gpt-fail", "input": "x"})
    assert answer.status_code == 200
    assert [c.request.url for c in mocked.calls][-1] == f"{BETA}/responses"
    # The failover holder is remembered: lifecycle calls go to beta.
    mocked.add(responses.GET, f"{BETA}/responses/resp_fo", json=_response("resp_fo"))
    client, auth = _as(app, "RED")
    assert client.get("/v1/responses/resp_fo", headers=auth).status_code == 200


LIFECYCLE = [
    ("GET", "/v1/responses/{id}", responses.GET, "/responses/{id}"),
    ("GET", "/v1/responses/{id}?stream=true&starting_after=2", responses.GET, "/responses/{id}"),
    ("POST", "/v1/responses/{id}/cancel", responses.POST, "/responses/{id}/cancel"),
    ("DELETE", "/v1/responses/{id}", responses.DELETE, "/responses/{id}"),
    ("GET", "/v1/responses/{id}/input_items", responses.GET, "/responses/{id}/input_items"),
]


@pytest.mark.parametrize(("method", "path", "mock_method", "upstream_path"), LIFECYCLE)
def test_lifecycle_calls_reach_the_holder_and_other_teams_get_404(
    app: Flask, mocked: responses.RequestsMock, method: str, path: str, mock_method: str, upstream_path: str
) -> None:
    mocked.add(responses.POST, f"{BETA}/responses", json=_response("resp_red1"))
    assert _create(app, "RED", {"model": "gpt-b", "input": "mine"}).status_code == 200
    if "stream=true" in path:
        mocked.add(
            mock_method,
            BETA + upstream_path.format(id="resp_red1"),
            body=b"",
            content_type="text/event-stream",
        )
    else:
        mocked.add(mock_method, BETA + upstream_path.format(id="resp_red1"), json=_response("resp_red1"))
    calls = len(mocked.calls)
    client, blue = _as(app, "BLUE")
    stranger = client.open(path.format(id="resp_red1"), method=method, headers=blue)
    unknown = client.open(path.format(id="resp_unknown9"), method=method, headers=blue)
    assert assert_error(stranger, 404)["message"] == "Response with id 'resp_red1' not found."
    assert_error(unknown, 404)
    assert len(mocked.calls) == calls  # neither reached any upstream
    _, red = _as(app, "RED")
    mine = client.open(path.format(id="resp_red1"), method=method, headers=red)
    assert mine.status_code == 200
    assert mocked.calls[-1].request.url.startswith(BETA + upstream_path.format(id="resp_red1"))


def test_previous_response_id_of_another_team_is_404(app: Flask, mocked: responses.RequestsMock) -> None:
    mocked.add(responses.POST, f"{ALPHA}/responses", json=_response("resp_red2"))
    assert _create(app, "RED", {"model": "gpt-a", "input": "x"}).status_code == 200
    answer = _create(app, "BLUE", {"model": "gpt-a", "input": "y", "previous_response_id": "resp_red2"})
    assert answer.status_code == 404
    assert len(mocked.calls) == 1
    # Its owner's continuation goes to the holder.
    assert (
        _create(app, "RED", {"model": "gpt-a", "input": "y", "previous_response_id": "resp_red2"}).status_code
        == 200
    )
    assert mocked.calls[-1].request.url == f"{ALPHA}/responses"


def test_streamed_create_records_the_id_from_response_created(
    app: Flask, mocked: responses.RequestsMock
) -> None:
    sse = (
        b'event: response.created\ndata: {"type":"response.created","sequence_number":0,'
        b'"response":{"id":"resp_s1","status":"in_progress"}}\n\n'
        b'event: response.completed\ndata: {"type":"response.completed","sequence_number":1,'
        b'"response":{"id":"resp_s1","status":"completed"}}\n\n'
    )
    mocked.add(responses.POST, f"{BETA}/responses", body=sse, content_type="text/event-stream")
    streamed = _create(app, "RED", {"model": "gpt-b", "input": "x", "stream": True})
    assert streamed.data == sse
    client, blue = _as(app, "BLUE")
    assert client.get("/v1/responses/resp_s1", headers=blue).status_code == 404
    mocked.add(responses.GET, f"{BETA}/responses/resp_s1", json=_response("resp_s1"))
    _, red = _as(app, "RED")
    assert client.get("/v1/responses/resp_s1", headers=red).status_code == 200


def test_requests_per_minute_limit_gives_429_with_retry_after(
    app: Flask, mocked: responses.RequestsMock
) -> None:
    if 60 - time.time() % 60 < 3:  # limits count per clock minute: do not straddle two
        time.sleep(3.1)
    mocked.add(responses.POST, f"{ALPHA}/responses", json=_response("resp_l"))
    codes = [_create(app, "RED2", {"model": "gpt-a", "input": "x"}).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    limited = _create(app, "RED2", {"model": "gpt-a", "input": "x"})
    assert_error(limited, 429, code="rate_limit_exceeded", type="rate_limit_error")
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert len(mocked.calls) == 2


def test_concurrent_stream_limit_gives_429_until_a_stream_ends(
    app: Flask, mocked: responses.RequestsMock
) -> None:
    sse = b'data: {"type":"response.completed","sequence_number":0}\n\n'
    mocked.add(responses.POST, f"{ALPHA}/responses", body=sse, content_type="text/event-stream")
    client, blue = _as(app, "BLUE")
    body = json.dumps({"model": "gpt-a", "input": "x", "stream": True})
    first = client.post("/v1/responses", data=body, headers=blue, buffered=False)
    assert first.status_code == 200  # open: its body is not read yet
    second = client.post("/v1/responses", data=body, headers=blue)
    assert second.status_code == 429
    first.close()
    third = client.post("/v1/responses", data=body, headers=blue)
    assert third.status_code == 200


def test_models_lists_what_the_key_may_use(app: Flask, mocked: responses.RequestsMock) -> None:
    client, red = _as(app, "RED")
    _, blue = _as(app, "BLUE")
    assert [m["id"] for m in _json(client.get("/v1/models", headers=red))["data"]] == [
        "gpt-a",
        "gpt-b",
        "gpt-fail",
    ]
    assert [m["id"] for m in _json(client.get("/v1/models", headers=blue))["data"]] == ["gpt-a"]
    assert len(mocked.calls) == 0


def test_usage_is_counted_once_per_response_whichever_path_sees_it(
    app: Flask, mocked: responses.RequestsMock
) -> None:
    from wsgi_proxy.web.hooks import EXTENSION_KEY

    usage = {"input_tokens": 4, "output_tokens": 6, "total_tokens": 10}
    done = {"id": "resp_u1", "object": "response", "status": "completed", "model": "gpt-a", "usage": usage}
    mocked.add(responses.POST, f"{ALPHA}/responses", json=done)
    mocked.add(responses.GET, f"{ALPHA}/responses/resp_u1", json=done)
    assert _create(app, "RED", {"model": "gpt-a", "input": "x"}).status_code == 200
    client, red = _as(app, "RED")
    for _ in range(2):  # polled again: the same response, not new usage
        assert client.get("/v1/responses/resp_u1", headers=red).status_code == 200
    sse = (
        b'data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_u2"}}\n\n'
        b'data: {"type":"response.completed","sequence_number":1,"response":{"id":"resp_u2","model":"gpt-a",'
        b'"usage":{"input_tokens":1,"output_tokens":2,"total_tokens":3}}}\n\n'
    )
    mocked.add(responses.POST, f"{ALPHA}/responses", body=sse, content_type="text/event-stream")
    mocked.add(responses.GET, f"{ALPHA}/responses/resp_u2", body=sse, content_type="text/event-stream")
    streamed = _create(app, "RED", {"model": "gpt-a", "input": "y", "stream": True})
    assert streamed.data == sse
    replay = client.get("/v1/responses/resp_u2?stream=true", headers=red)  # a resumed replay
    assert replay.data == sse
    (row,) = app.extensions[EXTENSION_KEY].state.store.usage_totals()
    assert (row.key_name, row.team, row.model) == ("red-1", "red", "gpt-a")
    assert (row.responses, row.usage.input_tokens, row.usage.output_tokens, row.usage.total_tokens) == (
        2,
        5,
        8,
        13,
    )


@pytest.mark.parametrize("endpoint", ["input_tokens", "compact"])
@pytest.mark.parametrize(
    "failure",
    [{"status": 503, "json": {"error": {"message": "busy"}}}, {"body": requests.ConnectionError("refused")}],
    ids=["503", "connection"],
)
def test_input_tokens_and_compact_fail_over_like_a_create(
    app: Flask, mocked: responses.RequestsMock, endpoint: str, failure: dict[str, t.Any]
) -> None:
    mocked.add(responses.POST, f"{ALPHA}/responses/{endpoint}", **failure)
    mocked.add(responses.POST, f"{BETA}/responses/{endpoint}", json={"object": "response.input_tokens"})
    client, red = _as(app, "RED")
    body = json.dumps({"model": "gpt-fail", "input": "x"})
    answer = client.post(f"/v1/responses/{endpoint}", data=body, headers=red)
    assert answer.status_code == 200
    assert [c.request.url for c in mocked.calls] == [
        f"{ALPHA}/responses/{endpoint}",
        f"{BETA}/responses/{endpoint}",
    ]
    assert answer.headers["X-Upstream-Attempts"] == "2"


def test_the_single_upstream_variables_honour_a_store_url(
    tmp_path: Path, mocked: responses.RequestsMock
) -> None:
    from wsgi_proxy.web.hooks import EXTENSION_KEY

    settings = ProxySettings.model_validate(
        {
            "upstream_url": ALPHA,
            "upstream_api_key": "sk-env-upstream",
            "api_keys": "sk-env-client-00000",
            "store_url": f"sqlite:///{tmp_path / 'env.db'}",
        }
    )
    app = create_app(settings)
    usage = {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}
    mocked.add(
        responses.POST, f"{ALPHA}/responses", json={**_response("resp_env1"), "model": "m", "usage": usage}
    )
    auth = {"Authorization": "Bearer sk-env-client-00000"}
    assert app.test_client().post("/v1/responses", data=b'{"model":"m"}', headers=auth).status_code == 200
    store = app.extensions[EXTENSION_KEY].state.store
    record = store.get_response("resp_env1")
    assert record is not None
    assert (record.upstream, record.team, record.key_name) == ("default", "default", "key-1")
    (row,) = store.usage_totals()
    assert (row.key_name, row.model, row.usage.total_tokens) == ("key-1", "m", 3)


def test_the_single_upstream_variables_without_a_store_url_remember_nothing(
    mocked: responses.RequestsMock,
) -> None:
    from wsgi_proxy.store import NullStore
    from wsgi_proxy.web.hooks import EXTENSION_KEY

    app = create_app(ProxySettings(upstream_url=ALPHA))
    assert isinstance(app.extensions[EXTENSION_KEY].state.store, NullStore)
    mocked.add(responses.GET, f"{ALPHA}/responses/resp_any", json=_response("resp_any"))
    assert app.test_client().get("/v1/responses/resp_any").status_code == 200  # forwarded, not refused


def test_an_open_stream_keeps_its_slot_past_the_lease_ttl(app: Flask, mocked: responses.RequestsMock) -> None:
    from wsgi_proxy.web.hooks import EXTENSION_KEY

    leases = app.extensions[EXTENSION_KEY].state.leases
    sse = b'data: {"type":"response.completed","sequence_number":0}\n\n'
    mocked.add(responses.POST, f"{ALPHA}/responses", body=sse, content_type="text/event-stream")
    client, blue = _as(app, "BLUE")
    body = json.dumps({"model": "gpt-a", "input": "x", "stream": True})
    first = client.post("/v1/responses", data=body, headers=blue, buffered=False)
    assert first.status_code == 200 and leases.held() == 1
    (key, lease) = next(iter(leases._held))
    store, start = leases.store, time.time()
    past_ttl = start + leases.ttl * 1.2  # unrefreshed, the lease would have lapsed by then
    leases.refresh(now=start + leases.ttl * 0.6)  # what the keeper's thread does every third of the ttl
    assert not store.acquire_slot(key, 1, "another", leases.ttl, now=past_ttl)
    first.close()
    assert leases.held() == 0
    assert store.acquire_slot(key, 1, "another", leases.ttl)


ONE_UPSTREAM_TWO_TEAMS = f"""
[[upstreams]]
name = "alpha"
url = "{ALPHA}"
api_key_env = "ALPHA_KEY"

[teams.red]
[teams.blue]

[[keys]]
name = "red-1"
team = "red"
key_env = "RED_KEY"

[[keys]]
name = "blue-1"
team = "blue"
sha256 = "{hashlib.sha256(KEYS["BLUE"].encode()).hexdigest()}"
"""


@pytest.mark.parametrize(("method", "path", "mock_method", "upstream_path"), LIFECYCLE)
def test_with_several_teams_an_id_the_store_does_not_know_is_refused_on_every_route(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mocked: responses.RequestsMock,
    method: str,
    path: str,
    mock_method: str,
    upstream_path: str,
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(ONE_UPSTREAM_TWO_TEAMS)
    monkeypatch.setenv("ALPHA_KEY", "sk-alpha-upstream")
    monkeypatch.setenv("RED_KEY", KEYS["RED"])
    app = create_app(ProxySettings(config=config, store_url=f"sqlite:///{tmp_path / 'state.db'}"))
    mocked.add(mock_method, f"{ALPHA}{upstream_path.format(id='resp_lost1')}", json=_response("resp_lost1"))
    for who in ("RED", "BLUE"):  # the owner too: nobody can tell whose it was
        client, auth = _as(app, who)
        answer = client.open(path.format(id="resp_lost1"), method=method, headers=auth)
        assert assert_error(answer, 404)["message"] == "Response with id 'resp_lost1' not found."
    assert len(mocked.calls) == 0


def test_forwarding_unknown_ids_with_several_teams_is_refused_at_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wsgi_proxy.config import ConfigError

    config = tmp_path / "gateway.toml"
    config.write_text('unknown_ids = "forward"\n' + ONE_UPSTREAM_TWO_TEAMS)
    monkeypatch.setenv("ALPHA_KEY", "sk-alpha-upstream")
    monkeypatch.setenv("RED_KEY", KEYS["RED"])
    with pytest.raises(ConfigError, match=r'unknown_ids = "forward".*2 teams.*"auto" or "reject"'):
        create_app(ProxySettings(config=config))


def test_a_create_whose_record_cannot_be_written_is_kept_until_the_store_takes_it(
    app: Flask, mocked: responses.RequestsMock
) -> None:
    from wsgi_proxy.web.hooks import EXTENSION_KEY

    state = app.extensions[EXTENSION_KEY].state
    store, pending = state.store, state.pending
    usage = {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}
    mocked.add(
        responses.POST,
        f"{ALPHA}/responses",
        json={**_response("resp_full1"), "model": "gpt-a", "usage": usage},
    )
    mocked.add(responses.GET, f"{ALPHA}/responses/resp_full1", json=_response("resp_full1"))
    conn = store._idle.get_nowait()  # the test client serves requests on this thread: the store's one
    assert store._idle.empty()  # connection
    store._idle.put(conn)
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full from now on
    with pytest.raises(Exception, match="full"):
        for n in range(10_000):  # fill what is left of the file's pages
            store.put_response(ResponseRecord(f"resp_pad{n}", "alpha", "red", None, 0.0, False), 60)
    store._failed_at = None  # the gateway has not seen the failure yet: the create goes upstream

    assert _create(app, "RED", {"model": "gpt-a", "input": "x"}).status_code == 200
    assert pending.response("resp_full1") is not None  # the locator, kept (usage too if it did not fit)
    client, red = _as(app, "RED")
    assert client.get("/v1/responses/resp_full1", headers=red).status_code == 200  # answered from the queue
    _, blue = _as(app, "BLUE")
    assert_error(client.get("/v1/responses/resp_full1", headers=blue), 404)  # still the owner's only
    calls = len(mocked.calls)
    refused = _create(app, "RED", {"model": "gpt-a", "input": "y"})  # the store is failing: refused first
    assert_error(refused, 503, code="store_unavailable")
    assert len(mocked.calls) == calls  # it never reached the upstream

    conn.execute(f"PRAGMA max_page_count = {pages * 1000}")  # the disk is freed
    assert pending.flush() == 0
    located = store.get_response("resp_full1")
    assert located is not None and (located.upstream, located.team) == ("alpha", "red")
    (row,) = [r for r in store.usage_totals() if r.usage.total_tokens]
    assert (row.responses, row.usage.total_tokens) == (1, 3)
