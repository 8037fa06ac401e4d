"""The upstream client: one ``requests`` session per upstream and worker process, and the one value
(:class:`UpstreamRequest`) that describes each call to it.

Calls go straight to a lean transport adapter (see :class:`_LeanAdapter`, which overrides parts of
``requests.adapters.HTTPAdapter``; ``pyproject.toml`` bounds the versions it was checked against).
Every transport failure is translated in ``translate.py``.
"""

from __future__ import annotations

import http.client
import http.cookiejar
import logging
import os
import socket
import threading
import typing as t
from dataclasses import dataclass, field
from urllib.parse import quote

import requests
import urllib3.connection
from requests.adapters import HTTPAdapter

from ..config.gateway import UpstreamSpec
from ..errors import UpstreamProtocolError
from ..wire.query import replace_param
from .translate import translate_errors

__all__ = ["MAX_ERROR_BODY", "StreamedBody", "UpstreamClient", "UpstreamRequest"]

log = logging.getLogger("wsgi_proxy.upstream")

#: The client credentials a pass-through upstream gets, by lowercase name, in their canonical spelling.
_CLIENT_CREDENTIALS = {"authorization": "Authorization", "api-key": "api-key"}

#: What the gateway's own key is replaced with wherever an upstream echoes it.
REDACTED = b"<redacted>"
_REDACTED_TEXT = REDACTED.decode()

#: How many bytes of an upload go upstream per send.
_SEND_BLOCK = 256 * 1024

#: The largest error body the proxy relays in answer to a stream request.
MAX_ERROR_BODY = 1024 * 1024
_READ_SIZE = 65536


class StreamedBody:
    """A request body sent upstream as it is read from the client (an upload), never held whole.

    Its length is the client's ``Content-Length``, which goes upstream unchanged; a client body that
    ends short raises, so the upstream never waits for bytes that will not come.

    :param source: the client's body (the WSGI input).
    :param length: how many bytes it announced.
    """

    def __init__(self, source: t.BinaryIO, length: int) -> None:
        self._source = source
        self._length = length
        self._left = length

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        wanted = self._left if size < 0 else min(size, self._left)
        data = self._source.read(wanted)
        if not data:
            raise ConnectionAbortedError(
                f"the client's body ended {self._left} bytes short of its Content-Length"
            )
        self._left -= len(data)
        return data


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """One request to an upstream: ``path`` is below its base URL, ``query`` goes as the client sent it,
    ``headers`` are final (credentials included). A streaming request's answer is left unread."""

    method: str
    path: str
    query: bytes = b""
    headers: t.Mapping[str, str] = field(default_factory=dict)
    body: bytes | StreamedBody | None = None
    stream: bool = False


def _gateway_headers(spec: UpstreamSpec) -> dict[str, str]:
    if spec.api_key is None:
        return {}
    headers = (
        {"api-key": spec.api_key} if spec.kind == "azure" else {"Authorization": "Bearer " + spec.api_key}
    )
    if spec.organization:
        headers["OpenAI-Organization"] = spec.organization
    if spec.project:
        headers["OpenAI-Project"] = spec.project
    return headers


def _prepare(
    method: str, url: str, headers: dict[str, str], body: bytes | StreamedBody | None
) -> requests.PreparedRequest:
    """A request ready for the adapter, its URL exactly as given (``prepare`` would re-quote the
    client's query), its headers checked by requests for injected line breaks."""
    prepared = requests.PreparedRequest()
    prepared.method = method
    prepared.url = url
    prepared.prepare_headers(headers)
    # A StreamedBody goes out a block at a time with its length (requests takes any file-like body;
    # its type stubs say bytes).
    prepared.body = t.cast(t.Any, body)
    prepared.prepare_content_length(t.cast(t.Any, body))
    return prepared


#: The read buffer of an upstream response, where http.client's is 8 KiB. It takes the status line,
#: the headers and a chunked body's size lines; a body itself is read past it (``UpstreamStream``
#: reads an empty buffer's socket straight into the bytes it returns). A stream holds its buffer for
#: its whole life: at 8 KiB it was ~5 KB of each open stream's RSS (1,000 streams on one worker:
#: 73 KB each, 68 KB with 2 KiB, 70 KB with 4 KiB). Longer headers take more than one receive.
_HEAD_BUFFER = 2048


class _SmallBuffered:
    """A socket as http.client's response sees it: the file it makes has a small buffer."""

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def makefile(self, mode: t.Literal["rb"]) -> t.Any:
        return self._sock.makefile(mode, buffering=_HEAD_BUFFER)


