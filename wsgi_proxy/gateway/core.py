"""The gateway core, free of Flask: from a validated :class:`Call` to the :class:`Answer` to relay.

For each call it chooses the targets (the model's routes, or the upstream holding a response the
caller may see), sends with retries where safe and fails over to the next target before any byte
is relayed, decides between a whole answer and a relayed stream, records where new responses live
and what they used, and builds the relay. Everything about one request is told to its
:class:`~wsgi_proxy.observe.record.RequestRecord`.
"""

from __future__ import annotations

import functools
import logging
import socket
import typing as t
from dataclasses import dataclass

import requests
from websockets.protocol import OPEN
from websockets.server import ServerProtocol

from ..config.settings import ProxySettings
from ..errors import (
    StreamAborted,
    UpstreamCredentialsRejected,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStreamInterrupted,
    WebSocketUnavailable,
)
from ..observe.record import RequestRecord
from ..upstream.body import UpstreamStream
from ..upstream.client import UpstreamClient, UpstreamRequest
from ..upstream.resume import StreamResumer
from ..upstream.retries import send_with_retries
from ..upstream.websocket import UpgradeRefused
from ..wire.headers import client_response_headers
from ..wire.relay import StreamRelay, StreamStats
from ..wire.responses import Summary, adopted_ids, summary_of
from ..wire.validation import websocket_model, with_model
from ..wire.websocket import Peer
from .call import Answer, Call
from .routing import Target
from .session import SessionStats, WebSocketSession
from .state import GatewayState
from .tenancy import Tenant
from .watchdog import NoWatch
from .webhooks import WebhookFanout

__all__ = ["FAILOVER_STATUSES", "Gateway"]

log = logging.getLogger("wsgi_proxy")

#: Answers after which a routed call is tried on its model's next upstream, if it has one.
FAILOVER_STATUSES = frozenset({429, 500, 502, 503, 504})

_SSE_HEADERS = [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]


@dataclass(frozen=True, slots=True)
class _Sent:
    """An upstream answer, where it came from, and the request that got it."""

    client: UpstreamClient
    target: Target
    request: UpstreamRequest
    answer: requests.Response

    @property
    def ok(self) -> bool:
        return 200 <= self.answer.status_code < 300

    @property
    def is_event_stream(self) -> bool:
        return self.ok and self.answer.headers.get("Content-Type", "").startswith("text/event-stream")


