"""The upstream client: one ``requests`` session per worker process, and the one place where
``requests``/``urllib3`` exceptions become the proxy's own (:func:`translate_errors`)."""

from __future__ import annotations

import contextlib
import http.cookiejar
import logging
import os
import threading
import typing as t

import requests
import urllib3
from requests.adapters import HTTPAdapter

from .config import ProxySettings
from .errors import (
    UpstreamProtocolError,
    UpstreamStreamInterrupted,
    UpstreamTimeout,
    UpstreamUnavailable,
)

__all__ = ["UpstreamClient", "UpstreamStream", "translate_errors", "translate_stream_errors"]

log = logging.getLogger("wsgi_proxy.upstream")

READ_SIZE = 65536
#: The most of an upstream error body the proxy reads and relays.
MAX_ERROR_BODY = 1024 * 1024


@contextlib.contextmanager
def translate_errors(target: str) -> t.Iterator[None]:
    """Turn transport failures before an answer into 502/504 :class:`~wsgi_proxy.errors.ProxyError`.

    Messages name the upstream's address, never a header; the original is chained for debugging.
    """
    try:
        yield
    except requests.ConnectTimeout as exc:
        raise UpstreamTimeout(
            f"The upstream at {target} did not accept a connection in time. Try again later;"
            " if it persists, the operator should check the upstream URL and its network path."
        ) from exc
    except (requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError) as exc:
        raise UpstreamTimeout(
            f"The upstream at {target} did not answer within the proxy's read timeout. Try again;"
            " for long generations use background mode."
        ) from exc
    except requests.exceptions.InvalidURL as exc:
        raise UpstreamProtocolError(
            f"The proxy could not build a valid upstream URL for {target}; the operator should check"
            " WSGI_PROXY_UPSTREAM_URL."
        ) from exc
    except (requests.exceptions.ContentDecodingError, urllib3.exceptions.DecodeError) as exc:
        raise UpstreamProtocolError(
            f"The upstream at {target} sent a body that could not be decoded. Try again."
        ) from exc
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise UpstreamUnavailable(
            f"The upstream at {target} could not be reached or dropped the connection"
            f" ({type(exc).__name__}). Try again later."
        ) from exc


@contextlib.contextmanager
def translate_stream_errors() -> t.Iterator[None]:
    """Turn a failure while reading a started stream into :class:`UpstreamStreamInterrupted`."""
    try:
        yield
    except (urllib3.exceptions.ReadTimeoutError, requests.ReadTimeout) as exc:
        # After a read timeout urllib3 returns b"" on the next read: never read on, or a cut
        # would pass for a clean end.
        raise UpstreamStreamInterrupted("the upstream was silent past the read timeout") from exc
    except (urllib3.exceptions.HTTPError, requests.RequestException, OSError, ValueError) as exc:
        raise UpstreamStreamInterrupted(f"the upstream connection failed ({type(exc).__name__})") from exc


class UpstreamStream:
    """The body of one streaming upstream response, read with ``raw.read1``.

    ``read1`` returns whatever one receive brings, so events are relayed as they arrive on
    chunked, Content-Length and close-delimited bodies alike (``iter_content``/``iter_lines``
    wait to fill a buffer on the latter two).
    """

    def __init__(self, response: requests.Response) -> None:
        self._response = response
        self._raw: urllib3.response.BaseHTTPResponse = response.raw
        self.framed = bool(getattr(self._raw, "chunked", False)) or "content-length" in response.headers
        self._closed = False

    def read(self) -> bytes:
        with translate_stream_errors():
            return self._raw.read1(READ_SIZE, decode_content=True)

    def shutdown(self) -> None:
        """Unblock a reader in another thread (the disconnect watchdog calls this)."""
        if self._closed:
            return
        with contextlib.suppress(Exception):
            self._raw.shutdown()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(Exception):
            self._response.close()


class _RefuseCookies(http.cookiejar.DefaultCookiePolicy):
    def set_ok(self, cookie: http.cookiejar.Cookie, request: t.Any) -> bool:
        return False


class UpstreamClient:
    """Sends requests to one upstream with one connection pool per worker process.

    The session is created lazily in each process (after gunicorn forks), ignores the environment
    (``trust_env=False``: no proxy variables, no ``.netrc``, no CA override behind the operator's
    back), refuses cookies so nothing leaks between clients, and is never mutated per request.

    :param settings: the proxy's settings (URL, timeouts, pool size, CA bundle).
    """

    def __init__(self, settings: ProxySettings) -> None:
        self.base_url = settings.upstream_url
        self.timeout = (settings.connect_timeout, settings.read_timeout)
        self._pool_size = settings.pool_size
        self._verify: bool | str = str(settings.upstream_ca_bundle) if settings.upstream_ca_bundle else True
        self._lock = threading.Lock()
        self._session: requests.Session | None = None
        self._pid = 0

    def _make_session(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False
        session.verify = self._verify
        session.cookies.set_policy(_RefuseCookies())
        # No automatic retries: a create must never reach the upstream twice behind the client's back.
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=self._pool_size, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session

    @property
    def session(self) -> requests.Session:
        pid = os.getpid()
        if self._session is None or self._pid != pid:
            with self._lock:
                if self._session is None or self._pid != pid:
                    self._session = self._make_session()
                    self._pid = pid
        return self._session

    def send(
        self,
        method: str,
        path: str,
        *,
        query: bytes,
        headers: t.Mapping[str, str],
        body: bytes | None,
        stream: bool,
    ) -> requests.Response:
        """Send one request; ``path`` is below the base URL and ``query`` goes as the client sent it."""
        url = self.base_url + path
        if query:
            url += "?" + query.decode("latin-1")
        session = self.session
        with translate_errors(self.base_url):
            request = requests.Request(method, url, headers=dict(headers), data=body)
            prepared = session.prepare_request(request)
            prepared.url = url  # exactly as received: requests would otherwise re-quote the query
            return session.send(prepared, stream=stream, timeout=self.timeout, allow_redirects=False)

    def read_body(self, response: requests.Response, limit: int | None = None) -> bytes:
        """The whole (decoded) body of a non-streaming response, or at most ``limit`` bytes of it."""
        with translate_errors(self.base_url):
            try:
                if limit is None:
                    return response.content
                return response.raw.read(limit, decode_content=True) or b""
            finally:
                if limit is not None:
                    response.close()
