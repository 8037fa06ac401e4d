"""Usage and cost end to end: every usage field the simulator reports, from JSON answers, SSE and
WebSocket ``response.completed``, chat completions and embeddings, counted once in the store with
its upstream, tier and cost at that upstream's prices; the log lines, the metrics and
``wsgi-proxy usage`` show it."""

from __future__ import annotations

import json
import subprocess
import sys
import typing as t

import pytest
import requests
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from wsgi_proxy.simulator import Simulator
from wsgi_proxy.store import UsageRow

from .conftest import Proxy, simulator_fixture, start_red_and_blue, usage_rows

pytestmark = pytest.mark.e2e

KEYS = {"RED_KEY": "sk-red-usage-0123456789abcdef", "BLUE_KEY": "sk-blue-usage-0123456789abcdef"}
METRICS_TOKEN = "metrics-usage-token-0123456789"
MODEL = "gpt-4o-mini"
#: What the simulator reports besides the reply's tokens (sim_* options in the create's metadata).
KNOBS = {"sim_cached_tokens": "2", "sim_reasoning_tokens": "7", "sim_web_search_calls": "2"}
#: The upstream's negotiated prices (USD per million tokens, per thousand searches), over the defaults.
PRICES = """
[upstreams.prices."gpt-4o-mini"]
input = 1.0
cached_input = 0.5
output = 2.0
web_search_calls = 10.0
[upstreams.prices."gpt-4o-mini".tiers.flex]
input = 0.5
cached_input = 0.25
output = 1.0
web_search_calls = 10.0
"""


def nano_usd(usage: t.Any, *, flex: bool = False, searches: int = 0) -> int:
    """What the SDK's ``usage`` costs at :data:`PRICES`, in nano-dollars, worked out by hand."""
    scale = 0.5 if flex else 1.0
    cached: int = usage.input_tokens_details.cached_tokens
    tokens: float = (usage.input_tokens - cached) * 1.0 + cached * 0.5 + usage.output_tokens * 2.0
    return round(scale * tokens * 1000 + searches * 10_000_000)


simulator = simulator_fixture(delay_ms=2, words=6)


