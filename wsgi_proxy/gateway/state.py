"""The parts of one mounted gateway, built once from its configuration."""

from __future__ import annotations

import typing as t
from dataclasses import dataclass, field

from ..config.gateway import GatewayConfig, Webhooks
from ..config.prices import PriceTable
from ..config.settings import ConfigError, ProxySettings
from ..observe.metrics import Metrics
from ..observe.tracing import Tracing, tracing_from_env
from ..store import NullStore, Store, StoreError, open_store
from ..upstream.client import UpstreamClient
from ..upstream.resume import ResumePolicy
from ..upstream.retries import RetryPolicy
from ..wire.headers import upstream_request_headers
from .auth import Keyring
from .keys import StoredKeys
from .leases import LeaseKeeper
from .pending import PendingWrites
from .routing import Router
from .watchdog import DisconnectWatchdog

__all__ = ["GatewayState"]


@dataclass(frozen=True)
class GatewayState:
    """Everything the gateway core needs: settings, upstreams, keys, routes, the store, the watchdog.

    ``unknown_ids`` says what happens to a response id the store does not know: ``forward`` it to
    the first upstream, or ``reject`` it with a 404.
    """

    settings: ProxySettings
    upstreams: dict[str, UpstreamClient]
    keyring: Keyring
    router: Router
    store: Store
    leases: LeaseKeeper
    pending: PendingWrites
    watchdog: DisconnectWatchdog
    metrics: Metrics = field(default_factory=Metrics)
    unknown_ids: t.Literal["forward", "reject"] = "forward"
    response_ttl_s: float = 30 * 86400.0
    retry_policy: RetryPolicy = field(default_factory=RetryPolicy)
    resume_policy: ResumePolicy = field(default_factory=ResumePolicy)
    prices: PriceTable = field(default_factory=PriceTable)
    tracing: Tracing | None = None
    webhooks: Webhooks = field(default_factory=Webhooks)

    def upstream_headers(
        self,
        client: UpstreamClient,
        client_headers: tuple[tuple[str, str], ...],
        request_id: str,
        *,
        stream: bool,
    ) -> dict[str, str]:
        """The headers of a request to ``client`` on behalf of a client that sent ``client_headers``:
        the forwarded ones, the upstream's credentials, and the request's id."""
        headers = upstream_request_headers(
            client_headers,
            credentials=client.credentials(client_headers),
            pass_through=client.pass_through,
            stream=stream,
            also=self.settings.forward_headers,
        )
        headers["X-Request-ID"] = request_id
        return headers

    @property
    def default_upstream(self) -> UpstreamClient:
        """The first upstream of the configuration."""
        return next(iter(self.upstreams.values()))

    @classmethod
    def build(cls, settings: ProxySettings, environ: t.Mapping[str, str] | None = None) -> GatewayState:
        """Build every part from ``settings``; :class:`ConfigError` names what is wrong."""
        config = GatewayConfig.from_settings(settings, environ)
        ca = str(settings.upstream_ca_bundle) if settings.upstream_ca_bundle else None
        upstreams = {
            spec.name: UpstreamClient(
                spec, pool_size=settings.pool_size, ca_bundle=ca, max_answer_bytes=settings.max_answer_bytes
            )
            for spec in config.upstreams
        }
        store = _open(config.store_url)
        return cls(
            settings=settings,
            upstreams=upstreams,
            keyring=Keyring(
                config.keys,
                StoredKeys(
                    store,
                    config.teams,
                    settings.key_cache_ttl,
                    [k.identity.key_name or "" for k in config.keys],
                )
                if config.keys_in_store
                else None,
            ),
            router=Router(config.models, list(upstreams)),
            store=store,
            leases=LeaseKeeper(store, settings.stream_lease_ttl),
            pending=PendingWrites(store),
            watchdog=DisconnectWatchdog(send_timeout=settings.send_timeout),
            unknown_ids=config.unknown_ids,
            response_ttl_s=config.response_ttl_s,
            retry_policy=RetryPolicy(attempts=settings.retry_attempts, max_wait=settings.retry_max_wait),
            resume_policy=ResumePolicy(
                settings.resume_attempts, settings.resume_backoff, settings.resume_backoff_max
            ),
            prices=config.prices,
            tracing=tracing_from_env(),
            webhooks=config.webhooks,
        )


def _open(url: str | None) -> Store:
    if url is None:
        return NullStore()
    try:
        return open_store(url)
    except StoreError as exc:
        raise ConfigError(f"{exc} (WSGI_PROXY_STORE_URL)") from None