class _LeanResponse(http.client.HTTPResponse):
    """http.client's response, reading through a :data:`_HEAD_BUFFER` buffer (its ``__init__`` only
    calls the socket's ``makefile``)."""

    def __init__(self, sock: socket.socket, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(t.cast(socket.socket, _SmallBuffered(sock)), *args, **kwargs)


class _LeanHTTPConnection(urllib3.connection.HTTPConnection):
    response_class = _LeanResponse


class _LeanHTTPSConnection(urllib3.connection.HTTPSConnection):
    response_class = _LeanResponse


#: The connection class each of urllib3's pools gets instead of its own.
_LEAN_CONNECTIONS: dict[type, type] = {
    urllib3.connection.HTTPConnection: _LeanHTTPConnection,
    urllib3.connection.HTTPSConnection: _LeanHTTPSConnection,
}


class _LeanAdapter(HTTPAdapter):
    """requests' transport adapter for one upstream, without the per-call work the proxy never needs.

    - The connection pool is looked up once per scheme, host and port, not by re-parsing the URL and
      re-checking the CA bundle on every call (the proxy has no per-request proxies or client certs).
    - Responses skip cookie extraction: the proxy refuses upstream cookies (see ``_RefuseCookies``).
    - Its pools' connections read responses through a small buffer (:data:`_HEAD_BUFFER`).
    - A response's headers are urllib3's, not a copy in requests' dict: the same case-insensitive
      lookups (repeated headers joined), and ``items()`` gives each line as the upstream sent it. An
      open stream kept both, 2.6 KB of its RSS.
    """

    def __init__(self, **kwargs: t.Any) -> None:
        super().__init__(**kwargs)
        self._pools: dict[tuple[str, bool | str], t.Any] = {}  # each with its TLS settings applied

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **kwargs: t.Any) -> None:
        # Uploads go out in blocks of this size (urllib3's default is 16 KiB): fewer, larger sends.
        super().init_poolmanager(connections, maxsize, block, blocksize=_SEND_BLOCK, **kwargs)

    def get_connection_with_tls_context(
        self, request: requests.PreparedRequest, verify: t.Any, proxies: t.Any = None, cert: t.Any = None
    ) -> t.Any:
        if proxies or cert:  # not the proxy's own path: requests decides
            return super().get_connection_with_tls_context(request, verify, proxies=proxies, cert=cert)
        scheme, _, rest = str(request.url).partition("://")
        key = (scheme + "://" + rest.split("/", 1)[0].split("?", 1)[0], verify)
        pool: t.Any = self._pools.get(key)
        if pool is None:
            pool = super().get_connection_with_tls_context(request, verify)
            super().cert_verify(pool, str(request.url), verify, None)  # type: ignore[no-untyped-call]
            pool.ConnectionCls = _LEAN_CONNECTIONS.get(pool.ConnectionCls, pool.ConnectionCls)
            self._pools[key] = pool
        return pool

    def cert_verify(self, conn: t.Any, url: str, verify: t.Any, cert: t.Any) -> None:
        if cert or not any(conn is pool for pool in self._pools.values()):
            super().cert_verify(conn, url, verify, cert)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self._pools.clear()
        super().close()

    def build_response(self, req: requests.PreparedRequest, resp: t.Any) -> requests.Response:
        response = requests.Response()
        response.status_code = resp.status
        # urllib3's headers as they are (case-insensitive too), not a copy an open stream would keep.
        response.headers = t.cast(t.Any, resp.headers)
        response.encoding = requests.utils.get_encoding_from_headers(response.headers)
        response.raw = resp
        response.reason = resp.reason
        response.url = str(req.url)
        response.request = req
        response.connection = self
        return response


class _RefuseCookies(http.cookiejar.DefaultCookiePolicy):
    def set_ok(self, cookie: http.cookiejar.Cookie, request: t.Any) -> bool:
        return False


