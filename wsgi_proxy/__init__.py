"""wsgi-proxy: a synchronous gateway for the OpenAI Responses API."""

from .app import create_app as create_app
from .config import ConfigError as ConfigError
from .config import ProxySettings as ProxySettings
from .errors import ProxyError as ProxyError
from .extension import ResponsesProxy as ResponsesProxy

__all__ = ["ConfigError", "ProxyError", "ProxySettings", "ResponsesProxy", "create_app"]
