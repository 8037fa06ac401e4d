"""Usage and cost as pure functions: every field of every shape the API reports, and the prices."""

from __future__ import annotations

import typing as t

import pytest

from wsgi_proxy.config.prices import DEFAULT_PRICES, ModelPrice, Price, PriceTable, usd
from wsgi_proxy.wire.usage import COUNTERS, Usage, usage_of

RESPONSE_USAGE = {
    "input_tokens": 1000,
    "input_tokens_details": {"cached_tokens": 600},
    "output_tokens": 300,
    "output_tokens_details": {"reasoning_tokens": 200},
    "total_tokens": 1300,
}
CHAT_USAGE = {
    "prompt_tokens": 50,
    "completion_tokens": 20,
    "total_tokens": 70,
    "prompt_tokens_details": {"cached_tokens": 10, "audio_tokens": 5},
    "completion_tokens_details": {"reasoning_tokens": 8, "audio_tokens": 2},
}


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            {"usage": RESPONSE_USAGE},
            Usage(
                input_tokens=1000,
                cached_input_tokens=600,
                output_tokens=300,
                reasoning_tokens=200,
                total_tokens=1300,
            ),
        ),
        (
            {"usage": CHAT_USAGE},
            Usage(
                input_tokens=50,
                cached_input_tokens=10,
                input_audio_tokens=5,
                output_tokens=20,
                reasoning_tokens=8,
                output_audio_tokens=2,
                total_tokens=70,
            ),
        ),
        (  # an embedding: prompt tokens only
            {"usage": {"prompt_tokens": 8, "total_tokens": 8}},
            Usage(input_tokens=8, total_tokens=8),
        ),
        (  # an image: its input's image tokens
            {
                "usage": {
                    "input_tokens": 50,
                    "input_tokens_details": {"text_tokens": 10, "image_tokens": 40},
                    "output_tokens": 4160,
                    "total_tokens": 4210,
                }
            },
            Usage(input_tokens=50, input_image_tokens=40, output_tokens=4160, total_tokens=4210),
        ),
        (  # cache writes, in the spellings compatible servers use
            {
                "usage": {
                    "input_tokens": 9,
                    "input_tokens_details": {"cache_write_tokens": 4},
                    "output_tokens": 1,
                }
            },
            Usage(input_tokens=9, cache_write_tokens=4, output_tokens=1, total_tokens=10),
        ),
        (
            {"usage": {"prompt_tokens": 9, "completion_tokens": 1, "cache_creation_input_tokens": 3}},
            Usage(input_tokens=9, cache_write_tokens=3, output_tokens=1, total_tokens=10),
        ),
        (  # tool calls from a Response's output items, whatever else is there
            {
                "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2},
                "output": [
                    {"type": "web_search_call"},
                    {"type": "web_search_call"},
                    {"type": "file_search_call"},
                    {"type": "code_interpreter_call"},
                    {"type": "image_generation_call"},
                    {"type": "message"},
                    {"type": ["not", "a", "name"]},
                    "not an item",
                ],
            },
            Usage(
                input_tokens=1,
                output_tokens=1,
                total_tokens=2,
                web_search_calls=2,
                file_search_calls=1,
                code_interpreter_calls=1,
                image_generation_calls=1,
            ),
        ),
        (  # details of the wrong type count as 0; a total given is kept as it is
            {
                "usage": {
                    "input_tokens": 3,
                    "input_tokens_details": {"cached_tokens": "2"},
                    "output_tokens_details": [1],
                    "output_tokens": 5,
                    "total_tokens": 99,
                }
            },
            Usage(input_tokens=3, output_tokens=5, total_tokens=99),
        ),
        ({"usage": {"input_tokens": True, "output_tokens": 1}}, None),
        ({"usage": {"input_tokens": -1}}, None),
        ({"usage": {"output_tokens": 5}}, None),
        ({"usage": None}, None),  # a response still running
        ({"usage": [1, 2]}, None),
        ({}, None),
    ],
    ids=[
        "response",
        "chat",
        "embedding",
        "image",
        "cache_write_tokens",
        "cache_creation_input_tokens",
        "tool_calls",
        "wrong_types",
        "bool_input",
        "negative_input",
        "no_input",
        "null",
        "list",
        "none",
    ],
)
def test_usage_of(payload: dict[str, t.Any], expected: Usage | None) -> None:
    assert usage_of(payload) == expected


