"""Per-request tenancy: rate limits, concurrent-stream slots, and where each response lives.

The one place that talks to the shared :class:`~wsgi_proxy.store.Store` on a request's behalf, and
the one place its :class:`~wsgi_proxy.store.StoreError` becomes the proxy's own error. Response
ids stay exactly as the upstream issued them: the store remembers which upstream holds each one and
which team created it, and another team's response is answered exactly like one that does not exist.
A gateway without a store of its own has a :class:`~wsgi_proxy.store.NullStore`, so every path
here is the same in every mode.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import typing as t
import uuid

from ..config.gateway import Budget, Identity
from ..errors import (
    BudgetExhausted,
    InvalidRequest,
    ModelNotFound,
    RateLimited,
    ResponseNotFound,
    RouteNotFound,
    StoreUnavailable,
    UpstreamProtocolError,
)
from ..store import ResponseRecord, Store, StoreError, UsageEntry
from ..store.base import window_end
from ..upstream.client import UpstreamClient
from ..wire.responses import Summary
from .routing import Target
from .state import GatewayState

__all__ = ["Tenant"]

log = logging.getLogger("wsgi_proxy.tenancy")


@contextlib.contextmanager
def _store_errors() -> t.Iterator[None]:
    try:
        yield
    except StoreError as exc:
        log.error("the state store failed: %s", exc)
        raise StoreUnavailable() from None


class Tenant:
    """One caller's view of the gateway: its identity, applied to the shared state."""

    def __init__(self, state: GatewayState, identity: Identity) -> None:
        self.state = state
        self.identity = identity

    def check_model(self, model: str | None) -> None:
        """Refuse a routed model this caller's key or team may not use (the 404 of an unknown one)."""
        if self.state.router.has_table and model is not None and not self.identity.may_use(model):
            raise ModelNotFound(model)

    def check_endpoint(self, family: str) -> None:
        """Refuse an endpoint family the gateway, or this caller's team, does not serve (a 404)."""
        if family not in self.state.settings.endpoints:
            raise RouteNotFound(
                f"/{family} is not served by this gateway. Its operator can add {family!r} to"
                " WSGI_PROXY_ENDPOINTS."
            )
        allowed = self.identity.endpoints
        if allowed is not None and family not in allowed:
            raise RouteNotFound(
                f"/{family} is not served to your team. Its operator can add {family!r} to the team's"
                " endpoints in the gateway's configuration file."
            )

    def check_unread_model(self, path: str) -> None:
        """Refuse a call whose model the proxy does not read (a field of a multipart upload) wherever
        the model would decide something: a model table routes by it, or this key is limited to some."""
        if self.state.router.has_table or self.identity.models:
            raise InvalidRequest(
                f"/{path} takes its model inside a multipart upload, which this gateway does not read, so"
                " it cannot route it or check that your key may use it. Ask the operator to serve it from"
                " a gateway without a model table or model limits.",
                param="model",
            )

    def charge_request(self) -> None:
        """Count this request against every requests-per-minute limit, or raise :class:`RateLimited`."""
        for counter, limit in self.identity.rpm:
            with _store_errors():
                decision = self.state.store.hit_rate(f"rpm:{counter}", limit)
            if not decision.allowed:
                raise RateLimited(
                    f"Rate limit reached: {limit} requests per minute for {counter.replace(':', ' ')}."
                    f" Try again in {decision.retry_after:.0f} s.",
                    retry_after=decision.retry_after,
                    limit="rpm",
                )

    def check_budgets(self) -> tuple[tuple[Budget, int], ...]:
        """Refuse a call that uses tokens once a budget of this caller's is spent: its tokens per
        minute (:class:`RateLimited`), or a daily or monthly budget (:class:`BudgetExhausted`).
        Returns what is left of each budget (tokens, or nano-dollars for cost budgets).

        Spend is counted when a response ends, so requests admitted while a budget still had room
        may take it past its limit: by at most what those requests use (see the README).
        """
        budgets = self.identity.budgets
        if not budgets:
            return ()
        now = time.time()
        with _store_errors():
            spent = self.state.store.spend(self.identity.charges, now)
        left = []
        for budget in budgets:
            used = spent[budget.counter].against(budget.kind)
            if used >= budget.limit:
                raise _refusal(budget, used, now)
            left.append((budget, budget.limit - used))
        return tuple(left)

    def open_stream(self) -> t.Callable[[], None]:
        """Take a concurrent-stream slot under every limit; returns the function that frees them.

        The slots are leases that the process's :class:`~wsgi_proxy.gateway.leases.LeaseKeeper`
        refreshes until they are freed.
        """
        if not self.identity.max_streams:
            return _free_nothing  # no random id drawn, no closure built: most streams have no limit
        store, leases = self.state.store, self.state.leases
        lease = uuid.uuid4().hex
        taken: list[str] = []

        def release() -> None:
            for key in taken:
                leases.drop(key, lease)
                try:
                    store.release_slot(key, lease)
                except StoreError as exc:  # the lease expires by itself
                    log.warning("could not release a stream slot: %s", exc)

        for counter, limit in self.identity.max_streams:
            key = f"streams:{counter}"
            with _store_errors():
                ok = store.acquire_slot(key, limit, lease, leases.ttl)
            if not ok:
                release()
                raise RateLimited(
                    f"Too many open streams: {limit} at once for {counter.replace(':', ' ')}. Close one,"
                    " or try again when one ends.",
                    retry_after=1.0,
                    limit="streams",
                )
            taken.append(key)
            leases.hold(key, lease)
        return release

    def admit_create(self) -> None:
        """Refuse a create before it reaches the upstream when its record could not be written.

        The store failed moments ago (it is down, or its disk is full), or this worker already
        holds as many unwritten records as it keeps: the response would exist upstream with
        nobody able to say whose it is.
        """
        if self.state.store.failing() or self.state.pending.full:
            log.warning("refusing a create: the state store cannot record it now")
            raise StoreUnavailable()

    def pinned_first(self, targets: list[Target], session: str | None) -> tuple[list[Target], str | None]:
        """``targets`` with the upstream ``session`` is pinned to first, and that upstream (None: no pin).

        Only where there is a choice (several targets) and pins are on; a store that fails to answer
        leaves the order as it was (a pin is where a session's cache and reasoning live, not who owns
        what), and says so in the log.
        """
        if session is None or len(targets) < 2 or not self.state.settings.affinity_ttl:
            return targets, None
        try:
            upstream = self.state.store.pinned(self._pin_key(session))
        except StoreError as exc:
            log.warning("could not read a session's pin (routing as if it had none): %s", exc)
            return targets, None
        first = [tg for tg in targets if tg.upstream == upstream]
        return first + [tg for tg in targets if tg.upstream != upstream], upstream if first else None

    def pin(self, session: str, upstream: str) -> None:
        """Pin ``session`` to ``upstream`` for the affinity TTL (from now)."""
        ttl = self.state.settings.affinity_ttl
        if not ttl:
            return
        try:
            self.state.store.pin(self._pin_key(session), upstream, ttl)
        except StoreError as exc:
            log.warning("could not pin a session to upstream %s: %s", upstream, exc)

    def _pin_key(self, session: str) -> str:
        # A digest: keys of any length and content, and nothing a client sent stored as it was.
        digest = hashlib.sha256(f"{self.identity.team}\0{session}".encode("utf-8", "surrogateescape"))
        return "pin:" + digest.hexdigest()[:40]

    def _record_of(self, object_id: str) -> ResponseRecord | None:
        """Where an object lives and whose it is: this worker's unwritten record first, else the store's."""
        record = self.state.pending.response(object_id)
        if record is None:
            with _store_errors():
                record = self.state.store.get_response(object_id)
        return record

    def locate(self, response_id: str) -> UpstreamClient:
        """The upstream holding a response this caller may see, or the 404 of an unknown id."""
        state = self.state
        record = self._record_of(response_id)
        if record is None:
            if state.unknown_ids == "forward":
                return state.default_upstream
            raise ResponseNotFound(response_id)
        if record.team != self.identity.team or record.upstream not in state.upstreams:
            raise ResponseNotFound(response_id)
        return state.upstreams[record.upstream]

    def visible(self, listing: bytes, upstream: str) -> bytes:
        """A list answer (``{"object": "list", "data": [...]}``) of ``upstream``'s objects with only
        those this caller's team owns. A gateway of one team and one upstream shows it as it is; an
        answer of another shape is refused rather than shown."""
        state = self.state
        if state.unknown_ids == "forward":
            return listing
        try:
            page = json.loads(listing)
        except (ValueError, RecursionError):
            page = None
        data = page.get("data") if isinstance(page, dict) else None
        if not isinstance(page, dict) or not isinstance(data, list):
            raise UpstreamProtocolError(
                f"The upstream {upstream!r} answered a list with something else, so the proxy cannot show"
                " only your team's objects of it. Try again; if it persists, tell the operator."
            )
        kept = [item for item in data if isinstance(item, dict) and self._owns(item.get("id"), upstream)]
        page["data"] = kept
        if "first_id" in page:
            page["first_id"] = kept[0].get("id") if kept else None
        if "last_id" in page:
            page["last_id"] = kept[-1].get("id") if kept else None
        return json.dumps(page, separators=(",", ":"), ensure_ascii=False).encode()

    def holder(self, ids: t.Sequence[str]) -> str:
        """The one upstream holding every object of ``ids`` this caller may see (the first one's);
        the 404 of an unknown id, or a 400 when they are held by different upstreams."""
        holder = self.locate(ids[0]).name
        for other in ids[1:]:
            if self.locate(other).name != holder:
                raise InvalidRequest(
                    f"{other!r} and {ids[0]!r} are held by different upstreams, so no upstream can serve"
                    " this request. Name objects of one upstream.",
                    param=None,
                )
        return holder

    def _owns(self, object_id: object, upstream: str) -> bool:
        if not isinstance(object_id, str):
            return False
        record = self._record_of(object_id)
        return record is not None and record.team == self.identity.team and record.upstream == upstream

    def remember(self, response_id: str, upstream: str, *, background: bool) -> None:
        """Record where a new response lives and whose it is; kept by the worker until the store takes it."""
        record = ResponseRecord(
            response_id=response_id,
            upstream=upstream,
            team=self.identity.team,
            key_name=self.identity.key_name,
            created_at=time.time(),
            background=background,
        )
        try:
            self.state.store.put_response(record, self.state.response_ttl_s)
        except StoreError as exc:
            log.error(
                "could not record response %s yet (kept until the store takes it): %s", response_id, exc
            )
            self.state.pending.put_response(record, self.state.response_ttl_s)

    def record_usage(self, summary: Summary, *, upstream: str, model: str | None) -> int | None:
        """Count a finished response's usage and cost once, whichever path saw them first; kept by
        the worker until the store takes them. Returns the cost in nano-dollars (None: no price).

        :param summary: the response's id and usage (nothing is counted without both).
        :param upstream: the upstream that served it (its prices apply).
        :param model: the model to count them under when the summary names none.
        """
        usage = summary.usage
        if usage is None:
            return None
        model = summary.model or model
        cost = self.state.prices.cost(model, upstream, summary.service_tier, usage)
        # An answer without an id (an embedding) is counted once by being counted under a new one.
        response_id = summary.response_id or "unnamed_" + os.urandom(12).hex()
        identity = self.identity
        entry = UsageEntry(
            response_id=response_id,
            key_name=identity.key_name,
            team=identity.team,
            model=model,
            upstream=upstream,
            service_tier=summary.service_tier,
            usage=usage,
            cost_nano_usd=cost,
            charges=identity.charges,
        )

        def write(store: Store) -> object:
            first = store.record_usage(entry)
            if first:
                self.state.metrics.used(
                    team=identity.team, upstream=upstream, usage=usage, cost_nano_usd=cost
                )
            return first

        try:
            write(self.state.store)
        except ValueError as exc:  # counts of the wrong type: nothing would ever take them
            log.error("could not record the usage of response %s: %s", response_id, exc)
        except StoreError as exc:
            log.error(
                "could not record the usage of response %s yet (kept until the store takes it): %s",
                response_id,
                exc,
            )
            self.state.pending.record_usage(write)
        return cost

    def forget(self, response_id: str) -> None:
        with contextlib.suppress(StoreError):
            self.state.store.delete_response(response_id)


