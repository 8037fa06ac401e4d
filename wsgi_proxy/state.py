"""The per-app state of one mounted proxy, built once from validated settings."""

from __future__ import annotations

import os
import tempfile
import typing as t
from dataclasses import dataclass, field

from .auth import Keyring
from .config import ConfigError, ProxySettings
from .configfile import load_config_file
from .metrics import Metrics
from .routing import Router
from .store import Store, StoreError, open_store
from .upstream import UpstreamClient, UpstreamSpec
from .watchdog import DisconnectWatchdog

__all__ = ["EXTENSION_KEY", "ProxyState"]

#: The key of the proxy's state in ``app.extensions``.
EXTENSION_KEY = "wsgi_proxy"


@dataclass(frozen=True)
class ProxyState:
    """Everything a view needs: settings, upstreams, keys, routes, the shared store, the watchdog.

    ``store`` is None in single-upstream mode (the environment variables): with one upstream and
    one team there is nothing to locate or to share. ``unknown_ids`` says what happens to a response
    id the store does not know: ``forward`` it to the only upstream, or ``reject`` it with a 404.
    """

    settings: ProxySettings
    upstreams: dict[str, UpstreamClient]
    keyring: Keyring
    router: Router
    watchdog: DisconnectWatchdog
    metrics: Metrics = field(default_factory=Metrics)
    store: Store | None = None
    unknown_ids: t.Literal["forward", "reject"] = "forward"
    response_ttl_s: float = 30 * 86400.0
    default_upstream: str = field(default="default")

    @classmethod
    def build(cls, settings: ProxySettings, environ: t.Mapping[str, str] | None = None) -> ProxyState:
        environ = os.environ if environ is None else environ
        watchdog = DisconnectWatchdog(send_timeout=settings.send_timeout)
        ca = str(settings.upstream_ca_bundle) if settings.upstream_ca_bundle else None
        if settings.config is None:
            client = UpstreamClient(
                UpstreamSpec.from_settings(settings), pool_size=settings.pool_size, ca_bundle=ca
            )
            return cls(
                settings=settings,
                upstreams={client.name: client},
                keyring=Keyring.from_settings(settings),
                router=Router((), [client.name]),
                watchdog=watchdog,
            )
        config = load_config_file(settings.config, environ)
        upstreams = {}
        for entry in config.upstreams:
            spec = UpstreamSpec.from_entry(entry, environ)
            upstreams[entry.name] = UpstreamClient(spec, pool_size=settings.pool_size, ca_bundle=ca)
        url = settings.store_url or config.store_url or _default_store_url()
        try:
            store = open_store(url)
        except StoreError as exc:
            raise ConfigError(f"{exc} (WSGI_PROXY_STORE_URL)") from None
        unknown = config.unknown_ids
        if unknown == "auto":
            unknown = "forward" if len(upstreams) == 1 else "reject"
        return cls(
            settings=settings,
            upstreams=upstreams,
            keyring=Keyring.from_file(config, environ),
            router=Router(config.models, list(upstreams)),
            watchdog=watchdog,
            store=store,
            unknown_ids=unknown,
            response_ttl_s=config.response_ttl_days * 86400,
            default_upstream=config.upstreams[0].name,
        )


def _default_store_url() -> str:
    # One file per host and user, shared by the workers of that host.
    return "sqlite:///" + os.path.join(tempfile.gettempdir(), f"wsgi-proxy-{os.getuid()}.db")
