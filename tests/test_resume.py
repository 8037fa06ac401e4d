"""The resume client: what each upstream answer to a re-opened stream means."""

from __future__ import annotations

import typing as t

import pytest
import requests
import responses

from wsgi_proxy.config.gateway import UpstreamSpec
from wsgi_proxy.upstream.body import UpstreamStream
from wsgi_proxy.upstream.client import UpstreamClient
from wsgi_proxy.upstream.resume import ResumePolicy, StreamResumer
from wsgi_proxy.wire.relay import Resume

URL = "http://upstream.test/v1"
RETRIEVE = f"{URL}/responses/resp_1"


def _resumer() -> StreamResumer:
    client = UpstreamClient(UpstreamSpec(name="u", url=URL))
    return StreamResumer(client, {"Authorization": "Bearer sk-up"}, b"stream=true", ResumePolicy())


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        ({"status": 200, "body": b"data: {}\n\n", "content_type": "text/event-stream"}, UpstreamStream),
        ({"status": 200, "json": {"id": "resp_1"}}, Resume.GIVE_UP),  # not a stream: nothing to resume
        ({"status": 400, "json": {"error": {}}}, Resume.GIVE_UP),
        ({"status": 401, "json": {"error": {}}}, Resume.GIVE_UP),
        ({"status": 404, "json": {"error": {}}}, Resume.GIVE_UP),
        ({"status": 408}, Resume.RETRY),
        ({"status": 409}, Resume.RETRY),
        ({"status": 429}, Resume.RETRY),
        ({"status": 500}, Resume.RETRY),
        ({"status": 502}, Resume.RETRY),
        ({"status": 503}, Resume.RETRY),
        ({"status": 504}, Resume.RETRY),
        ({"body": requests.ConnectionError("refused")}, Resume.RETRY),
        ({"body": requests.ReadTimeout("silent")}, Resume.RETRY),
    ],
    ids=lambda value: str(value.get("status", "exception")) if isinstance(value, dict) else "",
)
def test_reopen(answer: dict[str, t.Any], outcome: t.Any) -> None:
    with responses.RequestsMock() as mock:
        mock.add(responses.GET, RETRIEVE, **answer)
        got = _resumer().reopen("resp_1", 7)
        (call,) = mock.calls
    assert t.cast(str, call.request.url).endswith("/responses/resp_1?stream=true&starting_after=7")
    if isinstance(outcome, Resume):
        assert got is outcome
    else:
        assert isinstance(got, outcome)
        got.close()


@pytest.mark.parametrize(
    ("answer", "ended"),
    [
        ({"json": {"status": "completed"}}, True),
        ({"json": {"status": "failed"}}, True),
        ({"json": {"status": "cancelled"}}, True),
        ({"json": {"status": "incomplete"}}, True),
        ({"json": {"status": "in_progress"}}, False),
        ({"json": {"status": "queued"}}, False),
        ({"json": {}}, False),
        ({"json": ["completed"]}, False),
        ({"body": b"not json"}, False),
        ({"status": 404, "json": {"status": "completed"}}, False),
        ({"body": requests.ConnectionError("refused")}, False),
    ],
)
def test_has_ended(answer: dict[str, t.Any], ended: bool) -> None:
    with responses.RequestsMock() as mock:
        mock.add(responses.GET, RETRIEVE, **answer)
        assert _resumer().has_ended("resp_1") is ended
        (call,) = mock.calls
    assert call.request.headers.get("Accept-Encoding") != "identity"  # a JSON retrieve, not a stream
