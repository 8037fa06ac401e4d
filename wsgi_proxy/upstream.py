"""The upstream client: one ``requests`` session per worker process, and the one place where
``requests``/``urllib3`` exceptions become the proxy's own (:func:`translate_errors`)."""

from __future__ import annotations

import contextlib
import http.client
import http.cookiejar
import logging
import os
import select
import socket
import ssl
import threading
import typing as t
from dataclasses import dataclass, field
from urllib.parse import quote

import requests
import urllib3
from requests.adapters import HTTPAdapter

from .config import ProxySettings

if t.TYPE_CHECKING:  # pragma: no cover
    from .configfile import UpstreamEntry
from .errors import (
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStreamInterrupted,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .query import replace_param

__all__ = ["UpstreamClient", "UpstreamSpec", "UpstreamStream", "translate_errors", "translate_stream_errors"]

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
        raise _never_sent(UpstreamTimeout)(
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
        error = UpstreamUnavailable(
            f"The upstream at {target} could not be reached or dropped the connection"
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


class UpstreamStream:
    """The body of one streaming upstream response, read with ``raw.read1``.

    ``read1`` returns whatever one receive brings, so events are relayed as they arrive on
    chunked, Content-Length and close-delimited bodies alike (requests' content and line iterators
    wait to fill a buffer on the latter two).
    """

    def __init__(self, response: requests.Response) -> None:
        self._response = response
        self._raw: urllib3.response.BaseHTTPResponse = response.raw
        self._chunked = bool(getattr(self._raw, "chunked", False))
        self.framed = self._chunked or "content-length" in response.headers
        self._closed = False
        self._poller: select.poll | None = None
        # A decoder may need more network bytes before it yields any: read encoded bodies one by one.
        self._coalesce = "content-encoding" not in response.headers and hasattr(self._raw, "_fp")
        self._deferred: UpstreamStreamInterrupted | None = None

    def read(self) -> bytes:
        """The next bytes of the body: at least one, or b"" at its end.

        One ``read1`` takes at most one HTTP chunk, and upstreams often send an event per chunk; so
        while more of the body has already arrived, it is read on and returned together, up to
        ``READ_SIZE``. Nothing is waited for: the bytes go out as soon as the arrived ones are read.
        A failure after the first bytes is raised by the next call, so that those bytes go out first.
        """
        if self._deferred is not None:
            error, self._deferred = self._deferred, None
            raise error
        with translate_stream_errors():
            data = self._raw.read1(READ_SIZE, decode_content=True) or b""
        size = len(data)
        if not size or not self._coalesce:
            return data
        parts = [data]
        # Chunk by chunk, http.client's read1 is the same read without urllib3's per-call bookkeeping
        # (which only counts bytes for a Content-Length, and chunked bodies have none).
        fp = self._raw._fp  # type: ignore[attr-defined]  # http.client.HTTPResponse
        read1 = fp.read1 if self._chunked else lambda n: self._raw.read1(n, decode_content=True)
        try:
            with translate_stream_errors():
                while size < READ_SIZE and self._more_arrived(fp):
                    more = read1(READ_SIZE - size)
                    if not more:
                        break
                    parts.append(more)
                    size += len(more)
        except UpstreamStreamInterrupted as exc:
            self._deferred = exc
        return data if len(parts) == 1 else b"".join(parts)

    def _more_arrived(self, fp: t.Any) -> bool:
        """Whether the next ``read1`` returns body bytes at once: no waiting, and not the end."""
        try:
            reader = fp.fp
            sock = reader.raw._sock
            if not isinstance(sock, ssl.SSLSocket) and self._poll(sock):
                ahead = reader.peek(1)  # bytes wait in the kernel: the peek cannot block
            else:
                ahead = _peek_without_blocking(reader, sock)
            return _body_bytes_in_buffer(ahead, fp.chunked, fp.chunk_left)
        except (AttributeError, TypeError, ValueError, OSError):
            return False

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the next :meth:`read` to have something to return.

        True when bytes (or the end, or an error) are there to read; False after ``timeout`` seconds
        of upstream silence, with nothing consumed, so that the relay can send a keep-alive and wait
        again. Reading with a socket timeout instead would not do: urllib3 closes the connection on a
        read timeout. Where the answer cannot be known (an unusual connection object) it says True,
        and the read simply blocks as it would without keep-alives.
        """
        try:
            fp = self._raw._fp  # type: ignore[attr-defined]  # http.client.HTTPResponse
            reader = fp.fp  # its BufferedReader over the socket
            sock: socket.socket = reader.raw._sock  # the SocketIO's socket, also when urllib3 let go of it
            # Bytes waiting in the kernel mean the read will progress: one syscall on a busy stream.
            if self._poll(sock) or len(self._raw._decoded_buffer):  # type: ignore[attr-defined]
                return True
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return True
            if _complete_in_buffer(_peek_without_blocking(reader, sock), fp.chunked, fp.chunk_left):
                return True
            return self._poll(sock, timeout)
        except (AttributeError, TypeError, ValueError, OSError):
            return True

    def _poll(self, sock: socket.socket, timeout: float = 0.0) -> bool:
        """Whether the kernel holds bytes of ``sock`` (waiting up to ``timeout`` seconds for some)."""
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(sock, select.POLLIN | select.POLLPRI)
        return bool(self._poller.poll(timeout * 1000))

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


def _peek_without_blocking(reader: t.Any, sock: socket.socket) -> bytes:
    """What the reader holds, or can take from the socket at once, without consuming it."""
    previous = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        return bytes(reader.peek(1) or b"")
    except (BlockingIOError, ssl.SSLWantReadError):
        return b""
    finally:
        sock.settimeout(previous)


def _body_bytes_in_buffer(ahead: bytes, chunked: bool, chunk_left: int | None) -> bool:
    """Whether ``ahead`` holds body bytes that the next read returns without the network.

    Stricter than :func:`_complete_in_buffer`: at the end of a chunk, the next chunk's size line
    and at least one of its bytes must be there, and the last (zero-size) chunk does not count.
    """
    if not chunked or chunk_left:
        return bool(ahead)
    if chunk_left == 0:  # the CRLF ending the previous chunk is still unread
        ahead = ahead[2:]
    line, newline, rest = ahead.partition(b"\n")
    if not newline or not rest:
        return False
    try:
        return int(line.split(b";", 1)[0].strip(), 16) > 0
    except ValueError:
        return False


def _complete_in_buffer(ahead: bytes, chunked: bool, chunk_left: int | None) -> bool:
    """Whether ``ahead`` lets the next read return data without waiting for the network.

    With chunked framing, at the end of a chunk the reader must first get past the chunk's CRLF
    and the next size line; bytes that stop short of that would make the read block.
    """
    if not chunked or chunk_left:
        return bool(ahead)
    if chunk_left == 0:  # the CRLF ending the previous chunk is still unread
        ahead = ahead[2:]
    return b"\n" in ahead


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


def _prepare(method: str, url: str, headers: dict[str, str], body: bytes | None) -> requests.PreparedRequest:
    """A request ready for the adapter, its URL exactly as given (``prepare`` would re-quote the
    client's query), its headers checked by requests for injected line breaks."""
    prepared = requests.PreparedRequest()
    prepared.method = method
    prepared.url = url
    prepared.prepare_headers(headers)
    prepared.body = body
    prepared.prepare_content_length(body)
    return prepared


class _LeanAdapter(HTTPAdapter):
    """requests' transport adapter for one upstream, without the per-call work the proxy never needs.

    - The connection pool is looked up once per scheme, host and port, not by re-parsing the URL and
      re-checking the CA bundle on every call (the proxy has no per-request proxies or client certs).
    - Responses skip cookie extraction: the proxy refuses upstream cookies (see ``_RefuseCookies``).
    """

    def __init__(self, **kwargs: t.Any) -> None:
        super().__init__(**kwargs)
        self._pools: dict[tuple[str, bool | str], t.Any] = {}  # each with its TLS settings applied

    def get_connection_with_tls_context(
        self, request: requests.PreparedRequest, verify: t.Any, proxies: t.Any = None, cert: t.Any = None
    ) -> t.Any:
        if proxies or cert:  # not the proxy's own path: requests decides
            return super().get_connection_with_tls_context(request, verify, proxies=proxies, cert=cert)
        scheme, _, rest = str(request.url).partition("://")
        key = (scheme + "://" + rest.split("/", 1)[0].split("?", 1)[0], verify)
        pool = self._pools.get(key)
        if pool is None:
            pool = super().get_connection_with_tls_context(request, verify)
            super().cert_verify(pool, str(request.url), verify, None)  # type: ignore[no-untyped-call]
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
        response.headers = requests.structures.CaseInsensitiveDict(resp.headers)
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


@dataclass(frozen=True)
class UpstreamSpec:
    """One upstream: where it is, how to authenticate to it, and how long to wait for it."""

    name: str
    url: str
    kind: str = "openai"
    api_key: str | None = field(default=None, repr=False)
    api_version: str | None = None
    organization: str | None = None
    project: str | None = None
    headers: t.Mapping[str, str] = field(default_factory=dict)
    connect_timeout: float = 5.0
    read_timeout: float = 600.0

    @classmethod
    def from_settings(cls, settings: ProxySettings, name: str = "default") -> UpstreamSpec:
        """The single upstream of the ``WSGI_PROXY_UPSTREAM_*`` variables."""
        key = settings.upstream_api_key
        return cls(
            name=name,
            url=settings.upstream_url,
            kind=settings.upstream_kind,
            api_key=key.get_secret_value() if key is not None else None,
            api_version=settings.upstream_api_version,
            organization=settings.upstream_organization,
            project=settings.upstream_project,
            headers=dict(settings.upstream_headers),
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
        )

    @classmethod
    def from_entry(cls, entry: UpstreamEntry, environ: t.Mapping[str, str]) -> UpstreamSpec:
        """An upstream of the configuration file, its key read from the variable it names."""
        return cls(
            name=entry.name,
            url=entry.url,
            kind=entry.kind,
            api_key=environ[entry.api_key_env].strip() if entry.api_key_env else None,
            api_version=entry.api_version,
            organization=entry.organization,
            project=entry.project,
            headers=dict(entry.headers),
            connect_timeout=entry.connect_timeout,
            read_timeout=entry.read_timeout,
        )


class UpstreamClient:
    """Sends requests to one upstream with one connection pool per worker process.

    The session is created lazily in each process (after gunicorn forks), ignores the environment
    (``trust_env=False``: no proxy variables, no ``.netrc``, no CA override behind the operator's
    back), refuses cookies so nothing leaks between clients, and is never mutated per request.

    :param spec: the upstream.
    :param pool_size: connections kept per worker process.
    :param ca_bundle: a CA bundle for the upstream's certificate (the system store when None).
    """

    def __init__(self, spec: UpstreamSpec, *, pool_size: int = 1000, ca_bundle: str | None = None) -> None:
        self.name = spec.name
        self.base_url = spec.url
        version = spec.api_version
        self._api_version = quote(version, safe="").encode("ascii") if version is not None else None
        self._extra_headers = dict(spec.headers)
        self.timeout = (spec.connect_timeout, spec.read_timeout)
        self.pass_through = spec.api_key is None
        self._gateway_headers = _gateway_headers(spec)
        self._pool_size = pool_size
        self._verify: bool | str = ca_bundle or True
        self._lock = threading.Lock()
        self._session: requests.Session | None = None
        self._pid = 0

    def credentials(self, client_headers: t.Any) -> dict[str, str]:
        """Headers that authenticate a request here: the gateway's key, or the client's own."""
        if not self.pass_through:
            return dict(self._gateway_headers)
        own = {}
        for name in ("Authorization", "api-key"):
            value = client_headers.get(name)
            if value is not None:
                own[name] = value
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
        if self._api_version is not None:
            # Azure's legacy API wants the version on every call; the operator's choice wins.
            query = replace_param(query, "api-version", self._api_version, first=True)
        if query:
            url += "?" + query.decode("latin-1")
        adapter = self.session.get_adapter(url)
        with translate_errors(self.base_url):
            prepared = _prepare(method, url, self._extra_headers | dict(headers), body)
            # Straight to the transport adapter: Session.send would only add cookie handling (refused
            # here), hooks and redirects (never followed), at ~0.1 ms of CPU per call.
            answer = adapter.send(prepared, stream=True, timeout=self.timeout, verify=self._verify)
            if not stream:
                answer.content  # noqa: B018  # read inside translate_errors: a cut body is a 502 too
            return answer

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
