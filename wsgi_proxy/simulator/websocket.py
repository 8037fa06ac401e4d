"""The Responses API's WebSocket mode: ``GET /v1/responses`` upgraded, ``response.create`` frames in,
the same events as SSE out (each carrying the create's ``stream_id``).

What it models, from OpenAI's guide: creates on one lane (``stream_id``, the unnamed one included)
run in order, lanes run side by side (at most :data:`MAX_LANES` named ones); each connection keeps
the responses it made in a cache, so a ``previous_response_id`` with ``store: false`` works on that
connection only, while stored responses are found on any; ``generate: false`` is a warm-up that
returns an id without output; ``background`` is refused; a connection lives at most
:attr:`~wsgi_proxy.simulator.config.SimulatorConfig.websocket_max_age_s` and then gets a
``websocket_connection_limit_reached`` error and a 1001 close.

Faults: a create's ``metadata`` takes the same ``sim_*`` options as HTTP; ``sim_cut_after=K``
drops the whole connection after K events of that response (``sim_cut_mode=clean``: a 1000 close
instead of a TCP drop), and ``sim_stamp=1`` ends each frame with the time it was sent.

A stored response made here can be streamed by ``GET ?stream=true`` (``starting_after`` included)
like a background one: an assumption of the simulator, which the proxy's resume of a dropped
connection relies on and falls back from when an upstream refuses.
"""

from __future__ import annotations

import json
import queue
import re
import select
import socket
import threading
import time
import typing as t

from websockets.datastructures import Headers
from websockets.frames import Opcode
from websockets.http11 import Request
from websockets.protocol import OPEN
from websockets.server import ServerProtocol

from ..wire.websocket import Peer
from . import errors
from .errors import ApiError
from .events import JsonDict, dumps, usage
from .framing import stamped
from .recording import Recorder
from .store import ResponseRecord, Store

if t.TYPE_CHECKING:  # pragma: no cover
    from .handler import NewResponse

__all__ = ["MAX_LANES", "accept", "serve_session"]

MAX_LANES = 32
_STREAM_ID = re.compile(r"[A-Za-z0-9_.-]{1,256}")
_POLL_S = 0.2
_SEND_TIMEOUT_S = 30.0


def accept(path: str, headers: t.Iterable[tuple[str, str]], wfile: t.BinaryIO, sock: socket.socket) -> bool:
    """Answer an upgrade request with its 101 (or the 400 of a malformed one); True when open."""
    response = ServerProtocol().accept(Request(path, Headers(list(headers))))
    wfile.write(response.serialize())
    wfile.flush()
    return response.status_code == 101


def _error(exc: ApiError, lane: str | None) -> bytes:
    frame: JsonDict = {"type": "error", "status": exc.status, **exc.envelope()}
    if lane:
        frame["stream_id"] = lane
    return dumps(frame)


def _with_lane(data: bytes, lane: str) -> bytes:
    return data[:-1] + b',"stream_id":' + dumps(lane) + b"}" if lane else data