@pytest.fixture(scope="module")
def gateway(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[tuple[Proxy, str]]:
    directory = tmp_path_factory.mktemp("usage")
    proxy, store_url = start_red_and_blue(
        directory,
        simulator.base_url,
        KEYS,
        extra=PRICES,
        env={"WSGI_PROXY_METRICS_TOKEN": METRICS_TOKEN, "PROMETHEUS_MULTIPROC_DIR": str(directory / "prom")},
    )
    yield proxy, store_url
    proxy.server.stop()


def _client(proxy: Proxy, key: str) -> OpenAI:
    return OpenAI(base_url=proxy.base_url, api_key=KEYS[key], max_retries=0, timeout=30)


def _of(key: str) -> t.Callable[[UsageRow], bool]:
    return lambda row: row.key_name == key


def test_json_sse_and_websocket_usage_is_counted_field_by_field_with_its_cost(
    gateway: tuple[Proxy, str],
) -> None:
    proxy, store_url = gateway
    with _client(proxy, "BLUE_KEY") as client:
        whole = client.responses.create(model=MODEL, input="count me", metadata=KNOBS, service_tier="flex")
        streamed = [
            e.response
            for e in client.responses.create(model=MODEL, input="and me", metadata=KNOBS, stream=True)
            if e.type == "response.completed"
        ][0]
        with client.responses.connect() as conn:
            conn.response.create(model=MODEL, input="and me too", metadata=KNOBS)
            socketed = next(e for e in conn if e.type == "response.completed").response
    rows = usage_rows(store_url, 3, _of("blue"))
    assert sum(row.responses for row in rows) == 3
    by_tier = {row.service_tier: row for row in rows}
    assert set(by_tier) == {"flex", "default"}
    flex, standard = by_tier["flex"], by_tier["default"]
    assert (flex.upstream, flex.model, flex.team) == ("main", MODEL, "blue")
    responses = [whole, streamed, socketed]
    for name in ("input_tokens", "output_tokens", "total_tokens"):
        assert flex.usage.counts()[name] + standard.usage.counts()[name] == sum(
            getattr(r.usage, name) for r in responses
        )
    assert all(r.usage is not None and r.usage.input_tokens_details.cached_tokens == 2 for r in responses)
    assert flex.usage.cached_input_tokens + standard.usage.cached_input_tokens == 6
    assert flex.usage.reasoning_tokens + standard.usage.reasoning_tokens == 21
    assert flex.usage.web_search_calls + standard.usage.web_search_calls == 6
    assert flex.cost_nano_usd == nano_usd(whole.usage, flex=True, searches=2)
    assert standard.cost_nano_usd == nano_usd(streamed.usage, searches=2) + nano_usd(
        socketed.usage, searches=2
    )
    assert flex.unpriced == standard.unpriced == 0

    lines = [line for line in proxy.access_lines() if line["key"] == "blue" and "usage" in line]
    costs = sorted(line["cost_usd"] for line in lines)
    assert costs == sorted(
        round(n / 1e9, 9)
        for n in (
            nano_usd(whole.usage, flex=True, searches=2),
            nano_usd(streamed.usage, searches=2),
            nano_usd(socketed.usage, searches=2),
        )
    )
    assert all(
        line["usage"]["reasoning_tokens"] == 7 and line["usage"]["web_search_calls"] == 2 for line in lines
    )


def test_chat_completions_and_embeddings_are_counted_and_an_unpriced_model_says_so(
    gateway: tuple[Proxy, str],
) -> None:
    proxy, store_url = gateway
    messages: list[t.Any] = [{"role": "user", "content": "count the words of this message"}]
    with _client(proxy, "RED_KEY") as client:
        whole = client.chat.completions.create(model="gpt-4o", messages=messages, metadata=KNOBS, store=True)
        chunks = list(
            client.chat.completions.create(
                model="gpt-4o", messages=messages, stream=True, stream_options={"include_usage": True}
            )
        )
        embedded = client.embeddings.create(model="text-embedding-3-small", input="embed me")
        unpriced = client.chat.completions.create(model="my-own-model", messages=messages)
    rows = usage_rows(store_url, 4, _of("red"))
    by_model = {row.model: row for row in rows}
    chat, embedding, other = by_model["gpt-4o"], by_model["text-embedding-3-small"], by_model["my-own-model"]
    streamed = chunks[-1].usage
    assert whole.usage is not None and streamed is not None and unpriced.usage is not None
    assert chat.responses == 2
    assert chat.usage.total_tokens == whole.usage.total_tokens + streamed.total_tokens
    assert chat.usage.cached_input_tokens == 2 and chat.usage.reasoning_tokens == 7  # the JSON one's
    # gpt-4o at the dated defaults ($2.50 in, $1.25 cached, $10 out), the upstream pricing only gpt-4o-mini.
    expected = 0
    for usage in (whole.usage, streamed):
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        cached = cached or 0
        expected += round(
            ((usage.prompt_tokens - cached) * 2.5 + cached * 1.25 + usage.completion_tokens * 10) * 1000
        )
    assert chat.cost_nano_usd == expected
    assert (embedding.responses, embedding.usage.input_tokens) == (1, embedded.usage.prompt_tokens)
    assert embedding.cost_nano_usd == round(embedded.usage.prompt_tokens * 0.02 * 1000)
    assert (other.responses, other.unpriced, other.cost_nano_usd) == (1, 1, 0)
    line = next(line for line in proxy.access_lines() if line["model"] == "my-own-model" and "usage" in line)
    assert line["cost_usd"] is None


def test_the_usage_command_and_the_metrics_show_what_was_counted(gateway: tuple[Proxy, str]) -> None:
    proxy, store_url = gateway
    with _client(proxy, "RED_KEY") as client:
        client.responses.create(model=MODEL, input="one more", metadata=KNOBS)
    rows = usage_rows(store_url, 1, lambda row: row.key_name == "red" and row.model == MODEL)
    assert rows
    report = subprocess.run(
        [
            sys.executable,
            "-m",
            "wsgi_proxy",
            "usage",
            "--store",
            store_url,
            "--by",
            "key,model,tier",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    document = json.loads(report.stdout)
    mine = [r for r in document["rows"] if (r["key"], r["model"]) == ("red", MODEL)]
    assert len(mine) == 1 and mine[0]["tier"] == "default"
    assert mine[0]["reasoning_tokens"] == 7 * mine[0]["responses"]
    assert mine[0]["cost_usd"] == pytest.approx(sum(r.cost_nano_usd for r in rows) / 1e9)

    table = subprocess.run(
        [sys.executable, "-m", "wsgi_proxy", "usage", "--store", store_url, "--by", "team"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert table.splitlines()[0].split() == [
        "team", "responses", "input", "cached", "output", "reasoning", "total", "web", "searches", "cost", "(USD)",
        "unpriced",
    ]  # fmt: skip

    text = requests.get(
        proxy.root_url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=5
    ).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    reasoning = samples[
        ("wsgi_proxy_usage_total", (("counter", "reasoning_tokens"), ("team", "red"), ("upstream", "main")))
    ]
    assert reasoning >= 7
    assert samples[("wsgi_proxy_usage_cost_usd_total", (("team", "red"), ("upstream", "main")))] > 0
