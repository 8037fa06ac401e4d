"""Unit-tier fixtures: a clean environment, an app factory and a mocked upstream."""

from __future__ import annotations

import os
import typing as t

import pytest
import responses
from flask import Flask

from wsgi_proxy import ProxySettings, create_app

UPSTREAM = "http://upstream.test/v1"


@pytest.fixture(autouse=True)
def _clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings must come from the test, never from the developer's shell."""
    for name in list(os.environ):
        if name.startswith("WSGI_PROXY_") or name == "OPENAI_API_KEY":
            monkeypatch.delenv(name)


@pytest.fixture
def make_app() -> t.Callable[..., Flask]:
    """Build a standalone proxy app from keyword settings (upstream defaults to ``UPSTREAM``)."""

    def factory(**settings: t.Any) -> Flask:
        settings.setdefault("upstream_url", UPSTREAM)
        app = create_app(ProxySettings(**settings))
        app.testing = True
        return app

    return factory


@pytest.fixture
def mocked() -> t.Iterator[responses.RequestsMock]:
    """The upstream, played by ``responses``; unmatched requests raise ConnectionError."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock
