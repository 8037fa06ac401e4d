"""Token limits and budgets, per key and per team: enforced before the upstream, visible in a header.

In process (Flask's test client, the upstream mocked), so that the counts are exact; the budget
crossed by concurrent requests through real gunicorn workers is in ``tests/e2e/test_budgets.py``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
import typing as t
from pathlib import Path

import pytest
import responses
from flask import Flask

from wsgi_proxy import ProxySettings, create_app
from wsgi_proxy.config.gateway import Budget, GatewayConfig
from wsgi_proxy.wire.headers import budget_remaining

from .envelope import assert_error

UPSTREAM = "http://upstream.test/v1"
KEYS = {"A": "sk-budget-a-0000000000", "B": "sk-budget-b-0000000000", "C": "sk-budget-c-0000000000"}

CONFIG = f"""
[[upstreams]]
name = "main"
url = "{UPSTREAM}"
api_key_env = "UP_KEY"

[teams.small]
tokens_per_day = 100

[teams.rich]
usd_per_month = 0.00001

[teams.quick]

[[keys]]
name = "a"
team = "small"
sha256 = "{hashlib.sha256(KEYS["A"].encode()).hexdigest()}"

[[keys]]
name = "b"
team = "rich"
sha256 = "{hashlib.sha256(KEYS["B"].encode()).hexdigest()}"
usd_per_day = 1.0

