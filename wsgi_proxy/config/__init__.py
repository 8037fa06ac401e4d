"""Configuration: the ``WSGI_PROXY_*`` settings, the TOML file, and the one shape both become."""

from .gateway import GatewayConfig as GatewayConfig
from .settings import ConfigError as ConfigError
from .settings import ProxySettings as ProxySettings

__all__ = ["ConfigError", "GatewayConfig", "ProxySettings"]
