"""The endpoint families beyond Responses (chat completions, completions, embeddings, moderations)
through the gateway with the official SDK: relayed byte for byte, usage counted, served only where
the operator lets them."""

from __future__ import annotations

import re
import typing as t
from pathlib import Path

import openai
import pytest
import requests
from openai import OpenAI

from wsgi_proxy.simulator import Simulator, SimulatorConfig

from .conftest import CLIENT_KEY, UPSTREAM_KEY, Proxy, start_proxy, usage_rows

pytestmark = pytest.mark.e2e

MESSAGES: list[t.Any] = [{"role": "user", "content": "count the words of this message"}]


@pytest.fixture(scope="module")
def simulator() -> t.Iterator[Simulator]:
    sim = Simulator(config=SimulatorConfig(api_key=UPSTREAM_KEY, delay_ms=2, words=6)).start()
    yield sim
    sim.stop()


@pytest.fixture(scope="module")
def counted(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[tuple[Proxy, str]]:
    """The single-upstream proxy with a store, so that usage is counted."""
    directory = tmp_path_factory.mktemp("families")
    store_url = f"sqlite:///{directory / 'state.db'}"
    proxy = start_proxy(directory, simulator.base_url, env={"WSGI_PROXY_STORE_URL": store_url})
    yield proxy, store_url
    proxy.server.stop()


def test_chat_completions_json_and_streamed_with_their_usage_counted(counted: tuple[Proxy, str]) -> None:
    proxy, store_url = counted
    with proxy.client() as client:
        whole = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        chunks = list(
            client.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
        )
    assert whole.choices[0].message.content == "count the words of this message"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    usage = chunks[-1].usage
    assert usage is not None and whole.usage is not None
    rows = usage_rows(store_url, 2, lambda row: row.model == "gpt-4o")
    assert sum(r.responses for r in rows) == 2
    assert sum(r.usage.total_tokens for r in rows) == whole.usage.total_tokens + usage.total_tokens


def _normalised(body: bytes) -> bytes:
    """The stream without what differs between two answers by construction (ids, timestamps)."""
    return re.sub(rb'"id":"[^"]+"|"created":\d+', b"", body)


@pytest.mark.parametrize("framing", ["lf", "crlf"])
def test_a_chat_stream_reaches_the_client_as_the_upstream_wrote_it(
    proxy: Proxy, simulator: Simulator, framing: str
) -> None:
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    query = {"sim_framing": framing, "sim_split": "1"}

    def read(base: str, key: str) -> bytes:
        headers = {"Authorization": f"Bearer {key}"}
        with requests.post(
            f"{base}/chat/completions", json=body, params=query, headers=headers, stream=True
        ) as r:
            assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            return b"".join(r.raw.stream(65536, decode_content=False))

    direct, proxied = read(simulator.base_url, UPSTREAM_KEY), read(proxy.base_url, CLIENT_KEY)
    assert proxied.endswith(b"[DONE]" + (b"\r\n\r\n" if framing == "crlf" else b"\n\n"))
    assert _normalised(proxied) == _normalised(direct)


def test_a_chat_stream_cut_upstream_is_never_a_clean_end(proxy: Proxy) -> None:
    with proxy.client() as client, pytest.raises(openai.APIConnectionError):
        list(
            client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_query={"sim_cut_after": "3"}
            )
        )


def test_embeddings_completions_and_moderations(proxy: Proxy) -> None:
    with proxy.client() as client:
        vectors = client.embeddings.create(model="text-embedding-3-small", input=["one", "two"])
        completion = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="say hello back")
        moderation = client.moderations.create(model="omni-moderation-latest", input="hello")
    assert [d.index for d in vectors.data] == [0, 1] and len(vectors.data[0].embedding) == 8
    assert completion.choices[0].text.startswith("say hello back")
    assert moderation.results[0].flagged is False


def test_families_the_operator_does_not_serve_are_a_json_404(simulator: Simulator, tmp_path: Path) -> None:
    proxy = start_proxy(tmp_path, simulator.base_url, env={"WSGI_PROXY_ENDPOINTS": "embeddings"})
    try:
        before = len(simulator.requests)
        with proxy.client() as client:
            with pytest.raises(openai.NotFoundError) as caught:
                client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            assert client.embeddings.create(model="text-embedding-3-small", input="still served").data
        assert "WSGI_PROXY_ENDPOINTS" in caught.value.message
        assert len(simulator.requests) == before + 1  # only the embeddings call went upstream
    finally:
        proxy.server.stop()