def test_a_log_line_reports_the_totals_always_and_the_rest_when_not_zero() -> None:
    usage = Usage(input_tokens=5, reasoning_tokens=2, total_tokens=5)
    assert usage.reported() == {
        "input_tokens": 5,
        "output_tokens": 0,
        "reasoning_tokens": 2,
        "total_tokens": 5,
    }
    assert list(usage.counts()) == list(COUNTERS)


@pytest.mark.parametrize(
    ("price", "usage", "nano_usd"),
    [
        # 1M input at $2.50, 1M output at $10.
        (Price(input=2.5, output=10.0), Usage(input_tokens=10**6, output_tokens=10**6), 12_500_000_000),
        # Cached input at its own price; reasoning tokens are output tokens.
        (
            Price(input=2.0, cached_input=0.5, output=8.0),
            Usage(input_tokens=1000, cached_input_tokens=600, output_tokens=300, reasoning_tokens=200),
            400 * 2000 + 600 * 500 + 300 * 8000,
        ),
        # Without a price of their own, cached input and cache writes cost the input price.
        (
            Price(input=1.0, output=0.0),
            Usage(input_tokens=100, cached_input_tokens=30, cache_write_tokens=20),
            100 * 1000,
        ),
        (
            Price(input=1.0, cache_write=1.25, input_audio=40.0, output=4.0, output_audio=80.0),
            Usage(
                input_tokens=100,
                cache_write_tokens=20,
                input_audio_tokens=10,
                output_tokens=50,
                output_audio_tokens=5,
            ),
            70 * 1000 + 20 * 1250 + 10 * 40_000 + 45 * 4000 + 5 * 80_000,
        ),
        # Tool calls per thousand: $10 per thousand web searches is a cent each.
        (Price(input=0.0, web_search_calls=10.0), Usage(web_search_calls=3), 30_000_000),
        # Inconsistent details never make a part negative.
        (Price(input=1.0), Usage(input_tokens=5, cached_input_tokens=50), 50 * 1000),
    ],
    ids=["plain", "cached_and_reasoning", "parts_at_input_price", "every_part", "tool_calls", "inconsistent"],
)
def test_price_cost(price: Price, usage: Usage, nano_usd: int) -> None:
    assert price.cost(usage) == nano_usd


def test_the_table_prefers_the_upstreams_prices_then_the_files_then_the_snapshots_base_model() -> None:
    mine = ModelPrice(input=1.0, output=1.0)
    negotiated = ModelPrice(input=0.5, output=0.5, tiers={"flex": Price(input=0.1, output=0.1)})
    table = PriceTable({**DEFAULT_PRICES, "ft:mine": mine}, {"azure": {"gpt-4o": negotiated}})
    usage = Usage(input_tokens=10**6)
    assert table.cost("gpt-4o", "openai", None, usage) == 2_500_000_000
    assert table.cost("gpt-4o-2024-08-06", "openai", "default", usage) == 2_500_000_000
    assert table.cost("gpt-4o", "azure", "default", usage) == 500_000_000
    assert table.cost("gpt-4o-2024-08-06", "azure", "flex", usage) == 100_000_000
    assert table.cost("ft:mine", None, "priority", usage) == 1_000_000_000  # no such tier: standard
    assert table.cost("gpt-5", "openai", "flex", usage) == 625_000_000
    assert table.cost("gpt-5", "openai", "priority", usage) == 2_500_000_000
    assert table.cost("unknown-model", "openai", None, usage) is None
    assert table.cost(None, "openai", None, usage) is None
    assert usd(12_500_000_000) == 12.5