class _Session:
    """One upgraded connection: a reader (the handler's thread, asleep in ``poll`` while the client is
    silent) and one thread per lane. The frames are the proxy's own :class:`Peer` (``websockets``'
    sans-I/O protocol), guarded by one lock since lanes send while the reader answers pings."""

    def __init__(
        self,
        sock: socket.socket,
        new_response: NewResponse,
        store: Store,
        recorder: Recorder,
        max_age_s: float,
    ) -> None:
        self.sock = sock
        self.peer = Peer(sock, ServerProtocol(state=OPEN, max_size=None), send_timeout=_SEND_TIMEOUT_S)
        self.new_response = new_response
        self.store = store
        self.recorder = recorder
        self.max_age_s = max_age_s
        self.opened = time.monotonic()
        self.cache: dict[str, ResponseRecord] = {}
        self.lanes: dict[str, queue.Queue[JsonDict | None]] = {}
        self.threads: list[threading.Thread] = []
        self.closed = threading.Event()
        self._send_lock = threading.Lock()

    def send(self, data: bytes) -> bool:
        with self._send_lock:
            if self.closed.is_set() or not self.peer.open:
                return False
            try:
                self.peer.send((Opcode.TEXT, data))
            except OSError:
                return False
            return True

    def run(self) -> int | None:
        """Serve until the client closes, the age limit, or a fault; the client's close code."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        try:
            while not self.peer.ended:
                remaining = self.max_age_s - (time.monotonic() - self.opened)
                if remaining <= 0:
                    self._age_limit()
                    return None
                # Asleep until bytes, the close or the age limit: ten thousand idle sessions wake
                # nobody (the simulator's stop shuts the socket down, which ends the wait).
                if not poller.poll(remaining * 1000):
                    continue
                with self._send_lock:
                    try:
                        messages = self.peer.receive()
                    except OSError:
                        return None
                for _, message in messages:
                    self.recorder.frame(message)
                    self._handle(message)
            return self.peer.close_code
        finally:
            self.closed.set()
            for lane in self.lanes.values():
                lane.put(None)
            for thread in self.threads:
                thread.join(2.0)
            with self._send_lock:
                self.peer.close(1000)

    def _age_limit(self) -> None:
        exc = ApiError(
            400,
            "Responses websocket connection limit reached (60 minutes). Create a new websocket"
            " connection to continue.",
            code="websocket_connection_limit_reached",
        )
        self.send(_error(exc, None))
        with self._send_lock:
            self.peer.close(1001, "connection limit reached")

    def _handle(self, message: bytes) -> None:
        try:
            frame = json.loads(message)
        except ValueError:
            self.send(_error(errors.bad_json(), None))
            return
        if not isinstance(frame, dict):
            self.send(_error(errors.invalid_type("event", "an object", frame), None))
            return
        kind = frame.get("type")
        lane = frame.get("stream_id")
        if lane is not None and not (isinstance(lane, str) and _STREAM_ID.fullmatch(lane)):
            exc = ApiError(
                400,
                "Invalid 'stream_id': use 1 to 256 letters, digits, '_', '.' or '-'.",
                param="stream_id",
                code="invalid_stream_id",
            )
            self.send(_error(exc, None))
            return
        lane = lane or ""
        if kind == "response.create":
            self._enqueue(lane, frame)
        elif kind == "response.steer":
            accepted: JsonDict = {
                "type": "response.steer.accepted",
                "previous_response_id": frame.get("previous_response_id"),
            }
            self.send(_with_lane(dumps(accepted), lane))
        else:
            shown = kind if isinstance(kind, str) else json.dumps(kind)
            self.send(_error(ApiError(400, f"Unknown event type {shown!r}.", param="type"), lane))

    def _enqueue(self, lane: str, frame: JsonDict) -> None:
        pending = self.lanes.get(lane)
        if pending is None:
            if len(self.lanes) >= MAX_LANES:
                exc = ApiError(
                    400,
                    f"This connection already has {MAX_LANES} streams; reuse one.",
                    param="stream_id",
                    code="websocket_stream_limit_reached",
                )
                self.send(_error(exc, lane))
                return
            pending = self.lanes[lane] = queue.Queue()
            thread = threading.Thread(target=self._lane, args=(lane, pending), daemon=True)
            self.threads.append(thread)
            thread.start()
        pending.put(frame)

    def _lane(self, lane: str, pending: queue.Queue[JsonDict | None]) -> None:
        while (frame := pending.get()) is not None:
            try:
                self._create(lane, frame)
            except ApiError as exc:
                self.send(_error(exc, lane))

    def _find(self, response_id: str) -> ResponseRecord | None:
        return self.cache.get(response_id) or self.store.get(response_id)

    def _create(self, lane: str, frame: JsonDict) -> None:
        body = {k: v for k, v in frame.items() if k not in ("type", "stream_id", "generate", "stream")}
        if body.get("background"):
            raise ApiError(400, "Background mode is not supported in WebSocket mode.", param="background")
        record, job, faults = self.new_response(
            body, {}, stream=True, background=False, find=self._find, websocket=True
        )
        self.cache[record.id] = record
        if frame.get("generate") is False:
            self._warm_up(lane, record)
            return
        if record.stored:
            self.store.add(record)
        job.start(self.store.pacer)
        index = 0
        while True:
            events, finished = record.wait_from(index, timeout=_POLL_S, interrupted=self.closed.is_set)
            for event in events:
                data = _with_lane(event.data, lane)
                if faults.stamp:
                    data = stamped(data)
                if not self.send(data):
                    if not record.stored:
                        job.stop()
                    return
                index += 1
                if faults.cut_after is not None and index >= faults.cut_after:
                    self._drop(clean=faults.cut_mode == "clean")
                    return
            if (finished and index >= len(record.events)) or self.closed.is_set():
                if not finished and not record.stored:
                    job.stop()
                return

    def _warm_up(self, lane: str, record: ResponseRecord) -> None:
        snapshot = record.current()
        done = {**snapshot, "status": "completed", "output": [], "usage": usage(0, 0)}
        for seq, (kind, response) in enumerate(
            (("response.created", snapshot), ("response.completed", done))
        ):
            event = {"type": kind, "sequence_number": seq, "response": response}
            self.send(_with_lane(dumps(event), lane))

    def _drop(self, *, clean: bool) -> None:
        if clean:
            with self._send_lock:
                self.peer.close(1000)
            return
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def serve_session(
    sock: socket.socket,
    new_response: NewResponse,
    store: Store,
    recorder: Recorder,
    max_age_s: float,
) -> None:
    """Serve one upgraded connection until it closes."""
    recorder.websocket_opened()
    code: int | None = None
    try:
        code = _Session(sock, new_response, store, recorder, max_age_s).run()
    finally:
        recorder.websocket_closed(code)