class Gateway:
    """One mounted gateway: its parts, and what it does with each call.

    :param state: the gateway's upstreams, keys, routes, store and watchdog.
    """

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        #: The receiver of the upstreams' webhooks.
        self.webhooks = WebhookFanout(state)

    @classmethod
    def build(cls, settings: ProxySettings, environ: t.Mapping[str, str] | None = None) -> Gateway:
        return cls(GatewayState.build(settings, environ))

    @property
    def settings(self) -> ProxySettings:
        return self.state.settings

    def authenticate(self, authorization: str | None, record: RequestRecord) -> Tenant:
        """Who is calling (401 otherwise), with this request counted against their rate limits."""
        identity = self.state.keyring.identify(authorization)
        record.identified(identity.key_name, identity.team)
        tenant = Tenant(self.state, identity)
        tenant.charge_request()
        return tenant

    def forward(
        self, call: Call, tenant: Tenant, record: RequestRecord, client: socket.socket | None = None
    ) -> Answer:
        """Send ``call`` where it belongs and return the answer to relay.

        :param client: the client's socket, watched while a stream is relayed (None: unwatched).
        :raises ~wsgi_proxy.errors.ProxyError: for anything the proxy answers itself.
        """
        if call.routed:
            record.asked_for(call.model)
            tenant.check_model(call.model)
        if call.creates:
            tenant.admit_create()
        if call.counts_usage and call.method == "POST":  # a create that spends tokens, not a retrieve
            record.budgeted(tenant.check_budgets())
        targets = self._targets(call, tenant)
        targets, pinned = tenant.pinned_first(targets, call.session)
        release = tenant.open_stream() if call.stream else _nothing
        try:
            sent = self._send(call, targets, record)
            if call.session is not None and len(targets) > 1:
                self._keep_session(call.session, tenant, pinned, sent.target.upstream)
            if call.stream and sent.is_event_stream:
                return self._stream(call, sent, tenant, record, release, client)
            if call.downloads and sent.ok:  # takes no stream slot: release is a no-op
                return _download(sent)
        except BaseException:
            release()
            raise
        release()
        return self._complete(call, sent, tenant, record)

    def list_models(self, call: Call, tenant: Tenant, record: RequestRecord) -> Answer:
        """``GET /models``: the upstream's list, or with a model table the names this key may use."""
        router = self.state.router
        if not router.has_table:
            return self.forward(call, tenant, record)
        names = [name for name in router.public_names() if tenant.identity.may_use(name)]
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "wsgi-proxy"} for name in names]
        return Answer.json({"object": "list", "data": data})

    def websocket(
        self,
        call: Call,
        tenant: Tenant,
        record: RequestRecord,
        sock: socket.socket,
        handshake: t.Callable[[list[tuple[str, str]]], None],
    ) -> SessionStats:
        """Serve one client WebSocket connection on ``sock`` until it ends.

        Everything that can refuse it is decided before the 101: the mode switched off or served by
        no upstream (426), the ``?model=`` the key may not use (404), the connection slot
        (``max_streams``, 429), and, where the upstream is known at once (no model table, or a
        ``?model=``), its own answer to the upgrade. ``handshake`` then writes the 101 with the
        given extra headers, and the session runs.

        :raises ~wsgi_proxy.errors.ProxyError: before the 101, for anything the proxy answers itself.
        :raises ~wsgi_proxy.upstream.websocket.UpgradeRefused: the upstream refused the upgrade.
        """
        state, settings = self.state, self.settings
        if not settings.websockets or all(c.websockets != "native" for c in state.upstreams.values()):
            raise WebSocketUnavailable()
        model = websocket_model(call.query)
        record.asked_for(model)
        tenant.check_model(model)
        targets = state.router.route(model) if model is not None or not state.router.has_table else None
        protocol = ServerProtocol(state=OPEN, max_size=settings.max_request_bytes)
        client = Peer(sock, protocol, send_timeout=settings.send_timeout)
        release = tenant.open_stream()
        watch = None
        try:
            session = WebSocketSession(
                state, tenant, record, client, headers=call.headers, query=call.query, targets=targets
            )
            if targets is not None:
                try:
                    session.connect(model)
                except UpgradeRefused as exc:
                    error = exc.proxy_error()
                    if error is not None:
                        raise error from None
                    raise
            if settings.watch_disconnects:
                watch = state.watchdog.watch(sock, session.interrupt, departures=False)
                session.watch = watch
            state.metrics.websocket_opened()
            try:
                return session.run(lambda: handshake([("X-Request-ID", record.request_id)]))
            finally:
                state.metrics.websocket_closed()
        finally:
            if watch is not None:
                watch.cancel()
            release()

    # --- where a call goes ------------------------------------------------------------------------

    def _keep_session(self, session: str, tenant: Tenant, pinned: str | None, served: str) -> None:
        """Pin the session to the upstream that served it; one that moved off its pin (the pinned
        upstream failed) is logged and counted."""
        if pinned is not None and served != pinned:
            log.warning("a session pinned to upstream %s was served by %s: %s failed", pinned, served, pinned)
            self.state.metrics.affinity_failover(upstream=pinned)
        tenant.pin(session, served)

    def _targets(self, call: Call, tenant: Tenant) -> list[Target]:
        """The targets to try in order: the model's routes, narrowed to the holder of ``owner_id``."""
        state = self.state
        routes = None
        if call.routed and (call.model is not None or call.owner_id is None):
            routes = state.router.route(call.model)
        if call.owner_id is None:
            return routes or [Target(state.default_upstream.name)]
        # A call about a response goes where it lives, and only if the caller may see it.
        holder = tenant.holder((call.owner_id, *call.owned))
        return [next((tg for tg in routes or () if tg.upstream == holder), Target(holder))]

    def _send(self, call: Call, targets: list[Target], record: RequestRecord) -> _Sent:
        """Send to the first target that answers; before any byte, a failure moves to the next."""
        state = self.state
        for number, target in enumerate(targets, start=1):
            last = number == len(targets)
            client = state.upstreams[target.upstream]
            request = self._request(call, client, target, record)
            try:
                answer = send_with_retries(
                    client,
                    request,
                    idempotent=call.idempotent,
                    policy=state.retry_policy,
                    on_attempt=functools.partial(record.attempt, client.name),
                )
            except UpstreamError as exc:
                if last:
                    raise
                log.warning(
                    "%s failed on upstream %s (%s); trying the next one", call.label, client.name, exc.message
                )
                continue
            if last or answer.status_code not in FAILOVER_STATUSES:
                record.answered(answer.headers.get("x-request-id"))
                return _Sent(client, target, request, answer)
            log.warning(
                "upstream %s answered %d to %s; trying the next one",
                client.name,
                answer.status_code,
                call.label,
            )
            answer.close()
        raise AssertionError("unreachable: the last target always returns or raises")

    def _request(
        self, call: Call, client: UpstreamClient, target: Target, record: RequestRecord
    ) -> UpstreamRequest:
        headers = self.state.upstream_headers(client, call.headers, record.request_id, stream=call.stream)
        if record.trace is not None:  # the upstream's spans go below this request's, not the client's
            headers = {k: v for k, v in headers.items() if k.lower() != "traceparent"}
            headers["traceparent"] = record.trace.traceparent()
        body = call.body
        if target.deployment is not None and isinstance(body, bytes):
            body = with_model(body, target.deployment)
        return UpstreamRequest(
            call.method, call.path, call.query, headers, body, call.stream or call.downloads
        )

    # --- what comes back ----------------------------------------------------------------------------

    def _complete(self, call: Call, sent: _Sent, tenant: Tenant, record: RequestRecord) -> Answer:
        """A whole answer (success or error), relayed with its status and safe headers."""
        client, answer = sent.client, sent.answer
        if call.stream:  # a stream asked for, something else answered: an error body, bounded
            content = client.read_body(answer)
            if sent.ok:
                content_type = answer.headers.get("Content-Type", "")
                raise UpstreamProtocolError(
                    f"The upstream answered a streaming request with {content_type or 'no content type'!r}"
                    " instead of an event stream, so there are no events to relay. Check that the upstream"
                    " supports streaming for this request."
                )
        elif call.downloads:  # an error instead of the content: bounded, like a stream's
            content = client.read_body(answer)
        else:
            content = answer.content
        _check_credentials(client, answer)
        if sent.ok:
            self._account(call, sent, tenant, record, content)
            if call.lists:
                content = tenant.visible(content, sent.target.upstream)
        headers = client.scrub_headers(client_response_headers(answer.headers.items()))
        if "Content-Type" not in answer.headers:
            headers.append(("Content-Type", "application/json"))
        return Answer(answer.status_code, headers, client.scrub(content))

    def _account(
        self, call: Call, sent: _Sent, tenant: Tenant, record: RequestRecord, content: bytes
    ) -> None:
        """Record what a successful whole answer means: a new response, its usage, a deletion."""
        summary = summary_of(content) if call.counts_usage or call.creates else Summary()
        if call.creates and summary.response_id is not None:
            tenant.remember(summary.response_id, sent.target.upstream, background=call.background)
        if call.counts_usage:
            cost = tenant.record_usage(summary, upstream=sent.target.upstream, model=record.model)
            record.used(summary.usage, cost)
        if call.forgets and call.owner_id is not None:
            tenant.forget(call.owner_id)
        for adopted in adopted_ids(content, call.adopts):
            tenant.remember(adopted, sent.target.upstream, background=False)

    def _stream(
        self,
        call: Call,
        sent: _Sent,
        tenant: Tenant,
        record: RequestRecord,
        release: t.Callable[[], None],
        client: socket.socket | None,
    ) -> Answer:
        """The relay of an event stream, wired to the record, the store, the metrics and the watchdog."""
        state, settings = self.state, self.state.settings
        resume = call.resume
        resumer = None
        if resume is not None and settings.resume_attempts:
            resumer = StreamResumer(
                sent.client,
                sent.request.headers,
                resume.query,
                state.resume_policy,
                on_reopen=record.reopened,
            )

        def finished(stats: StreamStats) -> None:
            release()
            summary = Summary(stats.response_id, stats.model, stats.usage, stats.service_tier)
            record.used(
                stats.usage, tenant.record_usage(summary, upstream=sent.target.upstream, model=record.model)
            )
            record.stream_ended(stats)

        def remember(response_id: str) -> None:
            tenant.remember(response_id, sent.target.upstream, background=call.background)

        metrics = state.metrics
        body = UpstreamStream(sent.answer)
        watch = state.watchdog.watch(client) if settings.watch_disconnects else None
        record.stream_started()
        relay = StreamRelay(
            body,
            label=call.label,
            control=watch or NoWatch(),
            resumer=resumer,
            response_id=resume.response_id if resume is not None else None,
            keepalive_interval=settings.keepalive_interval,
            silence_limit=sent.client.read_timeout,
            max_event_bytes=settings.max_event_bytes,
            on_response_id=remember if call.creates else None,
            on_close=finished,
            on_forward=lambda events, nbytes: metrics.events_forwarded(events=events, nbytes=nbytes),
            scrub=sent.client.scrub,
            dialect=call.dialect,
        )
        upstream_headers = sent.answer.headers
        relayed = client_response_headers(upstream_headers.items())
        headers = sent.client.scrub_headers([h for h in relayed if h[0].lower() != "content-type"])
        headers += _SSE_HEADERS
        headers.append(("Content-Type", upstream_headers["Content-Type"]))
        return Answer(sent.answer.status_code, headers, relay)