def test_a_team_narrowed_to_some_families(simulator: Simulator, tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'store_url = "sqlite:///{tmp_path / "s.db"}"\n'
        f'[[upstreams]]\nname = "main"\nurl = "{simulator.base_url}"\napi_key_env = "UPSTREAM_KEY"\n'
        '[teams.search]\nendpoints = ["embeddings"]\n'
        '[[keys]]\nname = "indexer"\nteam = "search"\nkey_env = "INDEXER_KEY"\n'
    )
    key = "sk-indexer-team-key-01"
    env = {"WSGI_PROXY_CONFIG": str(config), "UPSTREAM_KEY": UPSTREAM_KEY, "INDEXER_KEY": key}
    proxy = start_proxy(tmp_path, None, env=env)
    try:
        with OpenAI(base_url=proxy.base_url, api_key=key, max_retries=0) as client:
            assert client.embeddings.create(model="text-embedding-3-small", input="x").data
            with pytest.raises(openai.NotFoundError) as caught:
                client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert "your team" in caught.value.message
    finally:
        proxy.server.stop()


@pytest.fixture(scope="module")
def media(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Proxy]:
    proxy = start_proxy(
        tmp_path_factory.mktemp("media"), simulator.base_url, env={"WSGI_PROXY_ENDPOINTS": "images,audio"}
    )
    yield proxy
    proxy.server.stop()


def test_images_and_audio_with_the_sdk(media: Proxy, simulator: Simulator) -> None:
    with media.client() as client:
        image = client.images.generate(model="gpt-image-1", prompt="a lighthouse")
        with client.audio.speech.with_streaming_response.create(
            model="gpt-4o-mini-tts", voice="alloy", input="three words here"
        ) as spoken:
            audio = spoken.read()
            content_type = spoken.headers["content-type"]
        text = client.audio.transcriptions.create(model="whisper-1", file=("a.mp3", audio))
    assert image.data and image.data[0].b64_json
    assert audio.startswith(b"ID3") and len(audio) == 3 + 32 * 32 * 3 and content_type == "audio/mpeg"
    assert text.text.startswith("a recording of")
    upload = [r for r in simulator.requests if r.path.endswith("/audio/transcriptions")][-1]
    assert upload.headers["content-type"].startswith("multipart/form-data") and audio in upload.body


def test_streamed_images_and_audio_are_refused_not_half_relayed(media: Proxy) -> None:
    with media.client() as client, pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="gpt-image-1", prompt="x", stream=True)
    body = caught.value.body
    assert isinstance(body, dict) and body.get("param") == "stream"
    assert "does not relay streamed answers" in caught.value.message


def test_a_multipart_model_is_not_sent_where_a_model_table_would_not_send_it(
    simulator: Simulator, tmp_path: Path
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'store_url = "sqlite:///{tmp_path / "s.db"}"\n'
        f'[[upstreams]]\nname = "main"\nurl = "{simulator.base_url}"\napi_key_env = "UPSTREAM_KEY"\n'
        '[[models]]\nname = "gpt-4o-mini-tts"\nupstream = "main"\n'
        '[teams.t]\n[[keys]]\nname = "k"\nteam = "t"\nkey_env = "CLIENT"\n'
    )
    env = {
        "WSGI_PROXY_CONFIG": str(config),
        "UPSTREAM_KEY": UPSTREAM_KEY,
        "CLIENT": CLIENT_KEY,
        "WSGI_PROXY_ENDPOINTS": "audio",
    }
    proxy = start_proxy(tmp_path, None, env=env)
    try:
        with proxy.client() as client:
            assert client.audio.speech.create(model="gpt-4o-mini-tts", voice="alloy", input="routed").read()
            with pytest.raises(openai.BadRequestError) as caught:
                client.audio.transcriptions.create(model="whisper-1", file=("a.mp3", b"ID3..."))
        assert "multipart" in caught.value.message
    finally:
        proxy.server.stop()
