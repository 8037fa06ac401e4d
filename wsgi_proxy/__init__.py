"""wsgi-proxy: a synchronous gateway for the OpenAI Responses API."""

from .config.settings import ConfigError as ConfigError
from .config.settings import ProxySettings as ProxySettings
from .errors import ProxyError as ProxyError
from .web.app import create_app as create_app
from .web.extension import ResponsesProxy as ResponsesProxy

__all__ = ["ConfigError", "ProxyError", "ProxySettings", "ResponsesProxy", "create_app"]
