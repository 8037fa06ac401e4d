"""The Conversations API through the gateway, owned per team: the SDK's every conversation and item
call, creates that name a conversation, and another team refused on every route before the upstream."""

from __future__ import annotations

import asyncio
import json
import typing as t
from pathlib import Path

import openai
import pytest
from openai import OpenAI
from websockets.sync.client import connect as ws_connect

from wsgi_proxy.simulator import Simulator, SimulatorConfig
from wsgi_proxy.store import open_store

from .conftest import UPSTREAM_KEY, Proxy, start_red_and_blue

pytestmark = pytest.mark.e2e

MODEL = "gpt-4o-mini"
KEYS = {"RED_KEY": "sk-red-conversations-01", "BLUE_KEY": "sk-blue-conversations-2"}


@pytest.fixture(scope="module")
def simulator() -> t.Iterator[Simulator]:
    sim = Simulator(config=SimulatorConfig(api_key=UPSTREAM_KEY, delay_ms=1, words=4)).start()
    yield sim
    sim.stop()


@pytest.fixture(scope="module")
def gateway(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[tuple[Proxy, str]]:
    proxy, store_url = start_red_and_blue(tmp_path_factory.mktemp("conversations"), simulator.base_url, KEYS)
    yield proxy, store_url
    proxy.server.stop()


def _sdk(proxy: Proxy, key: str) -> OpenAI:
    return OpenAI(base_url=proxy.base_url, api_key=KEYS[key], max_retries=0, timeout=30)


def test_every_conversation_call_of_the_sdk_works_and_is_recorded(gateway: tuple[Proxy, str]) -> None:
    proxy, store_url = gateway
    with _sdk(proxy, "RED_KEY") as red:
        conversation = red.conversations.create(
            items=[{"type": "message", "role": "user", "content": "remember: blue"}],
            metadata={"topic": "colour"},
        )
        assert red.conversations.retrieve(conversation.id).metadata == {"topic": "colour"}
        assert red.conversations.update(conversation.id, metadata={"topic": "paint"}).metadata == {
            "topic": "paint"
        }
        added = red.conversations.items.create(
            conversation.id, items=[{"type": "message", "role": "user", "content": "and green"}]
        )
        response = red.responses.create(model=MODEL, input="which colours?", conversation=conversation.id)
        streamed = list(
            red.responses.create(model=MODEL, input="again", conversation=conversation.id, stream=True)
        )
        items = red.conversations.items.list(conversation.id, order="asc")
        added_id = t.cast(str, added.data[0].id)  # items' ids are typed optional in the SDK
        item = red.conversations.items.retrieve(added_id, conversation_id=conversation.id)
        red.conversations.items.delete(added_id, conversation_id=conversation.id)
        remaining = red.conversations.items.list(conversation.id, order="asc", limit=100)
        tokens = red.responses.input_tokens.count(model=MODEL, input="count", conversation=conversation.id)
        deleted = red.conversations.delete(conversation.id)
    assert response.conversation is not None and response.conversation.id == conversation.id
    assert streamed[-1].type == "response.completed"
    roles = [getattr(i, "role", None) for i in items.data]
    assert roles[:2] == ["user", "user"] and "assistant" in roles
    assert item.id not in [i.id for i in remaining.data] and len(remaining.data) == len(items.data) - 1
    assert tokens.input_tokens > 0
    assert deleted.deleted is True
    store = open_store(store_url)
    try:
        assert store.get_response(conversation.id) is None  # forgotten with its deletion
    finally:
        store.close()


def test_another_team_is_refused_on_every_conversation_route(
    gateway: tuple[Proxy, str], simulator: Simulator
) -> None:
    proxy, _ = gateway
    with _sdk(proxy, "RED_KEY") as red:
        conversation = red.conversations.create(
            items=[{"type": "message", "role": "user", "content": "private"}]
        )
        item_id = t.cast(str, red.conversations.items.list(conversation.id).data[0].id)
    cid = conversation.id
    before = len(simulator.requests)
    with _sdk(proxy, "BLUE_KEY") as blue:
        calls: list[tuple[str, t.Callable[[], object]]] = [
            ("retrieve", lambda: blue.conversations.retrieve(cid)),
            ("update", lambda: blue.conversations.update(cid, metadata={"x": "y"})),
            ("delete", lambda: blue.conversations.delete(cid)),
            ("items.list", lambda: blue.conversations.items.list(cid)),
            (
                "items.create",
                lambda: blue.conversations.items.create(
                    cid, items=[{"type": "message", "role": "user", "content": "x"}]
                ),
            ),
            ("items.retrieve", lambda: blue.conversations.items.retrieve(item_id, conversation_id=cid)),
            ("items.delete", lambda: blue.conversations.items.delete(item_id, conversation_id=cid)),
            ("responses.create", lambda: blue.responses.create(model=MODEL, input="x", conversation=cid)),
            (
                "responses.stream",
                lambda: list(blue.responses.create(model=MODEL, input="x", conversation=cid, stream=True)),
            ),
            (
                "input_tokens",
                lambda: blue.responses.input_tokens.count(model=MODEL, input="x", conversation=cid),
            ),
        ]
        for name, call in calls:
            with pytest.raises(openai.NotFoundError) as caught:
                call()
            assert caught.value.message.endswith(f"Conversation with id '{cid}' not found."), name
    url = proxy.base_url.replace("http://", "ws://") + "/responses"
    with ws_connect(url, additional_headers={"Authorization": f"Bearer {KEYS['BLUE_KEY']}"}) as ws:
        ws.send(json.dumps({"type": "response.create", "model": MODEL, "input": "x", "conversation": cid}))
        frame = json.loads(ws.recv(timeout=10))
    assert frame["type"] == "error" and frame["status"] == 404
    upgrades = [r for r in simulator.requests[before:] if r.headers.get("upgrade") == "websocket"]
    assert len(simulator.requests) - before == len(upgrades)  # nothing but the WebSocket reached it
    assert all(cid.encode() not in f for f in simulator.frames)
    with _sdk(proxy, "RED_KEY") as red:
        assert red.conversations.retrieve(cid).id == cid  # untouched


def test_a_conversation_nobody_recorded_is_refused_with_several_teams(gateway: tuple[Proxy, str]) -> None:
    proxy, _ = gateway
    with _sdk(proxy, "RED_KEY") as red, pytest.raises(openai.NotFoundError):
        red.conversations.retrieve("conv_never_recorded_here")


def test_a_create_naming_two_objects_of_different_teams_is_refused(gateway: tuple[Proxy, str]) -> None:
    proxy, _ = gateway
    with _sdk(proxy, "RED_KEY") as red, _sdk(proxy, "BLUE_KEY") as blue:
        mine = red.conversations.create()
        theirs = blue.responses.create(model=MODEL, input="blue's")
        with pytest.raises(openai.NotFoundError) as caught:
            red.responses.create(
                model=MODEL,
                input="x",
                conversation=mine.id,
                extra_body={"prompt_cache_options": {"comparison_response_id": theirs.id}},
            )
    assert theirs.id in caught.value.message


def test_the_websocket_mode_continues_a_conversation(gateway: tuple[Proxy, str], tmp_path: Path) -> None:
    proxy, _ = gateway
    with _sdk(proxy, "RED_KEY") as red:
        conversation = red.conversations.create()
        with red.responses.connect() as conn:
            conn.response.create(model=MODEL, input="over a socket", conversation=conversation.id)
            done = next(e for e in conn if e.type in ("response.completed", "error"))
        roles = [getattr(i, "role", None) for i in red.conversations.items.list(conversation.id).data]
    assert done.type == "response.completed"
    assert "assistant" in roles and "user" in roles


def test_the_agents_sdk_keeps_its_session_memory_in_a_conversation(gateway: tuple[Proxy, str]) -> None:
    agents = pytest.importorskip(
        "agents", reason="the OpenAI Agents SDK (openai-agents) is a test dependency"
    )
    proxy, _ = gateway
    agents.set_tracing_disabled(True)  # no trace export to OpenAI: the tests reach no network

    async def two_runs() -> tuple[str, list[t.Any]]:
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=KEYS["RED_KEY"], max_retries=0)
        model = agents.OpenAIResponsesModel(model=MODEL, openai_client=client)
        agent = agents.Agent(name="notes", instructions="Answer briefly.", model=model)
        session = agents.OpenAIConversationsSession(openai_client=client)
        await agents.Runner.run(agent, "my colour is teal", session=session)
        second = await agents.Runner.run(agent, "what is my colour?", session=session)
        items = await session.get_items()
        await client.close()
        return str(second.final_output), items

    final, items = asyncio.run(two_runs())
    texts = json.dumps(items)
    assert final and "my colour is teal" in texts and "what is my colour?" in texts
