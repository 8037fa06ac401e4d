"""What the simulator observed: requests received, SSE connections open and how they ended."""

from __future__ import annotations

import json
import socket
import threading
import typing as t
from dataclasses import dataclass

__all__ = ["CloseReason", "RecordedRequest", "Recorder", "StreamClosure"]

CloseReason = t.Literal["complete", "client_gone", "cut", "cancelled"]


@dataclass(frozen=True)
class RecordedRequest:
    """One API request (not ``/health`` or ``/_sim/*``) as the simulator received it.

    ``path`` and ``query`` are the raw request target split at ``?``, undecoded (latin-1, as received).
    ``headers`` has lower-cased names (the last one wins); ``raw_headers`` keeps every pair as sent.
    ``time`` is :func:`time.monotonic` when the body had been read.
    """

    method: str
    path: str
    query: str
    headers: dict[str, str]
    raw_headers: list[tuple[str, str]]
    body: bytes
    time: float

    def json(self) -> t.Any:
        """The body decoded as JSON."""
        return json.loads(self.body)

    def to_dict(self) -> dict[str, t.Any]:
        """A JSON-ready form, with ``body`` as a latin-1 string (for ``GET /_sim/requests``)."""
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers,
            "raw_headers": [list(pair) for pair in self.raw_headers],
            "body": self.body.decode("latin-1"),
            "time": self.time,
        }


class StreamClosure(t.NamedTuple):
    """How one SSE connection ended. Times are :func:`time.monotonic`; ``closed_at`` is when the
    simulator finished the body or noticed that the client was gone."""

    response_id: str
    opened_at: float
    closed_at: float
    reason: CloseReason


class Recorder:
    """Thread-safe log of requests, open SSE connections, their closures and live sockets."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._closures: list[StreamClosure] = []
        self._open_streams = 0
        self._sockets: set[socket.socket] = set()
        self._open_websockets = 0
        self._frames: list[bytes] = []
        self._websocket_closes: list[int | None] = []

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def closures(self) -> list[StreamClosure]:
        with self._lock:
            return list(self._closures)

    @property
    def open_streams(self) -> int:
        with self._lock:
            return self._open_streams

    @property
    def open_websockets(self) -> int:
        with self._lock:
            return self._open_websockets

    @property
    def frames(self) -> list[bytes]:
        """Every WebSocket message clients sent, as received, oldest first."""
        with self._lock:
            return list(self._frames)

    @property
    def websocket_closes(self) -> list[int | None]:
        """How each WebSocket connection ended: the close code the client sent, or None without one."""
        with self._lock:
            return list(self._websocket_closes)

    def websocket_opened(self) -> None:
        with self._lock:
            self._open_websockets += 1

    def websocket_closed(self, code: int | None) -> None:
        with self._lock:
            self._open_websockets -= 1
            self._websocket_closes.append(code)

    def frame(self, message: bytes) -> None:
        with self._lock:
            self._frames.append(message)

    @property
    def sockets(self) -> list[socket.socket]:
        with self._lock:
            return list(self._sockets)

    def request(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            self._closures.clear()
            self._frames.clear()
            self._websocket_closes.clear()

    def stream_opened(self) -> None:
        with self._lock:
            self._open_streams += 1

    def stream_closed(self, closure: StreamClosure, *, was_open: bool = True) -> None:
        with self._lock:
            if was_open:
                self._open_streams -= 1
            self._closures.append(closure)

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