def _refusal(budget: Budget, used: int, now: float) -> RateLimited:
    """The 429 of a spent budget: which one, how much of it was used, and when it resets."""
    who = budget.counter.replace(":", " ")
    resets = window_end(budget.kind, now)
    retry_after = max(resets.timestamp() - now, 1e-3)
    if budget.kind == "tpm":
        return RateLimited(
            f"Rate limit reached: {budget.limit:,} tokens per minute for {who} ({used:,} used this minute)."
            f" Try again in {retry_after:.0f} s.",
            retry_after=retry_after,
            limit="tpm",
        )
    period = "today" if budget.kind.endswith("_per_day") else "this month"
    span = "daily" if period == "today" else "monthly"
    if budget.kind.startswith("usd"):
        amount = f"{_dollars(used)} of {_dollars(budget.limit)} spent {period}"
        what = "cost"
    else:
        amount = f"{used:,} of {budget.limit:,} tokens used {period}"
        what = "token"
    return BudgetExhausted(
        f"The {span} {what} budget of {who} is spent ({amount}, UTC). It resets at"
        f" {resets:%Y-%m-%dT%H:%M:%SZ}; ask the gateway's operator if you need more before then.",
        retry_after=retry_after,
        limit=budget.kind,
    )


def _dollars(nano: int) -> str:
    """Nano-dollars as ``US$1.50`` or ``US$0.000175``: cents, and smaller amounts to the millionth."""
    whole = f"{nano / 1e9:,.6f}".rstrip("0")
    return "US$" + (whole + "0" * (2 - len(whole.partition(".")[2])))


def _free_nothing() -> None:
    """What :meth:`Tenant.open_stream` returns when no limit counts the stream."""
