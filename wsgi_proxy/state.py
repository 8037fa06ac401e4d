"""The per-app state of one mounted proxy, built once from validated settings."""

from __future__ import annotations

from dataclasses import dataclass

from .auth import Credentials
from .config import ProxySettings
from .upstream import UpstreamClient
from .watchdog import DisconnectWatchdog

__all__ = ["EXTENSION_KEY", "ProxyState"]

#: The key of the proxy's state in ``app.extensions``.
EXTENSION_KEY = "wsgi_proxy"


@dataclass(frozen=True)
class ProxyState:
    """Everything a view needs: settings, upstream client, credentials, disconnect watchdog."""

    settings: ProxySettings
    upstream: UpstreamClient
    credentials: Credentials
    watchdog: DisconnectWatchdog

    @classmethod
    def build(cls, settings: ProxySettings) -> ProxyState:
        return cls(
            settings=settings,
            upstream=UpstreamClient(settings),
            credentials=Credentials(settings),
            watchdog=DisconnectWatchdog(send_timeout=settings.send_timeout),
        )
