"""The one boundary where ``requests``, ``urllib3`` and ``http.client`` exceptions become the proxy's own.

:func:`translate_errors` wraps everything up to a complete answer (502/504 errors);
:func:`translate_stream_errors` wraps each read of a started stream (an interruption the relay
decides about); :func:`translate_socket_errors` wraps the opening of an upstream WebSocket.
Messages name the upstream by its configured name, never a header or a key.
"""

from __future__ import annotations

import contextlib
import http.client
import ssl
import typing as t

import requests
import urllib3
import websockets.exceptions

from ..errors import (
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStreamInterrupted,
    UpstreamTimeout,
    UpstreamUnavailable,
)

__all__ = ["translate_errors", "translate_socket_errors", "translate_stream_errors"]


@contextlib.contextmanager
def translate_errors(upstream: str) -> t.Iterator[None]:
    """Turn transport failures before an answer into 502/504 :class:`~wsgi_proxy.errors.ProxyError`.

    :param upstream: the upstream's configured name: messages go to clients, which need not learn
        the address of anything behind the gateway. The original exception is chained for the logs.
    """
    try:
        yield
    except requests.ConnectTimeout as exc:
        raise _never_sent(UpstreamTimeout)(
            f"The upstream {upstream!r} did not accept a connection in time. Try again later;"
            " if it persists, the operator should check the upstream URL and its network path."
        ) from exc
    except (requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError) as exc:
        raise UpstreamTimeout(
            f"The upstream {upstream!r} did not answer within the proxy's read timeout. Try again;"
            " for long generations use background mode."
        ) from exc
    except requests.exceptions.InvalidURL as exc:
        raise UpstreamProtocolError(
            f"The proxy could not build a valid URL for the upstream {upstream!r}; the operator should"
            " check its URL."
        ) from exc
    except (requests.exceptions.ContentDecodingError, urllib3.exceptions.DecodeError) as exc:
        raise UpstreamProtocolError(
            f"The upstream {upstream!r} sent a body that could not be decoded. Try again."
        ) from exc
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        error = UpstreamUnavailable(
            f"The upstream {upstream!r} could not be reached or dropped the connection"
            f" ({type(exc).__name__}). Try again later."
        )
        error.never_sent = _connection_refused(exc)
        raise error from exc


def _connection_refused(exc: BaseException) -> bool:
    """True when ``exc`` proves the request never left: no connection was ever established."""
    seen: BaseException | None = exc
    for _ in range(8):  # requests wraps urllib3's MaxRetryError, which holds the reason
        if seen is None:
            return False
        if isinstance(seen, urllib3.exceptions.NewConnectionError | urllib3.exceptions.ConnectTimeoutError):
            return True
        reason = getattr(seen, "reason", None)
        if isinstance(reason, BaseException):
            seen = reason
            continue
        arg = seen.args[0] if seen.args else None
        seen = arg if isinstance(arg, BaseException) else seen.__cause__ or seen.__context__
    return False


def _never_sent(cls: type[UpstreamError]) -> t.Callable[[str], UpstreamError]:
    def make(message: str) -> UpstreamError:
        error = cls(message)
        error.never_sent = True
        return error

    return make


@contextlib.contextmanager
def translate_stream_errors() -> t.Iterator[None]:
    """Turn a failure while reading a started stream into :class:`UpstreamStreamInterrupted`."""
    try:
        yield
    except (urllib3.exceptions.ReadTimeoutError, requests.ReadTimeout) as exc:
        # After a read timeout urllib3 returns b"" on the next read: never read on, or a cut
        # would pass for a clean end.
        raise UpstreamStreamInterrupted("the upstream was silent past the read timeout") from exc
    except (
        urllib3.exceptions.HTTPError,
        requests.RequestException,
        http.client.HTTPException,  # e.g. IncompleteRead, from a chunk read past urllib3
        OSError,
        ValueError,
    ) as exc:
        raise UpstreamStreamInterrupted(f"the upstream connection failed ({type(exc).__name__})") from exc


@contextlib.contextmanager
def translate_socket_errors(upstream: str) -> t.Iterator[None]:
    """Turn a failure to open a WebSocket connection to ``upstream`` into a 502/504, before any frame."""
    try:
        yield
    except TimeoutError as exc:
        raise UpstreamTimeout(
            f"The upstream {upstream!r} did not open a WebSocket connection in time. Try again later;"
            " if it persists, the operator should check the upstream URL and its network path."
        ) from exc
    except ssl.SSLCertVerificationError as exc:
        raise UpstreamUnavailable(
            f"The upstream {upstream!r} presented a TLS certificate the proxy does not trust; the operator"
            " should check its URL and WSGI_PROXY_UPSTREAM_CA_BUNDLE."
        ) from exc
    except (OSError, websockets.exceptions.InvalidHandshake, websockets.exceptions.InvalidURI) as exc:
        raise UpstreamUnavailable(
            f"The upstream {upstream!r} could not be reached for a WebSocket connection"
            f" ({type(exc).__name__}). Try again later."
        ) from exc