[[keys]]
name = "c"
team = "quick"
sha256 = "{hashlib.sha256(KEYS["C"].encode()).hexdigest()}"
tpm = 30
"""


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Flask:
    path = tmp_path / "gateway.toml"
    path.write_text(CONFIG)
    monkeypatch.setenv("UP_KEY", "sk-upstream-budget")
    flask_app = create_app(ProxySettings(config=path, store_url=f"sqlite:///{tmp_path / 'state.db'}"))
    flask_app.testing = True
    return flask_app


@pytest.fixture
def mocked() -> t.Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        counter = iter(range(1, 10_000))

        def answer(_: t.Any) -> tuple[int, dict[str, str], str]:
            usage = {"input_tokens": 30, "output_tokens": 10, "total_tokens": 40}
            body = {"id": f"resp_{next(counter)}", "object": "response", "model": "gpt-4o", "usage": usage}
            return 200, {}, json.dumps(body)

        mock.add_callback(responses.POST, f"{UPSTREAM}/responses", callback=answer)
        yield mock


def _create(app: Flask, who: str) -> t.Any:
    headers = {"Authorization": f"Bearer {KEYS[who]}"}
    return app.test_client().post("/v1/responses", json={"model": "gpt-4o", "input": "x"}, headers=headers)


def _away_from_a_minute_boundary() -> None:
    if 60 - time.time() % 60 < 3:  # the per-minute window is the clock's: do not straddle two
        time.sleep(3.1)


def test_a_daily_token_budget_is_spent_then_refused_before_the_upstream(
    app: Flask, mocked: responses.RequestsMock
) -> None:
    answers = [_create(app, "A") for _ in range(3)]
    # 40 tokens each against 100 a day: the third is admitted with 20 left and takes the team past it.
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.headers["X-Budget-Remaining"] for a in answers] == [
        "team:small tokens_per_day=100",
        "team:small tokens_per_day=60",
        "team:small tokens_per_day=20",
    ]
    refused = _create(app, "A")
    error = assert_error(refused, 429, code="insufficient_quota", type="insufficient_quota")
    tomorrow = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)).strftime("%Y-%m-%d")
    assert error["message"] == (
        "The daily token budget of team small is spent (120 of 100 tokens used today, UTC). It resets at"
        f" {tomorrow}T00:00:00Z; ask the gateway's operator if you need more before then."
    )
    assert 0 < int(refused.headers["Retry-After"]) <= 86400
    assert "X-Budget-Remaining" not in refused.headers
    assert len(mocked.calls) == 3  # the refused one never reached the upstream


def test_cost_budgets_of_the_key_and_its_team_both_count(app: Flask, mocked: responses.RequestsMock) -> None:
    # gpt-4o at the default prices: 30 input tokens at $2.50/M and 10 output at $10/M cost $0.000175,
    # past the team's $0.00001 a month at once; the key's own $1 a day would have room.
    first = _create(app, "B")
    assert first.status_code == 200
    assert first.headers["X-Budget-Remaining"] == "team:rich usd_per_month=0.00001, key:b usd_per_day=1"
    refused = _create(app, "B")
    error = assert_error(refused, 429, code="insufficient_quota", type="insufficient_quota")
    assert error["message"].startswith(
        "The monthly cost budget of team rich is spent (US$0.000175 of US$0.00001 spent this month, UTC)."
    )
    assert len(mocked.calls) == 1


def test_tokens_per_minute_are_a_rate_limit(app: Flask, mocked: responses.RequestsMock) -> None:
    _away_from_a_minute_boundary()
    assert _create(app, "C").status_code == 200  # 40 tokens against 30 a minute: admitted with room
    limited = _create(app, "C")
    error = assert_error(limited, 429, code="rate_limit_exceeded", type="rate_limit_error")
    assert error["message"].startswith(
        "Rate limit reached: 30 tokens per minute for key c (40 used this minute)."
    )
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert len(mocked.calls) == 1


def test_a_caller_without_budgets_gets_no_header_and_no_store_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mocked: responses.RequestsMock
) -> None:
    monkeypatch.setenv("WSGI_PROXY_UPSTREAM_URL", UPSTREAM)
    monkeypatch.setenv("WSGI_PROXY_UPSTREAM_API_KEY", "sk-upstream-budget")
    monkeypatch.setenv("WSGI_PROXY_API_KEYS", KEYS["A"])
    flask_app = create_app(ProxySettings(store_url=f"sqlite:///{tmp_path / 'state.db'}"))
    answer = _create(flask_app, "A")
    assert answer.status_code == 200 and "X-Budget-Remaining" not in answer.headers


def test_the_file_becomes_budgets_per_level_cost_in_nano_dollars(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(CONFIG)
    settings = ProxySettings(config=path, store_url=f"sqlite:///{tmp_path / 's.db'}")
    keys = GatewayConfig.from_settings(settings, {"UP_KEY": "sk-upstream-budget"}).keys
    assert [key.identity.budgets for key in keys] == [
        (Budget("team:small", "tokens_per_day", 100),),
        (Budget("team:rich", "usd_per_month", 10_000), Budget("key:b", "usd_per_day", 1_000_000_000)),
        (Budget("key:c", "tpm", 30),),
    ]
    assert keys[1].identity.charges == ("team:rich", "key:b")


@pytest.mark.parametrize(
    ("left", "header"),
    [
        ([("team:t", "tokens_per_day", 5)], "team:t tokens_per_day=5"),
        ([("key:k", "usd_per_day", 1_500_000_000)], "key:k usd_per_day=1.5"),
        ([("key:k", "usd_per_month", 1)], "key:k usd_per_month=0"),  # below a millionth of a dollar
        (
            [("key:k", "tpm", 0), ("team:t", "usd_per_month", 250_000)],
            "key:k tpm=0, team:t usd_per_month=0.00025",
        ),
        ([], ""),
    ],
)
def test_budget_remaining_header(left: list[tuple[str, str, int]], header: str) -> None:
    assert budget_remaining(left) == header


def test_the_budgets_command_shows_use_left_and_reset_of_every_budget(
    app: Flask, mocked: responses.RequestsMock, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from wsgi_proxy.tools.cli import main

    assert _create(app, "A").status_code == 200  # 40 tokens of team small's 100 a day
    capsys.readouterr()  # the request's own log line
    status = main(
        [
            "budgets",
            "--config",
            str(tmp_path / "gateway.toml"),
            "--store",
            f"sqlite:///{tmp_path / 'state.db'}",
            "--format",
            "json",
        ]
    )
    out, _ = capsys.readouterr()
    rows = {(row["counter"], row["budget"]): row for row in json.loads(out)}
    assert status == 0
    assert set(rows) == {
        ("team:small", "tokens_per_day"),
        ("team:rich", "usd_per_month"),
        ("key:b", "usd_per_day"),
        ("key:c", "tpm"),
    }
    small = rows[("team:small", "tokens_per_day")]
    assert (small["limit"], small["used"], small["left"], small["spent"]) == (100, 40, 60, False)
    tomorrow = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)).strftime("%Y-%m-%d")
    assert small["resets"] == f"{tomorrow}T00:00:00Z"
    assert rows[("key:b", "usd_per_day")]["limit"] == 1.0
    main(
        [
            "budgets",
            "--config",
            str(tmp_path / "gateway.toml"),
            "--store",
            f"sqlite:///{tmp_path / 'state.db'}",
        ]
    )
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["who", "budget", "limit", "used", "left", "resets", "state"]
    assert any(line.split()[:5] == ["team:small", "tokens_per_day", "100", "40", "60"] for line in table)
