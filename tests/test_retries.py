"""Retries where they are safe: the wait an upstream asks for, the backoff, and which failures are retried."""

from __future__ import annotations

import email.utils
import typing as t

import pytest
import requests
import responses

from wsgi_proxy.config.gateway import UpstreamSpec
from wsgi_proxy.errors import UpstreamUnavailable
from wsgi_proxy.upstream.client import UpstreamClient, UpstreamRequest
from wsgi_proxy.upstream.retries import RetryPolicy, backoff, retry_after, send_with_retries

NOW = 1_800_000_000.0
URL = "http://upstream.test/v1"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after": "-3"}, 0.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # the finer one wins
        ({"retry-after-ms": "soon", "retry-after": "9"}, 9.0),  # an unreadable one is skipped
        ({"retry-after": email.utils.formatdate(NOW + 30, usegmt=True)}, 30.0),
        ({"retry-after": email.utils.formatdate(NOW - 30, usegmt=True)}, 0.0),  # a date in the past
        ({"retry-after": "tomorrow"}, None),
        ({"retry-after": ""}, None),
    ],
    ids=[
        "none",
        "seconds",
        "fraction",
        "negative",
        "milliseconds",
        "milliseconds_win",
        "bad_milliseconds",
        "http_date",
        "past_date",
        "garbage",
        "empty",
    ],
)
def test_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after(headers, now=NOW) == expected


@pytest.mark.parametrize(
    ("attempt", "low", "high"), [(1, 0.25, 0.5), (2, 0.5, 1.0), (3, 1.0, 2.0), (9, 1.5, 3.0)]
)
def test_backoff_doubles_with_jitter_up_to_the_cap(attempt: int, low: float, high: float) -> None:
    for _ in range(50):
        assert low <= backoff(attempt, 0.5, 3.0) <= high


def _send(mock: responses.RequestsMock, *, idempotent: bool, attempts: int = 2) -> tuple[int | str, int]:
    tries: list[None] = []
    client = UpstreamClient(UpstreamSpec(name="u", url=URL))
    call = UpstreamRequest("GET" if idempotent else "POST", "/responses/resp_1")
    try:
        answer = send_with_retries(
            client,
            call,
            idempotent=idempotent,
            policy=RetryPolicy(attempts=attempts, max_wait=0.0),
            on_attempt=lambda: tries.append(None),
        )
    except UpstreamUnavailable as exc:
        return str(exc.code), len(tries)
    return answer.status_code, len(tries)


@pytest.mark.parametrize(
    ("first", "idempotent", "expected"),
    [
        ({"status": 503}, True, (200, 2)),
        ({"status": 429}, True, (200, 2)),
        ({"status": 500}, True, (500, 1)),  # not a transient status: the answer is relayed
        ({"status": 404}, True, (404, 1)),
        ({"body": requests.ConnectionError("reset")}, True, (200, 2)),
        ({"status": 503}, False, (503, 1)),  # a create is never sent twice
        ({"body": requests.ConnectionError("reset")}, False, ("upstream_unavailable", 1)),
    ],
    ids=["503", "429", "500", "404", "reset", "create_503", "create_reset"],
)
def test_what_is_retried(first: dict[str, t.Any], idempotent: bool, expected: tuple[int | str, int]) -> None:
    method = responses.GET if idempotent else responses.POST
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add(method, f"{URL}/responses/resp_1", **first)
        mock.add(method, f"{URL}/responses/resp_1", json={"id": "resp_1"})
        assert _send(mock, idempotent=idempotent) == expected


def test_a_wait_longer_than_allowed_is_left_to_the_client() -> None:
    with responses.RequestsMock() as mock:
        mock.add(responses.GET, f"{URL}/responses/resp_1", status=429, headers={"retry-after": "60"})
        assert _send(mock, idempotent=True) == (429, 1)


def test_attempts_are_bounded_and_each_one_is_counted() -> None:
    with responses.RequestsMock() as mock:
        for _ in range(3):
            mock.add(responses.GET, f"{URL}/responses/resp_1", body=requests.ConnectionError("reset"))
        assert _send(mock, idempotent=True, attempts=2) == ("upstream_unavailable", 3)