class UpstreamClient:
    """Sends requests to one upstream with one connection pool per worker process.

    The session is created lazily in each process (after gunicorn forks), ignores the environment
    (``trust_env=False``: no proxy variables, no ``.netrc``, no CA override behind the operator's
    back), refuses cookies so nothing leaks between clients, and is never mutated per request.

    :param spec: the upstream.
    :param pool_size: connections kept per worker process.
    :param ca_bundle: a CA bundle for the upstream's certificate (the system store when None).
    :param max_answer_bytes: the largest whole answer read, decoded; a larger one is a 502.
    """

    def __init__(
        self,
        spec: UpstreamSpec,
        *,
        pool_size: int = 1000,
        ca_bundle: str | None = None,
        max_answer_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.name = spec.name
        self.base_url = spec.url
        version = spec.api_version
        self._api_version = quote(version, safe="").encode("ascii") if version is not None else None
        self._extra_headers = dict(spec.headers)
        self.timeout = (spec.connect_timeout, spec.read_timeout)
        self.read_timeout = spec.read_timeout
        self.pass_through = spec.api_key is None
        self.websockets = spec.websockets
        self.connect_timeout = spec.connect_timeout
        self._gateway_headers = _gateway_headers(spec)
        self._secret_text = spec.api_key or None
        self._secret = self._secret_text.encode("utf-8", "surrogateescape") if self._secret_text else None
        self._pool_size = pool_size
        self._max_answer_bytes = max_answer_bytes
        self._verify: bool | str = ca_bundle or True
        self._lock = threading.Lock()
        self._session: requests.Session | None = None
        self._pid = 0

    def scrub(self, data: bytes) -> bytes:
        """``data`` without the gateway's own key: an upstream may echo it in anything it sends."""
        secret = self._secret
        if secret is None or secret not in data:
            return data
        log.warning("upstream %s echoed the gateway's key in an answer; it was redacted", self.name)
        return data.replace(secret, REDACTED)

    def scrub_headers(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Response headers without the gateway's own key in any value."""
        key = self._secret_text
        if key is None:
            return headers
        return [(name, value.replace(key, _REDACTED_TEXT)) for name, value in headers]

    def credentials(self, client_headers: t.Iterable[tuple[str, str]]) -> dict[str, str]:
        """Headers that authenticate a request here: the gateway's key, or the client's own."""
        if not self.pass_through:
            return dict(self._gateway_headers)
        own = {}
        for name, value in client_headers:
            canonical = _CLIENT_CREDENTIALS.get(name.lower())
            if canonical is not None and canonical not in own:
                own[canonical] = value
        return own

    def _make_session(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False
        session.verify = self._verify
        session.cookies.set_policy(_RefuseCookies())
        # No automatic retries: a create must never reach the upstream twice behind the client's back.
        adapter = _LeanAdapter(pool_connections=4, pool_maxsize=self._pool_size, max_retries=0)
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

    def url(self, path: str, query: bytes = b"") -> str:
        """The upstream URL of ``path`` (below the base URL) with the client's raw ``query``."""
        url = self.base_url + path
        if self._api_version is not None:
            # Azure's legacy API wants the version on every call; the operator's choice wins.
            query = replace_param(query, "api-version", self._api_version, first=True)
        if query:
            url += "?" + query.decode("latin-1")
        return url

    @property
    def ca_bundle(self) -> str | None:
        """The CA bundle the upstream's certificate is checked against (None: the system's)."""
        return self._verify if isinstance(self._verify, str) else None

    def send(self, call: UpstreamRequest) -> requests.Response:
        """Send one request and return the answer (read whole unless ``call.stream``)."""
        url = self.url(call.path, call.query)
        adapter = self.session.get_adapter(url)
        with translate_errors(self.name):
            prepared = _prepare(call.method, url, self._extra_headers | dict(call.headers), call.body)
            # Straight to the transport adapter: Session.send would only add cookie handling (refused
            # here), hooks and redirects (never followed), at ~0.1 ms of CPU per call.
            answer = adapter.send(prepared, stream=True, timeout=self.timeout, verify=self._verify)
        if not call.stream:
            self._read_whole(answer, self._max_answer_bytes)
        return answer

    def read_body(self, response: requests.Response, limit: int = MAX_ERROR_BODY) -> bytes:
        """The whole (decoded) body of an answer that was left unread, up to ``limit`` bytes."""
        return self._read_whole(response, limit)

    def _read_whole(self, response: requests.Response, limit: int) -> bytes:
        """Read the body, decoded, into ``response.content``; a 502 when it is larger than ``limit``.

        Each read decompresses at most what it returns (urllib3 >= 2.6.3), so a compression bomb
        costs no more memory than ``limit``.
        """
        parts: list[bytes] = []
        size = 0
        with translate_errors(self.name):  # a body cut short is a 502 too
            while piece := response.raw.read(_READ_SIZE, decode_content=True):
                size += len(piece)
                if size > limit:
                    response.close()
                    raise UpstreamProtocolError(
                        f"The upstream {self.name!r} answered HTTP {response.status_code} with a body"
                        f" larger than the {limit} bytes the proxy relays whole. If that is expected,"
                        " the operator can raise WSGI_PROXY_MAX_ANSWER_BYTES; a stream is never bounded so."
                    )
                parts.append(piece)
        content = b"".join(parts)
        response._content = content  # what requests' .content returns from now on
        response._content_consumed = True  # type: ignore[attr-defined]
        return content
