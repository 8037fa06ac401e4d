"""The standalone app that ``gunicorn -c gunicorn.conf.py`` serves."""

from __future__ import annotations

import hmac
import logging
import sys
import typing as t

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from ..config.settings import ProxySettings
from ..errors import InvalidRequest, ProxyError, RouteNotFound, WebSocketUnavailable
from ..gateway.core import Gateway
from ..observe.record import ACCESS_LOGGER
from .extension import ResponsesProxy
from .hooks import EXTENSION_KEY, drain_unread_body

__all__ = ["create_app"]


class _StdoutLines(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes each record's message alone on a line to whatever ``sys.stdout`` is at the time."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def _log_requests_as_json_lines() -> None:
    # One JSON object per line on stdout, nothing around it, so log shippers can parse it as it is.
    access = logging.getLogger(ACCESS_LOGGER)
    if access.level == logging.NOTSET:
        access.setLevel(logging.INFO)
    if not any(isinstance(h, _StdoutLines) for h in access.handlers):
        access.addHandler(_StdoutLines())
        access.propagate = False


def _use_gunicorn_logging() -> None:
    # Under gunicorn, send the proxy's log lines to gunicorn's error log, at its level.
    gunicorn_log = logging.getLogger("gunicorn.error")
    if not gunicorn_log.handlers:
        return
    for name in ("wsgi_proxy", "urllib3"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.handlers = list(gunicorn_log.handlers)
            logger.propagate = False
    logging.getLogger("wsgi_proxy").setLevel(gunicorn_log.level)


def create_app(settings: ProxySettings | None = None, *, url_prefix: str = "/v1") -> Flask:
    """Build the standalone proxy app: the API under ``url_prefix`` plus health probes.

    ``GET /``, ``/healthz`` and ``/livez`` (liveness) answer ``{"status": "ok"}`` without touching
    anything; ``GET /readyz`` (readiness) also checks that the state store takes a write. Both are cheap
    enough for a load balancer to probe every second.

    :param settings: explicit settings; by default they are read from ``WSGI_PROXY_*`` variables.
    :param url_prefix: where the API is served.
    """
    app = Flask("wsgi_proxy")
    _use_gunicorn_logging()
    _log_requests_as_json_lines()
    ResponsesProxy(app, url_prefix=url_prefix, settings=settings or ProxySettings.load())

    state = t.cast(Gateway, app.extensions[EXTENSION_KEY]).state

    def health() -> Response:
        return Response(b'{"status":"ok"}', content_type="application/json")

    def ready() -> Response:
        # The configuration was loaded when the app was built; what can fail later is the store.
        if not state.store.ping():
            body = b'{"status":"unavailable","store":"unreachable"}'
            return Response(body, status=503, content_type="application/json")
        return Response(b'{"status":"ready"}', content_type="application/json")

    def metrics() -> Response:
        expected = state.settings.metrics_token
        if expected is None:
            body = b'{"error":"Metrics are off: set WSGI_PROXY_METRICS_TOKEN to turn them on."}'
            return Response(body, status=404, content_type="application/json")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        right = hmac.compare_digest(given.strip().encode(), expected.get_secret_value().encode())
        if scheme.lower() != "bearer" or not right:
            body = b'{"error":"Send Authorization: Bearer <WSGI_PROXY_METRICS_TOKEN> to read the metrics."}'
            return Response(body, status=401, content_type="application/json")
        text, content_type = state.metrics.render()
        return Response(text, content_type=content_type)

    prefix = "/" + url_prefix.strip("/") if url_prefix.strip("/") else ""

    def not_served(exc: HTTPException) -> Response:
        # Outside the API's prefix: still JSON, never an HTML page, and a hint for the commonest
        # mistake, a base URL without its /v1.
        error: ProxyError
        if request.headers.get("Upgrade", "").lower() == "websocket":
            error, status = WebSocketUnavailable(), WebSocketUnavailable.status
        elif exc.code == 404:
            error, status = (
                RouteNotFound(
                    f"Unknown endpoint {request.method} {request.path}. The API is under {prefix or '/'}:"
                    f" end your client's base URL with it (for example http://{request.host}{prefix})."
                ),
                404,
            )
        else:
            error = InvalidRequest(f"The request could not be served: {exc.description}", param=None)
            status = exc.code or 400
        reply = Response(error.body(), status=status, headers=error.headers(), mimetype="application/json")
        return drain_unread_body(reply)

    app.register_error_handler(HTTPException, not_served)
    app.add_url_rule("/metrics", "metrics", metrics)
    app.add_url_rule("/", "health", health)
    app.add_url_rule("/healthz", "healthz", health)
    app.add_url_rule("/livez", "livez", health)
    app.add_url_rule("/readyz", "readyz", ready)
    return app
