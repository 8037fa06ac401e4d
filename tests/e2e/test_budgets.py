"""A team's budget crossed by concurrent requests through two gunicorn workers: the overshoot stays
within what the requests already admitted use, and every request after it is refused, over HTTP
and over the WebSocket, before it reaches the upstream."""

from __future__ import annotations

import threading
import typing as t

import openai
import pytest
from openai import OpenAI

from wsgi_proxy.simulator import Simulator

from .conftest import Proxy, simulator_fixture, start_red_and_blue, usage_rows

pytestmark = pytest.mark.e2e

KEYS = {"RED_KEY": "sk-red-budget-0123456789abcdef", "BLUE_KEY": "sk-blue-budget-0123456789abcdef"}
BUDGET = 100
CONCURRENT = 8


simulator = simulator_fixture(delay_ms=20, words=12)


@pytest.fixture(scope="module")
def gateway(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[tuple[Proxy, str]]:
    directory = tmp_path_factory.mktemp("budgets")
    proxy, store_url = start_red_and_blue(
        directory, simulator.base_url, KEYS, red=f"tokens_per_day = {BUDGET}\n"
    )
    yield proxy, store_url
    proxy.server.stop()


def _client(proxy: Proxy, key: str) -> OpenAI:
    return OpenAI(base_url=proxy.base_url, api_key=KEYS[key], max_retries=0, timeout=30)


def test_concurrent_requests_cross_the_budget_by_at_most_their_own_usage_then_all_are_refused(
    gateway: tuple[Proxy, str], simulator: Simulator
) -> None:
    proxy, store_url = gateway
    totals: list[int] = []
    refusals: list[openai.RateLimitError] = []
    start = threading.Barrier(CONCURRENT)

    def one(client: OpenAI) -> None:
        start.wait()
        try:
            events = list(client.responses.create(model="gpt-4o-mini", input="spend it", stream=True))
            done = events[-1]
            assert done.type == "response.completed" and done.response.usage is not None
            totals.append(done.response.usage.total_tokens)
        except openai.RateLimitError as exc:
            refusals.append(exc)

    with _client(proxy, "RED_KEY") as client:
        for _ in range(3):  # waves of concurrent streams, until the budget is crossed
            threads = [threading.Thread(target=one, args=(client,)) for _ in range(CONCURRENT)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            used = sum(row.usage.total_tokens for row in usage_rows(store_url, len(totals), _of("red")))
            if used >= BUDGET:
                break
        assert used >= BUDGET, "the budget was never crossed: make the waves bigger"
        # The overshoot: what the requests admitted while the budget had room went on to use.
        assert used - BUDGET <= CONCURRENT * max(totals)
        assert used == sum(totals)

        creates_before, frames_before = _creates(simulator), len(simulator.frames)
        with pytest.raises(openai.RateLimitError) as refused:
            client.responses.create(model="gpt-4o-mini", input="one more")
        with client.responses.connect() as conn:
            conn.response.create(model="gpt-4o-mini", input="over the socket")
            error = next(event for event in conn if event.type in ("error", "response.completed"))
        assert _creates(simulator) == creates_before  # neither reached the upstream
        assert len(simulator.frames) == frames_before
    body = t.cast(dict[str, t.Any], refused.value.body)
    assert body["code"] == "insufficient_quota" and "daily token budget of team red" in body["message"]
    assert all(
        exc.body and t.cast(dict[str, t.Any], exc.body)["code"] == "insufficient_quota" for exc in refusals
    )
    assert error.type == "error" and error.error.code == "insufficient_quota" and error.status == 429

    with _client(proxy, "BLUE_KEY") as blue:  # another team's budget is its own
        assert blue.responses.create(model="gpt-4o-mini", input="blue is fine").status == "completed"


def _creates(simulator: Simulator) -> int:
    return sum(r.method == "POST" and r.path == "/v1/responses" for r in simulator.requests)


def _of(key: str) -> t.Callable[[t.Any], bool]:
    return lambda row: row.key_name == key
