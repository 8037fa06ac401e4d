"""One client connection in the Responses API's WebSocket mode, relayed on the thread that serves it.

The client's socket and the upstream's are two :class:`~wsgi_proxy.wire.websocket.Peer` objects
polled together (``select.poll``: no event loop, no extra thread). Each client frame is checked
before it goes upstream: a ``response.create`` like an HTTP create (requests per minute, the key's
models, the store able to record it, a ``previous_response_id`` the team owns on this connection's
upstream), a ``response.steer`` for the response it names; anything else passes untouched. Server
frames go to the client with their payload unchanged, while the proxy notes on the side which
response runs on which lane (``stream_id``), records new response ids with the team, and counts
usage once from ``response.completed``, as for SSE.

When the upstream drops while responses are running, each stored one is resumed over HTTP
(``GET /responses/{id}?stream=true&starting_after=N``) from a helper thread, its events going to
the client as frames of the same lane; one that cannot be resumed gets an ``error`` frame, never a
silent end. The connection stays open, and the next create opens a new upstream connection.

Lifecycle: pings after ``websocket_ping_interval`` of silence on either side, and a peer that does
not answer is gone; the connection's age is bounded by ``websocket_max_age`` (then
``websocket_connection_limit_reached`` and a 1001 once nothing runs); a stopping worker closes idle
connections at once and busy ones before its graceful timeout, with 1012 (which the SDKs treat as
recoverable); a gone client closes the upstream at once, and the reverse.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import queue
import select
import socket
import threading
import time
import typing as t
from dataclasses import dataclass, field

from websockets.frames import Opcode

from ..errors import (
    InvalidRequest,
    ProxyError,
    UpstreamError,
    UpstreamStreamInterrupted,
    UpstreamUnavailable,
    WebSocketUnavailable,
)
from ..observe.record import RequestRecord, request_id_from
from ..upstream.client import UpstreamClient
from ..upstream.resume import StreamResumer, create_resume_query
from ..upstream.websocket import UpgradeRefused, UpstreamSocket, open_upstream_socket
from ..wire.frames import (
    ClientFrame,
    error_frame,
    frame_info,
    parse_client_frame,
    relayed_error_frame,
    with_stream_id,
)
from ..wire.relay import Resume
from ..wire.responses import event_summary
from ..wire.sse import TERMINAL_TYPES, EventSplitter, data_of, parse_event
from ..wire.validation import with_model
from ..wire.websocket import Message, Peer
from .routing import Target
from .state import GatewayState
from .tenancy import Tenant
from .watchdog import Watch, stopping

__all__ = ["ConnectionLimitReached", "SessionStats", "WebSocketSession"]

log = logging.getLogger("wsgi_proxy.websocket")

#: Close codes: normal, going away (the age limit), internal error, service restart.
NORMAL, GOING_AWAY, INTERNAL_ERROR, SERVICE_RESTART = 1000, 1001, 1011, 1012
#: How long the closing handshake may take before the socket is dropped.
_CLOSE_WAIT = 2.0
_RESPONSE_ENDS = frozenset(TERMINAL_TYPES - {"error"})
_POLL_IN = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR

#: How many of a worker's sessions may be releasing what they hold at once; the others wait on a
#: semaphore, asleep, which a thread waiting for the GIL is not. When thousands of clients leave
#: together, each session's end makes some ten calls that let go of the GIL, and with every
#: departing thread wanting it back after each, the worker's event loop and its heartbeat's thread
#: waited up to 16 s for their turn: gunicorn killed workers at --timeout 6, and the upstream saw
#: 10,000 sessions gone in 16-32 s where it took 5-15 s alone (``benchmarks/ramp.py``). Through this
#: gate the heartbeat's longest silence was 2.4 s, and the upstream was freed in 7.5-9.7 s where
#: it takes 5.2-9.8 s alone.
DEPARTURES_AT_ONCE = 8
_departures = threading.BoundedSemaphore(DEPARTURES_AT_ONCE)


class ConnectionLimitReached(InvalidRequest):
    """The connection reached its age limit: open a new one (OpenAI's code and wording)."""

    code = "websocket_connection_limit_reached"

    def __init__(self, minutes: float) -> None:
        super().__init__(
            f"Responses websocket connection limit reached ({minutes:g} minutes). Create a new websocket"
            " connection to continue."
        )


@dataclass
class _Lane:
    """One lane (a ``stream_id``; None is the unnamed one): its creates in order, the running response."""

    records: collections.deque[RequestRecord] = field(default_factory=collections.deque)
    response_id: str | None = None
    last_sequence: int | None = None
    resume_query: bytes = b"stream=true"
    stored: bool = True
    resuming: bool = False

    @property
    def busy(self) -> bool:
        return bool(self.records) or self.response_id is not None or self.resuming


@dataclass
class SessionStats:
    """What one connection did, for its log line."""

    creates: int = 0
    frames_in: int = 0
    frames_out: int = 0
    resumes: int = 0
    upstream_connections: int = 0
    close_code: int | None = None
    """The code the proxy closed the client with, or the client's own (None: dropped)."""
    ended_by: str = "client"


class WebSocketSession:
    """One relayed client connection; :meth:`run` serves it until it ends.

    :param state: the gateway's parts.
    :param tenant: who is connected (authenticated at the handshake).
    :param record: the connection's record (its log line is written when the connection ends).
    :param client: the client's side, after the 101.
    :param headers: the client's handshake headers, forwarded like an HTTP request's.
    :param query: the client's raw handshake query, forwarded unchanged.
    :param targets: where the connection may go (None: decided by the first create's model).
    :param watch: the watchdog's handle on the client socket, for a stopping worker (the session
        sees its client leave itself, in its own poll).
    """

    def __init__(
        self,
        state: GatewayState,
        tenant: Tenant,
        record: RequestRecord,
        client: Peer,
        *,
        headers: tuple[tuple[str, str], ...],
        query: bytes,
        targets: list[Target] | None,
        watch: Watch | None = None,
    ) -> None:
        self.state = state
        self.tenant = tenant
        self.record = record
        self.client = client
        self.headers = headers
        self.query = query
        self.targets = targets
        self.stats = SessionStats()
        self.opened = time.monotonic()
        self._settings = state.settings
        self.watch = watch
        """The watchdog's handle on the client socket (a stopping worker), if watched."""
        self._target: Target | None = None
        self._upstream: Peer | None = None
        self._lanes: dict[str | None, _Lane] = {}
        self._mine: set[str] = set()  # responses created on this connection
        self._expiring = False
        self._over = False
        # What ties this connection to earlier ones (Codex's Session-Id, else a create's prompt_cache_key).
        self._session = next((v for k, v in headers if k.lower() == "session-id" and v), None)
        self._feeds: queue.SimpleQueue[tuple[str | None, bytes | None]] = queue.SimpleQueue()
        self._feed_threads: list[threading.Thread] = []
        self._done = threading.Event()
        self._wake_r = self._wake_w = -1  # the pipe resume threads wake the loop with (made when needed)
        self._poll = select.poll()

    # --- the loop ---------------------------------------------------------------------------------

    def run(self, handshake: t.Callable[[], None]) -> SessionStats:
        """Send the 101 with ``handshake``, then relay until the connection ends; never raises for
        anything a peer does. Everything the session holds is released when it returns."""
        try:
            self._poll.register(self.client.fileno(), _POLL_IN)
            self._set_resumable()
            handshake()
        except OSError:
            self._end("client_gone", None)
        try:
            while not self._over:
                timeout = self._next_tick() - time.monotonic()
                for fd, _events in self._poll.poll(max(0.0, timeout) * 1000):
                    if fd == self._wake_r:
                        self._woken()
                    elif fd == self.client.fileno():
                        self._from_client()
                    elif self._upstream is not None and fd == self._upstream.fileno():
                        self._from_upstream()
                    if self._over:
                        break
                if not self._over:
                    self._tick(time.monotonic())
        finally:
            self._finish()
        return self.stats

    def connect(self, model: str | None) -> None:
        """Open the upstream connection now (before the 101, where the upstream is known at once).

        :raises ~wsgi_proxy.errors.ProxyError: no upstream could be reached.
        :raises UpgradeRefused: the upstream refused the upgrade.
        """
        self._ensure_upstream(model)

    def interrupt(self) -> None:
        """The watchdog stopped this connection (the worker stops): wake :meth:`run` by shutting
        the client socket's reading side, which it then reads as the watchdog's word, never as the
        client's. Costs no descriptor per connection."""
        with contextlib.suppress(OSError):
            self.client.sock.shutdown(socket.SHUT_RD)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"!")

    def _open_wake_pipe(self) -> None:
        if self._wake_r < 0:
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._poll.register(self._wake_r, select.POLLIN)

    def _next_tick(self) -> float:
        interval = self._settings.websocket_ping_interval
        now = time.monotonic()
        ticks = [self.opened + self._settings.websocket_max_age]
        for peer in (self.client, self._upstream):
            if peer is not None and interval:
                sent = peer.ping_sent_at
                ticks.append((sent if sent is not None else peer.heard_at) + interval)
        if self.watch is None:
            ticks.append(now + 1.0)  # nobody tells this session that the worker stops: look
        return max(now, min(ticks))

    def _tick(self, now: float) -> None:
        interval = self._settings.websocket_ping_interval
        if interval:
            for peer in (self.client, self._upstream):
                if peer is None:
                    continue
                if peer.ping_sent_at is not None and now - peer.ping_sent_at >= interval:
                    if peer is self.client:
                        log.info("a WebSocket client did not answer a ping for %.0f s; closing", interval)
                        self._end("client_silent", None)
                        return
                    log.warning("upstream %s did not answer a ping; dropping its socket", self._name)
                    self._upstream_ended()
                elif now - peer.heard_at >= interval:
                    self._send_safely(peer, peer.ping)
        if self.watch is None and stopping():
            self._shutdown()
        if not self._expiring and now - self.opened >= self._settings.websocket_max_age:
            self._expiring = True
        if self._expiring and not self._busy:
            self._to_client((Opcode.TEXT, error_frame(self._limit())))
            self._end("age_limit", GOING_AWAY)

    @property
    def _busy(self) -> bool:
        return any(lane.busy for lane in self._lanes.values())

    @property
    def _upstream_client(self) -> UpstreamClient | None:
        """The client of the upstream this connection is bound to, once it is."""
        return self.state.upstreams[self._target.upstream] if self._target is not None else None

    @property
    def _name(self) -> str:
        return self._upstream_client.name if self._upstream_client is not None else "-"

    def _limit(self) -> ConnectionLimitReached:
        return ConnectionLimitReached(self._settings.websocket_max_age / 60)

    def _woken(self) -> None:
        """Events from resume threads."""
        with contextlib.suppress(OSError):
            os.read(self._wake_r, 4096)
        while True:
            try:
                lane_key, data = self._feeds.get_nowait()
            except queue.Empty:
                break
            if data is None:
                self._resume_failed(lane_key)
            else:
                self._from_upstream_message((Opcode.TEXT, data), resumed=True)

    def _shutdown(self) -> None:
        """The worker is stopping: 1012 now (the watchdog waits for idle sessions, or its deadline)."""
        log.info("worker stopping: closing a WebSocket connection with 1012")
        self._end("shutdown", SERVICE_RESTART)

    # --- client to upstream -----------------------------------------------------------------------

    def _from_client(self) -> None:
        if self.watch is not None and self.watch.stop_reason() == "shutdown":
            self._shutdown()
            return
        try:
            messages = self.client.receive()
        except OSError:
            self._end("client_gone", None)
            return
        for message in messages:
            self.stats.frames_in += 1
            self.state.metrics.websocket_frame("in")
            self._client_message(message)
            if self._over:
                return
        if self.client.ended:
            self._end("client", self.client.close_code)

    def _client_message(self, message: Message) -> None:
        opcode, payload = message
        try:
            if opcode is not Opcode.TEXT:
                raise InvalidRequest("Send WebSocket messages as JSON text frames.", param=None)
            frame = parse_client_frame(payload)
            if frame.type == "response.create":
                self._create(frame, payload)
                return
            self._check_owned(frame.owned)  # a steer: only of a response this team owns
            self._to_upstream(message, model=None)
        except ProxyError as exc:
            self._refuse(exc, _lane_of(message))
        except UpgradeRefused as exc:
            self._refused_upgrade(exc, _lane_of(message))

    def _create(self, frame: ClientFrame, payload: bytes) -> None:
        fields = frame.create
        assert fields is not None
        record = self._create_record(fields.model)
        self.stats.creates += 1
        self._session = self._session or fields.prompt_cache_key
        try:
            if self._expiring:
                raise self._limit()
            tenant = self.tenant
            tenant.charge_request()
            tenant.check_model(fields.model)
            tenant.admit_create()
            tenant.check_budgets()
            self._check_owned(frame.owned)
            payload = self._to_upstream((Opcode.TEXT, payload), model=fields.model, record=record)
        except ProxyError as exc:
            self._refuse(exc, frame.stream_id, record)
            return
        except UpgradeRefused as exc:
            self._refused_upgrade(exc, frame.stream_id, record)
            return
        lane = self._lanes.setdefault(frame.stream_id, _Lane())
        lane.records.append(record)
        lane.resume_query = create_resume_query(fields)
        lane.stored = fields.store is not False and frame.generate
        self._set_resumable()

    def _create_record(self, model: str | None) -> RequestRecord:
        """The record of one response on this connection (its own JSON line when it ends)."""
        trace = self.record.trace.child("WS", "ws_create") if self.record.trace is not None else None
        record = RequestRecord(
            request_id_from(None), "WS", "ws_create", metrics=self.state.metrics, trace=trace
        )
        record.identified(self.tenant.identity.key_name, self.tenant.identity.team)
        record.asked_for(model)
        return record

    def _check_owned(self, ids: tuple[str, ...]) -> None:
        """Each id a frame names: one this connection made, or one the team owns on this connection's
        upstream (which, before the first create, the first such id chooses)."""
        others = [object_id for object_id in ids if object_id not in self._mine]
        if not others:
            return
        holder = self.tenant.holder(others)
        bound = self._upstream_client.name if self._upstream_client is not None else None
        if bound is None and self.targets is not None and len(self.targets) == 1:
            bound = self.targets[0].upstream
        if bound is not None and holder != bound:
            raise InvalidRequest(
                f"{others[0]!r} is held by another upstream than this connection's. Open a new"
                " WebSocket connection to use it.",
                param=None,
            )
        self.targets = [Target(holder)]

    def _to_upstream(
        self, message: Message, *, model: str | None, record: RequestRecord | None = None
    ) -> bytes:
        """Send ``message`` upstream (connecting first if needed); returns the payload sent."""
        opcode, payload = message
        target = self._ensure_upstream(model)
        if model is not None and self.state.router.has_table:
            routes = self.state.router.route(model)
            match = next((r for r in routes if r.upstream == target.upstream), None)
            if match is None:
                raise InvalidRequest(
                    f"The model {model!r} is served by another upstream than this connection's. Open a new"
                    " WebSocket connection for it.",
                    param="model",
                )
            if match.deployment is not None:
                payload = with_model(payload, match.deployment)
        if record is not None:
            record.attempt(target.upstream)
        upstream = self._upstream
        assert upstream is not None
        try:
            upstream.send((opcode, payload))
        except OSError:
            name = self._name
            self._upstream_ended()
            raise UpstreamUnavailable(
                f"The upstream {name!r} dropped the WebSocket connection. Send the create again."
            ) from None
        return payload

    def _ensure_upstream(self, model: str | None) -> Target:
        if self._upstream is not None and self._target is not None:
            return self._target
        targets, _ = self.tenant.pinned_first(self.targets or self.state.router.route(model), self._session)
        last: ProxyError | UpgradeRefused | None = None
        for target in targets:
            client = self.state.upstreams[target.upstream]
            if client.websockets != "native":
                last = WebSocketUnavailable()
                continue
            try:
                opened = open_upstream_socket(
                    client,
                    self._upstream_headers(client),
                    self.query,
                    max_size=self._settings.max_event_bytes,
                    send_timeout=self._settings.send_timeout,
                )
            except (UpstreamError, UpgradeRefused) as exc:
                log.warning("could not open a WebSocket to upstream %s: %s", client.name, exc)
                last = exc
                continue
            self._attach(target, opened)
            if self._session is not None and len(targets) > 1:
                self.tenant.pin(self._session, target.upstream)
            return target
        assert last is not None
        raise last

    def _upstream_headers(self, client: UpstreamClient) -> dict[str, str]:
        """The handshake's forwarded headers as an upstream request carries them, without what a
        request without a body (a handshake, a resume's GET) has no use for."""
        headers = self.state.upstream_headers(client, self.headers, self.record.request_id, stream=True)
        dropped = ("accept-encoding", "content-type", *(("traceparent",) if self.record.trace else ()))
        headers = {k: v for k, v in headers.items() if k.lower() not in dropped}
        if self.record.trace is not None:  # the upstream's spans go below the connection's
            headers["traceparent"] = self.record.trace.traceparent()
        return headers

    def _attach(self, target: Target, opened: UpstreamSocket) -> None:
        self._target = target
        self.targets = [target]  # the connection stays with its upstream, reconnects included
        self._upstream = opened.peer
        self._poll.register(opened.peer.fileno(), _POLL_IN)
        self.stats.upstream_connections += 1
        self.record.attempt(target.upstream)
        self.record.answered(next((v for k, v in opened.headers if k.lower() == "x-request-id"), None))

    # --- upstream to client -----------------------------------------------------------------------

    def _from_upstream(self) -> None:
        upstream = self._upstream
        assert upstream is not None
        try:
            messages = upstream.receive()
        except OSError:
            self._upstream_ended()
            return
        for message in messages:
            self._from_upstream_message(message, resumed=False)
            if self._over:
                return
        if upstream.ended:
            self._upstream_ended()

    def _from_upstream_message(self, message: Message, *, resumed: bool) -> None:
        opcode, payload = message
        client = self._upstream_client
        if client is not None:
            payload = client.scrub(payload)
        if opcode is Opcode.TEXT:
            self._observe(payload, resumed=resumed)
        self._to_client((opcode, payload))

    def _observe(self, payload: bytes, *, resumed: bool) -> None:
        """Note what a server frame means: a response started, went on, ended, or an error."""
        info = frame_info(payload)
        kind = info.type
        if kind is None:
            return
        lane = self._lanes.get(info.stream_id)
        if lane is None:
            if kind != "response.created":
                return
            lane = self._lanes[info.stream_id] = _Lane()
        if kind == "response.created":
            response_id = event_summary(payload).response_id
            if response_id is not None:
                self._mine.add(response_id)
                if not lane.records:  # a steered response's successor
                    successor = self._create_record(None)
                    successor.attempt(self._name)
                    lane.records.append(successor)
                self.tenant.remember(response_id, self._name, background=False)
            lane.response_id = response_id
        if info.sequence_number is not None and lane.response_id is not None:
            lane.last_sequence = info.sequence_number
        if kind in _RESPONSE_ENDS:
            summary = event_summary(payload)
            record = lane.records.popleft() if lane.records else None
            model = record.model if record is not None else None
            cost = self.tenant.record_usage(summary, upstream=self._name, model=model)
            if record is not None:
                record.used(summary.usage, cost)
                record.sent(200)
            lane.response_id, lane.last_sequence, lane.resuming = None, None, False
            self._set_resumable()
        elif kind == "error" and not resumed:
            status, code = _error_of(payload)
            self.state.metrics.websocket_error(code or "error")
            if lane.records and lane.response_id is None:
                record = lane.records.popleft()
                record.error = code or "error"
                record.sent(status)
                self._set_resumable()

    def _to_client(self, message: Message) -> None:
        try:
            self.client.send(message)
        except OSError:  # gone, or not reading within the send timeout
            self._end("client_gone", None)
            return
        self.stats.frames_out += 1
        self.state.metrics.websocket_frame("out")

    def _refuse(self, exc: ProxyError, lane: str | None, record: RequestRecord | None = None) -> None:
        """Answer a client frame with an ``error`` frame instead of relaying it."""
        if record is not None:
            record.failed(exc)
            record.sent(exc.status)
        self.state.metrics.websocket_error(exc.code or exc.type)
        self._to_client((Opcode.TEXT, error_frame(exc, lane)))

    def _refused_upgrade(
        self, exc: UpgradeRefused, lane: str | None, record: RequestRecord | None = None
    ) -> None:
        """The upstream refused to open a connection: its error (or the proxy's word for it), as a frame."""
        error = exc.proxy_error()
        if error is not None:
            self._refuse(error, lane, record)
            return
        if record is not None:
            record.error = "upstream_refused"
            record.sent(exc.status)
        self.state.metrics.websocket_error("upstream_refused")
        relayed = exc.error
        assert relayed is not None  # proxy_error() answers every refusal without OpenAI's envelope
        self._to_client((Opcode.TEXT, relayed_error_frame(exc.status, relayed, lane)))

    # --- an upstream that ends --------------------------------------------------------------------

    def _upstream_ended(self) -> None:
        """The upstream closed or dropped: resume what runs, tell the client what cannot be."""
        upstream, self._upstream = self._upstream, None
        if upstream is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._poll.unregister(upstream.fileno())
        code = upstream.close_code
        with contextlib.suppress(OSError):
            upstream.sock.close()
        running = {key: lane for key, lane in self._lanes.items() if lane.busy and not lane.resuming}
        if not running:
            if code is not None and code != NORMAL:
                self._end("upstream", code)  # the upstream closed on purpose: relay its code
            return  # a drop while idle: the next create opens a new connection
        log.warning(
            "upstream %s %s with %d responses running; resuming them",
            self._name,
            "closed the WebSocket" if code is not None else "dropped the WebSocket",
            len(running),
        )
        self._open_wake_pipe()
        for key, lane in running.items():
            if lane.response_id is None or not lane.stored or not self._settings.resume_attempts:
                self._resume_failed(key)
                continue
            lane.resuming = True
            self.stats.resumes += 1
            self.state.metrics.resumed(upstream=self._name)
            thread = threading.Thread(
                target=self._resume,
                args=(self._upstream_client, key, lane.response_id, lane.last_sequence, lane.resume_query),
                name="wsgi-proxy-ws-resume",
                daemon=True,
            )
            self._feed_threads.append(thread)
            thread.start()

    def _resume(
        self,
        client: UpstreamClient | None,
        lane_key: str | None,
        response_id: str,
        after: int | None,
        query: bytes,
    ) -> None:
        """Stream a running response over HTTP after ``after`` into this session (a helper thread)."""
        assert client is not None
        headers = self._upstream_headers(client)
        resumer = StreamResumer(
            client, headers, query, self.state.resume_policy, on_reopen=self.record.reopened
        )
        attempt, last = 0, after
        while attempt < resumer.max_attempts and not self._done.is_set():
            if attempt and self._done.wait(resumer.backoff(attempt)):
                break
            attempt += 1
            outcome = resumer.reopen(response_id, last)
            if outcome is Resume.GIVE_UP:
                break
            if outcome is Resume.RETRY:
                continue
            splitter = EventSplitter(self._settings.max_event_bytes)
            try:
                while (chunk := outcome.read()) and not self._done.is_set():
                    for event in splitter.feed(chunk):
                        info, data = parse_event(event), data_of(event)
                        seq = info.sequence_number
                        if (
                            data is None
                            or info.type is None
                            or (seq is not None and last is not None and seq <= last)
                        ):
                            continue
                        self._feed(lane_key, with_stream_id(data, lane_key))
                        last, attempt = seq if seq is not None else last, 0
                        if info.type in TERMINAL_TYPES:
                            return
            except (UpstreamStreamInterrupted, ValueError) as exc:
                log.info("resuming %s over HTTP broke: %s", response_id, exc)
            finally:
                outcome.close()
        self._feed(lane_key, None)

    def _feed(self, lane_key: str | None, data: bytes | None) -> None:
        self._feeds.put((lane_key, data))
        self._wake()

    def _resume_failed(self, lane_key: str | None) -> None:
        lane = self._lanes.get(lane_key)
        if lane is None:
            return
        exc = UpstreamUnavailable(
            f"The upstream {self._name!r} dropped the WebSocket connection while this response was"
            " running, and it could not be resumed. Send the create again."
        )
        while lane.records:
            record = lane.records.popleft()
            record.failed(exc)
            record.sent(exc.status)
        lane.response_id, lane.last_sequence, lane.resuming = None, None, False
        self.state.metrics.websocket_error(exc.code or "upstream_error")
        self._to_client((Opcode.TEXT, error_frame(exc, lane_key)))
        self._set_resumable()

    # --- the end ----------------------------------------------------------------------------------

    def _set_resumable(self) -> None:
        """Tell the watchdog whether a stopping worker may close this connection at once (idle)."""
        if self.watch is not None:
            self.watch.set_resumable(not self._busy)

    def _end(self, ended_by: str, code: int | None) -> None:
        """End the session: close the client with ``code`` (None: it is gone); :meth:`_finish`
        closes the upstream."""
        if self._over:
            return
        self._over = True
        self.stats.ended_by = ended_by
        if code is not None and self.client.open:
            self.client.close(code, _REASONS.get(code, ""))
        self.stats.close_code = code if code is not None else self.client.close_code

    def _finish(self) -> None:
        """Release what the session holds: the upstream told and closed (after the client's
        closing handshake), its descriptors closed, its unanswered records ended."""
        self._done.set()
        self._await_close()
        # A close, not a shutdown first, and one session at a time among DEPARTURES_AT_ONCE: each
        # call lets go of the GIL, which this thread must win back from the others. Nothing in the
        # gate waits on a peer (an upstream that stopped reading does not get its close frame
        # whole). The server closes the client's socket once run() returns.
        with _departures:
            upstream = self._upstream
            if upstream is not None:
                upstream.close_at_once(NORMAL if self.stats.ended_by == "client" else GOING_AWAY)
                with contextlib.suppress(OSError):
                    upstream.sock.close()
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        self._wake_r = self._wake_w = -1
        for lane in self._lanes.values():
            while lane.records:
                record = lane.records.popleft()
                record.error = "connection_closed"
                record.sent(499)

    def _await_close(self) -> None:
        """Give the client a moment to answer our close frame, as RFC 6455 asks."""
        client = self.client
        deadline = time.monotonic() + _CLOSE_WAIT
        waiting = select.poll()  # not select(): descriptors run past FD_SETSIZE with many sessions
        waiting.register(client.fileno(), _POLL_IN)
        while client.protocol.close_sent is not None and not client.ended:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not waiting.poll(remaining * 1000):
                return
            try:
                client.receive()
            except OSError:
                return

    @staticmethod
    def _send_safely(peer: Peer, action: t.Callable[[], None]) -> None:
        with contextlib.suppress(OSError):
            action()


_REASONS = {GOING_AWAY: "connection limit reached", SERVICE_RESTART: "server restarting"}


def _lane_of(message: Message) -> str | None:
    """The lane a client message names, for the error frame that refuses it."""
    opcode, payload = message
    return frame_info(payload).stream_id if opcode is Opcode.TEXT else None


def _error_of(payload: bytes) -> tuple[int, str | None]:
    """The status and code of an upstream ``error`` frame (400 and None when it has none)."""
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        return 400, None
    status = obj.get("status") if isinstance(obj, dict) else None
    error = obj.get("error") if isinstance(obj, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return (
        status if isinstance(status, int) and not isinstance(status, bool) else 400,
        code if isinstance(code, str) else None,
    )
