"""The one boundary where requests/urllib3 exceptions become the proxy's own."""

from __future__ import annotations

import inspect
import json
import typing as t

import pytest
import requests
import urllib3

from wsgi_proxy.config import ProxySettings
from wsgi_proxy.config.gateway import GatewayConfig
from wsgi_proxy.errors import (
    ProxyError,
    UpstreamProtocolError,
    UpstreamStreamInterrupted,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from wsgi_proxy.upstream.client import UpstreamClient
from wsgi_proxy.upstream.translate import translate_errors, translate_stream_errors

TARGET = "http://upstream.test/v1"
_NO_POOL: t.Any = None
# Exceptions may quote a request's headers; the proxy's messages must never carry them on.
SECRET = "Bearer sk-SECRET-in-exception-42"


def _make(cls: type[BaseException]) -> BaseException:
    if issubclass(cls, json.JSONDecodeError):
        return cls(SECRET, "{", 0)
    return cls(SECRET)


def _translate(exc: BaseException) -> ProxyError:
    with pytest.raises(ProxyError) as info, translate_errors("main"):
        raise exc
    assert info.value.__cause__ is exc
    return info.value


def _all_request_exceptions() -> list[type[requests.RequestException]]:
    found: set[type[requests.RequestException]] = set()
    pending = [
        obj
        for _, obj in inspect.getmembers(requests.exceptions, inspect.isclass)
        if issubclass(obj, requests.RequestException)
    ]
    while pending:
        cls = pending.pop()
        if cls not in found and cls.__module__.startswith("requests"):
            found.add(cls)
            pending.extend(cls.__subclasses__())
    return sorted(found, key=lambda c: c.__name__)


@pytest.mark.parametrize(
    ("exc", "expected", "status"),
    [
        (requests.ConnectTimeout(SECRET), UpstreamTimeout, 504),
        (requests.ReadTimeout(SECRET), UpstreamTimeout, 504),
        (urllib3.exceptions.ReadTimeoutError(_NO_POOL, TARGET, SECRET), UpstreamTimeout, 504),
        (requests.ConnectionError(SECRET), UpstreamUnavailable, 502),
        (requests.exceptions.SSLError(SECRET), UpstreamUnavailable, 502),
        (requests.exceptions.ProxyError(SECRET), UpstreamUnavailable, 502),
        (requests.exceptions.ChunkedEncodingError(SECRET), UpstreamUnavailable, 502),
        (requests.exceptions.ContentDecodingError(SECRET), UpstreamProtocolError, 502),
        (urllib3.exceptions.DecodeError(SECRET), UpstreamProtocolError, 502),
        (requests.exceptions.InvalidURL(SECRET), UpstreamProtocolError, 502),
        (requests.exceptions.InvalidProxyURL(SECRET), UpstreamProtocolError, 502),
        (urllib3.exceptions.ProtocolError(SECRET), UpstreamUnavailable, 502),
        (ConnectionResetError(104, SECRET), UpstreamUnavailable, 502),
        (OSError(SECRET), UpstreamUnavailable, 502),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_translate_errors_maps_exception(exc: BaseException, expected: type[ProxyError], status: int) -> None:
    error = _translate(exc)
    assert type(error) is expected
    assert error.status == status
    assert "'main'" in error.message and TARGET not in error.message
    assert "SECRET" not in error.message


def test_translate_errors_every_requests_exception_maps() -> None:
    classes = _all_request_exceptions()
    assert len(classes) >= 20, classes  # the walk really found the hierarchy
    escaped = []
    for cls in classes:
        exc = _make(cls)
        try:
            with translate_errors("main"):
                raise exc
        except ProxyError as error:
            assert error.status in (502, 504), cls
            assert "SECRET" not in error.message and "SECRET" not in error.body().decode(), cls
        except BaseException:  # noqa: BLE001 - any escape is the failure being looked for
            escaped.append(cls.__name__)
    assert escaped == []


def test_translate_errors_passes_other_exceptions_through() -> None:
    with pytest.raises(KeyError), translate_errors("main"):
        raise KeyError("not a transport error")


def test_translate_errors_leaves_success_alone() -> None:
    with translate_errors("main"):
        value = 1
    assert value == 1


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (urllib3.exceptions.ReadTimeoutError(_NO_POOL, TARGET, SECRET), "read timeout"),
        (requests.ReadTimeout(SECRET), "read timeout"),
        (urllib3.exceptions.ProtocolError(SECRET), "ProtocolError"),
        (urllib3.exceptions.IncompleteRead(5, 10), "IncompleteRead"),
        (urllib3.exceptions.DecodeError(SECRET), "DecodeError"),
        (requests.exceptions.ChunkedEncodingError(SECRET), "ChunkedEncodingError"),
        (ConnectionResetError(104, SECRET), "ConnectionResetError"),
        (OSError(SECRET), "OSError"),
        (ValueError(SECRET), "ValueError"),  # http.client on a cut/closed response
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_translate_stream_errors_interrupts(exc: BaseException, reason: str) -> None:
    with pytest.raises(UpstreamStreamInterrupted) as info, translate_stream_errors():
        raise exc
    assert reason in info.value.reason
    assert "SECRET" not in info.value.reason
    assert info.value.__cause__ is exc


def test_translate_stream_errors_passes_other_exceptions_through() -> None:
    with pytest.raises(KeyError), translate_stream_errors():
        raise KeyError("bug")


def test_upstream_client_session_ignores_environment_and_never_retries() -> None:
    client = UpstreamClient(
        GatewayConfig.from_settings(
            ProxySettings(upstream_url=TARGET, connect_timeout=1.5, read_timeout=30)
        ).upstreams[0]
    )
    session = client.session
    assert session is client.session  # one per process
    assert session.trust_env is False
    assert client.timeout == (1.5, 30)
    assert session.get_adapter("https://x").max_retries.total == 0  # type: ignore[attr-defined]
