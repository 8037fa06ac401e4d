"""The Blueprint's per-request hooks and error handlers: the request's record, opened before the view
and closed on its answer, and every failure turned into OpenAI's error envelope.

They are registered on the Blueprint, never on the app, so a host app's own hooks and error pages
stay its own.
"""

from __future__ import annotations

import logging
import typing as t

from flask import Blueprint, Response, current_app, g, request
from werkzeug.exceptions import HTTPException

from ..errors import InvalidRequest, ProxyError, RequestTooLarge, error_body
from ..gateway.core import Gateway
from ..observe.record import RequestRecord, request_id_from
from ..wire.headers import BUDGET_HEADER

__all__ = ["ATTEMPTS_HEADER", "EXTENSION_KEY", "drain_unread_body", "gateway", "install", "record"]

log = logging.getLogger("wsgi_proxy")

#: The key of the proxy's :class:`~wsgi_proxy.gateway.core.Gateway` in ``app.extensions``.
EXTENSION_KEY = "wsgi_proxy"
#: How many times the proxy sent the request upstream (retries where safe, failover), on every answer.
ATTEMPTS_HEADER = "X-Upstream-Attempts"


def gateway() -> Gateway:
    """The gateway of the app handling this request."""
    return t.cast(Gateway, current_app.extensions[EXTENSION_KEY])


def record() -> RequestRecord:
    """This request's record."""
    return t.cast(RequestRecord, g.wsgi_proxy_record)


def _open_record() -> None:
    route = (request.endpoint or "").rpartition(".")[2] or "unknown"
    state = gateway().state
    g.wsgi_proxy_record = RequestRecord(
        request_id_from(request.headers.get("X-Request-ID")),
        request.method,
        route,
        metrics=state.metrics,
        trace=None
        if state.tracing is None
        else state.tracing.start(request.method, route, request.headers.get),
    )


def _close_record(response: Response) -> Response:
    current = record()
    response.headers["X-Request-ID"] = current.request_id
    response.headers[ATTEMPTS_HEADER] = str(current.attempts)
    if current.upstream_request_id:
        response.headers["X-Upstream-Request-ID"] = current.upstream_request_id
    if current.budget_left:
        response.headers[BUDGET_HEADER] = current.budget_left
    current.sent(response.status_code)  # a stream's record closes when its relay ends
    return response


def drain_unread_body(response: Response) -> Response:
    """Read what is left of a request body that the answer did not need, before the answer goes out.

    An answer given before the view reads the body (a refused key, an endpoint not served, a limit)
    leaves the body to gunicorn, whose gthread worker reads it after the answer. When the client's
    next request on the connection arrives in that same read, gunicorn keeps it in its buffer and
    waits for the socket to turn readable, which it never does: the request waited out the
    keep-alive timeout (5 s) and the connection closed without an answer
    (``tests/e2e/test_hostile_sockets.py``). A body above the request limit is still left to gunicorn:
    a refusal is not worth reading megabytes for.
    """
    length = request.content_length
    chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    if length == 0 or (length is None and not chunked):
        return response
    left = gateway().settings.max_request_bytes + 1
    stream = request.stream
    if (length is not None and length >= left) or getattr(stream, "is_exhausted", False):
        return response  # too large to read for a refusal, or read already (a view took it)
    try:
        while left > 0 and (piece := stream.read(min(left, 65536))):
            left -= len(piece)
    except Exception:  # a gone client or a malformed chunked body: gunicorn closes the connection
        log.debug("could not read the rest of a request body before answering")
    return response


def _proxy_error(exc: ProxyError) -> Response:
    record().failed(exc)
    return Response(exc.body(), status=exc.status, headers=exc.headers(), content_type="application/json")


def _http_error(exc: HTTPException) -> Response:
    code = exc.code or 500
    if code == 413:
        return _proxy_error(RequestTooLarge("The request body is larger than the server accepts."))
    if code < 500:
        return _proxy_error(InvalidRequest(f"The request could not be read: {exc.description}", param=None))
    return _unexpected(exc)


def _unexpected(exc: Exception) -> Response:
    log.error("unexpected error in the proxy (%s)", type(exc).__name__, exc_info=exc)
    body = error_body(
        "The proxy failed unexpectedly while handling this request. Try again; if it persists,"
        " report it to the proxy's operator.",
        "server_error",
    )
    return Response(body, status=500, content_type="application/json")


def install(bp: Blueprint) -> None:
    """Register the record hooks and the error handlers on ``bp``."""
    bp.before_request(_open_record)
    bp.after_request(_close_record)
    bp.after_request(drain_unread_body)
    bp.register_error_handler(ProxyError, _proxy_error)
    bp.register_error_handler(HTTPException, _http_error)
    bp.register_error_handler(Exception, _unexpected)
