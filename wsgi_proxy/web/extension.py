"""``ResponsesProxy``: mount the proxy in a Flask app, standalone or inside an existing one."""

from __future__ import annotations

from flask import Flask

from ..config.settings import ProxySettings
from ..gateway.core import Gateway
from .hooks import EXTENSION_KEY
from .views import make_blueprint

__all__ = ["ResponsesProxy"]


class ResponsesProxy:
    """The Flask extension that serves the Responses API proxy under ``url_prefix``.

    Use it directly, ``ResponsesProxy(app, url_prefix="/llm/v1")``, or in a factory with
    ``proxy = ResponsesProxy()`` then ``proxy.init_app(app)``. Only the proxy's own routes are
    added: the host's routes, hooks and error pages are untouched.

    Settings come from ``settings`` when given; otherwise from the environment
    (``WSGI_PROXY_*``) overridden by any ``WSGI_PROXY_*`` keys of ``app.config``. They are
    validated here, so a bad configuration fails at start-up with a
    :class:`~wsgi_proxy.config.ConfigError` naming the setting. ``app.extensions["wsgi_proxy"]`` is
    then the app's :class:`~wsgi_proxy.gateway.core.Gateway`.

    :param app: the Flask app to mount on now, or ``None`` to call :meth:`init_app` later.
    :param url_prefix: where the API lives, e.g. ``"/v1"`` (OpenAI's base URL then ends in ``/v1``).
    :param settings: explicit settings instead of the environment.
    """

    def __init__(
        self, app: Flask | None = None, *, url_prefix: str = "/v1", settings: ProxySettings | None = None
    ) -> None:
        self.url_prefix = url_prefix
        self.settings = settings
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Validate the settings and register the proxy's routes on ``app``."""
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                "A ResponsesProxy is already registered on this app. Import and use that instance"
                " instead of calling init_app twice."
            )
        prefix = "/" + self.url_prefix.strip("/") if self.url_prefix.strip("/") else ""
        settings = self.settings or ProxySettings.load(app.config)
        app.extensions[EXTENSION_KEY] = Gateway.build(settings)
        app.register_blueprint(make_blueprint(), url_prefix=prefix or None)
