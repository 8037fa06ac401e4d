"""The standalone app that ``gunicorn -c gunicorn.conf.py`` serves."""

from __future__ import annotations

import logging

from flask import Flask, Response

from .config import ProxySettings
from .extension import ResponsesProxy

__all__ = ["create_app"]


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

    ``GET /`` and ``GET /healthz`` answer ``{"status": "ok"}`` without touching the upstream, so
    a load balancer can probe every second.

    :param settings: explicit settings; by default they are read from ``WSGI_PROXY_*`` variables.
    :param url_prefix: where the API is served.
    """
    app = Flask("wsgi_proxy")
    _use_gunicorn_logging()
    ResponsesProxy(app, url_prefix=url_prefix, settings=settings or ProxySettings.load())

    def health() -> Response:
        return Response(b'{"status":"ok"}', content_type="application/json")

    app.add_url_rule("/", "health", health)
    app.add_url_rule("/healthz", "healthz", health)
    return app
