"""Per-request tenancy: rate limits, concurrent-stream slots, and where each response lives.

The one place that talks to the shared :class:`~wsgi_proxy.store.Store` on a request's behalf, and
the one place its :class:`~wsgi_proxy.store.StoreError` becomes the proxy's own error. Response
ids stay exactly as the upstream issued them: the store remembers which upstream holds each one and
which team created it, and another team's response is answered exactly like one that does not exist.
"""

from __future__ import annotations

import contextlib
import logging
import time
import typing as t
import uuid

from .auth import Identity
from .errors import ModelNotFound, ProxyError, RateLimited, ResponseNotFound
from .state import ProxyState
from .store import ResponseRecord, StoreError
from .upstream import UpstreamClient

__all__ = ["StoreUnavailable", "Tenant"]

log = logging.getLogger("wsgi_proxy.tenancy")

#: Stream slots expire on their own after this long, so a crashed worker cannot hold them forever.
SLOT_TTL = 3600.0


class StoreUnavailable(ProxyError):
    """The shared state store did not answer."""

    status = 503
    type = "server_error"
    code = "store_unavailable"


@contextlib.contextmanager
def _store_errors() -> t.Iterator[None]:
    try:
        yield
    except StoreError as exc:
        log.error("the state store failed: %s", exc)
        raise StoreUnavailable(
            "The gateway's state store is unavailable, so the request cannot be checked or routed."
            " Try again shortly; if it persists, the operator should check WSGI_PROXY_STORE_URL."
        ) from None


class Tenant:
    """One caller's view of the gateway: its identity, applied to the shared state."""

    def __init__(self, state: ProxyState, identity: Identity) -> None:
        self.state = state
        self.identity = identity

    def check_model(self, model: str | None) -> None:
        """Refuse a routed model this caller's key or team may not use (the 404 of an unknown one)."""
        if self.state.router.has_table and model is not None and not self.identity.may_use(model):
            raise ModelNotFound(model)

    def charge_request(self) -> None:
        """Count this request against every requests-per-minute limit, or raise :class:`RateLimited`."""
        store = self.state.store
        if store is None:
            return
        for counter, limit in self.identity.rpm:
            with _store_errors():
                decision = store.hit_rate(f"rpm:{counter}", limit)
            if not decision.allowed:
                raise RateLimited(
                    f"Rate limit reached: {limit} requests per minute for {counter.replace(':', ' ')}."
                    f" Try again in {decision.retry_after:.0f} s.",
                    retry_after=decision.retry_after,
                    limit="rpm",
                )

    def open_stream(self) -> t.Callable[[], None]:
        """Take a concurrent-stream slot under every limit; returns the function that frees them."""
        store = self.state.store
        if store is None or not self.identity.max_streams:
            return lambda: None
        lease = uuid.uuid4().hex
        taken: list[str] = []

        def release() -> None:
            for counter in taken:
                try:
                    store.release_slot(f"streams:{counter}", lease)
                except StoreError as exc:  # the lease expires by itself
                    log.warning("could not release a stream slot: %s", exc)

        for counter, limit in self.identity.max_streams:
            with _store_errors():
                ok = store.acquire_slot(f"streams:{counter}", limit, lease, SLOT_TTL)
            if not ok:
                release()
                raise RateLimited(
                    f"Too many open streams: {limit} at once for {counter.replace(':', ' ')}. Close one,"
                    " or try again when one ends.",
                    retry_after=1.0,
                    limit="streams",
                )
            taken.append(counter)
        return release

    def locate(self, response_id: str) -> UpstreamClient:
        """The upstream holding a response this caller may see, or the 404 of an unknown id."""
        state = self.state
        if state.store is None:
            return state.upstreams[state.default_upstream]
        with _store_errors():
            record = state.store.get_response(response_id)
        if record is None:
            if state.unknown_ids == "forward":
                return state.upstreams[state.default_upstream]
            raise ResponseNotFound(response_id)
        if record.team != self.identity.team or record.upstream not in state.upstreams:
            raise ResponseNotFound(response_id)
        return state.upstreams[record.upstream]

    def remember(self, response_id: str, upstream: str, *, background: bool) -> None:
        """Record where a new response lives and whose it is (best effort: the answer goes out anyway)."""
        store = self.state.store
        if store is None:
            return
        record = ResponseRecord(
            response_id=response_id,
            upstream=upstream,
            team=self.identity.team,
            key_name=self.identity.key_name,
            created_at=time.time(),
            background=background,
        )
        try:
            store.put_response(record, self.state.response_ttl_s)
        except StoreError as exc:
            log.error("could not record response %s in the state store: %s", response_id, exc)

    def record_usage(self, response_id: str, model: str | None, usage: dict[str, int]) -> None:
        """Count a finished response's tokens once, whichever path saw them first (best effort)."""
        store = self.state.store
        if store is None:
            return
        try:
            store.record_usage(
                response_id,
                key_name=self.identity.key_name,
                team=self.identity.team,
                model=model,
                input_tokens=usage["input_tokens"],
                output_tokens=usage["output_tokens"],
                total_tokens=usage["total_tokens"],
            )
        except (StoreError, ValueError) as exc:
            log.error("could not record the usage of response %s: %s", response_id, exc)

    def forget(self, response_id: str) -> None:
        if self.state.store is not None:
            with contextlib.suppress(StoreError):
                self.state.store.delete_response(response_id)
