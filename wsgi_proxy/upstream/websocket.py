"""The upstream's side of the Responses API's WebSocket mode: one connection per client connection.

Opened with the ``websockets`` sans-I/O client protocol on a plain (or TLS) socket, synchronously:
TCP and TLS within the upstream's ``connect_timeout``, the opening handshake within its
``read_timeout``. An upstream that answers the upgrade with anything but a 101 is reported with its
status and body (:class:`UpgradeRefused`), so the client can be told what the upstream said.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import time
import typing as t
from dataclasses import dataclass

from websockets.client import ClientProtocol
from websockets.http11 import Response
from websockets.uri import parse_uri

from ..errors import ProxyError, UpstreamCredentialsRejected, UpstreamUnavailable, WebSocketUnavailable
from ..wire.websocket import Peer
from .client import UpstreamClient
from .translate import translate_socket_errors

__all__ = ["UpgradeRefused", "UpstreamSocket", "open_upstream_socket"]

log = logging.getLogger("wsgi_proxy.upstream")

_READ_SIZE = 65536


class UpgradeRefused(Exception):
    """The upstream answered the upgrade with ``status`` (not 101).

    :param upstream: the upstream's client (its name, and whether the key was the client's own).
    :param body: what the upstream sent, scrubbed of the gateway's key.
    """

    def __init__(self, upstream: UpstreamClient, status: int, body: bytes) -> None:
        super().__init__(f"the upstream answered the upgrade with HTTP {status}")
        self.upstream = upstream
        self.status = status
        self.body = body

    @property
    def error(self) -> dict[str, t.Any] | None:
        """The upstream's error object, when it answered with OpenAI's envelope."""
        try:
            error = json.loads(self.body).get("error")
        except (ValueError, AttributeError, RecursionError):
            return None
        return error if isinstance(error, dict) else None

    def proxy_error(self) -> ProxyError | None:
        """What the proxy answers instead of relaying the upstream's answer, or None to relay it.

        The upstream refusing the gateway's own key is the operator's problem (502); an upstream that
        does not know the route (404, 405, 426, 501, or a 400 without OpenAI's envelope) lacks
        WebSocket mode, and a 426 makes the client use HTTP; anything else without an envelope is a 502.
        """
        status = self.status
        if status == 401 and not self.upstream.pass_through:
            log.warning(
                "upstream %s rejected the gateway's credentials on a WebSocket upgrade", self.upstream.name
            )
            return UpstreamCredentialsRejected(
                "The upstream rejected this gateway's own credentials. This is not a problem with your"
                " request: the proxy's operator must check the gateway's upstream key."
            )
        error = self.error
        if status in (404, 405, 426, 501) or (status == 400 and error is None):
            return WebSocketUnavailable(f"The upstream {self.upstream.name!r} does not serve WebSocket mode.")
        if error is None:
            return UpstreamUnavailable(
                f"The upstream {self.upstream.name!r} refused the WebSocket connection (HTTP {status})."
                " Try again later."
            )
        return None


@dataclass(frozen=True, slots=True)
class UpstreamSocket:
    """An open upstream connection and the headers of its 101."""

    peer: Peer
    headers: list[tuple[str, str]]


def _connect(client: UpstreamClient, host: str, port: int, secure: bool) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=client.connect_timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if not secure:
        return sock
    context = ssl.create_default_context(cafile=client.ca_bundle)
    return context.wrap_socket(sock, server_hostname=host)


def open_upstream_socket(
    client: UpstreamClient, headers: t.Mapping[str, str], query: bytes, *, max_size: int, send_timeout: float
) -> UpstreamSocket:
    """Open ``client``'s ``/responses`` WebSocket with ``headers`` (credentials included).

    :param query: the client's raw handshake query, forwarded unchanged.
    :param max_size: the largest message accepted from the upstream.
    :raises UpgradeRefused: the upstream answered with another status than 101.
    :raises ~wsgi_proxy.errors.UpstreamError: it could not be reached, or broke the handshake.
    """
    url = client.url("/responses", query).replace("http", "ws", 1)
    with translate_socket_errors(client.name):
        uri = parse_uri(url)
        sock = _connect(client, uri.host, uri.port, uri.secure)
        try:
            protocol = ClientProtocol(uri, max_size=max_size)
            request = protocol.connect()
            for name, value in headers.items():
                request.headers[name] = value
            protocol.send_request(request)
            for data in protocol.data_to_send():
                sock.sendall(data)
            response = _handshake_answer(client, sock, protocol)
        except BaseException:
            sock.close()
            raise
    pairs = [
        (name, client.scrub_headers([(name, value)])[0][1]) for name, value in response.headers.raw_items()
    ]
    if response.status_code != 101 or protocol.handshake_exc is not None:
        sock.close()
        status = response.status_code if response.status_code != 101 else 502
        raise UpgradeRefused(client, status, client.scrub(bytes(response.body or b"")))
    return UpstreamSocket(Peer(sock, protocol, send_timeout=send_timeout), pairs)


def _handshake_answer(client: UpstreamClient, sock: socket.socket, protocol: ClientProtocol) -> Response:
    """Read until the upstream's answer to the upgrade is whole (within its connect timeout: the
    handshake is part of opening the connection). A server does not speak first, so no frame can
    follow the answer before the first client message."""
    deadline = time.monotonic() + client.connect_timeout
    ended = False
    while True:
        for event in protocol.events_received():
            if isinstance(event, Response):
                return event
        remaining = deadline - time.monotonic()
        if ended or remaining <= 0:
            raise TimeoutError("no answer to the upgrade") if not ended else ConnectionError("closed")
        sock.settimeout(remaining)
        data = sock.recv(_READ_SIZE)
        if data:
            protocol.receive_data(data)
        else:
            ended = True
            protocol.receive_eof()