def _nothing() -> None:
    pass


#: The most bytes of a download relayed in one write: fewer, larger writes for bulk bytes.
_DOWNLOAD_READ = 1024 * 1024


class _Download:
    """A file's bytes relayed as they arrive; an upstream that breaks off aborts the client's
    connection (a short body, never a clean end)."""

    def __init__(self, body: UpstreamStream) -> None:
        self._body = body

    def __iter__(self) -> _Download:
        return self

    def __next__(self) -> bytes:
        try:
            data = self._body.read_block(_DOWNLOAD_READ)
        except UpstreamStreamInterrupted as exc:
            raise StreamAborted(f"the upstream broke off a download: {exc.reason}") from None
        if not data:
            raise StopIteration
        return data

    def close(self) -> None:
        self._body.close()


#: Headers of a download the client needs besides the usual ones: its length, its name.
_DOWNLOAD_HEADERS = frozenset({"content-length", "content-disposition"})


def _download(sent: _Sent) -> Answer:
    answer = sent.answer
    headers = client_response_headers(answer.headers.items())
    headers += [(k, v) for k, v in answer.headers.items() if k.lower() in _DOWNLOAD_HEADERS]
    if "Content-Type" not in answer.headers:
        headers.append(("Content-Type", "application/octet-stream"))
    return Answer(answer.status_code, sent.client.scrub_headers(headers), _Download(UpstreamStream(answer)))


def _check_credentials(client: UpstreamClient, answer: requests.Response) -> None:
    """The upstream rejecting the gateway's own key is the operator's problem: a 502, and the body
    (which echoes a masked fragment of the key) never reaches the client."""
    if answer.status_code == 401 and not client.pass_through:
        log.warning("upstream %s rejected the gateway's credentials (HTTP 401); check its key", client.name)
        raise UpstreamCredentialsRejected(
            "The upstream rejected this gateway's own credentials. This is not a problem with your"
            " request: the proxy's operator must check the gateway's upstream key."
        )
