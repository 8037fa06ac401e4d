"""One thread that writes the events of many plain background streams, so that the simulator holds
tens of thousands of them without a thread each (``SimulatorConfig.shared_writer``).

A stream qualifies when its faults leave the bytes plain (LF framing, chunked, no split writes, no
gzip, no comments, no cut): the handler sends the status line and headers, then hands the
connection here and returns. A record tells its streams of every new event; this thread writes
them as chunked SSE without blocking (a client that does not read keeps its bytes queued here), and
ends the body after the terminal event. A client that leaves is noticed by its socket.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading
import time
import typing as t

from .framing import LAST_CHUNK, chunk, event_frame, stamped
from .recording import CloseReason, Recorder, StreamClosure
from .store import ResponseRecord

__all__ = ["Fanout"]


class _Stream:
    """One connection: its record, the next event to write, and the bytes not yet taken."""

    def __init__(
        self, fanout: Fanout, sock: socket.socket, record: ResponseRecord, start: int, stamp: bool
    ) -> None:
        self.fanout = fanout
        self.stamp = stamp
        self.sock = sock
        self.record = record
        self.index = start
        self.pending = bytearray()
        self.ending = False
        self.opened = time.monotonic()

    def wake(self) -> None:
        self.fanout.ready(self)

    def pump(self) -> None:
        """Queue the events logged since the last pump, and the end once the log is finished."""
        events, finished = self.record.wait_from(self.index, timeout=0)
        for event in events:
            self.pending += chunk(event_frame(event.type, stamped(event.data) if self.stamp else event.data))
            self.index += 1
        if finished and not self.ending and self.index >= len(self.record.events):
            self.pending += LAST_CHUNK
            self.ending = True


class Fanout:
    """The shared writer: a selector over every handed-over connection, fed by their records.

    :param recorder: where the streams are counted and their endings noted.
    """

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._ready: set[_Stream] = set()
        self._streams: dict[int, _Stream] = {}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="simulator-fanout", daemon=True)
        self._thread.start()

    def serve(self, sock: socket.socket, record: ResponseRecord, start: int, *, stamp: bool = False) -> None:
        """Write ``record``'s events from index ``start`` on to ``sock`` (headers already sent), each
        stamped with the time it is queued when ``stamp`` (``sim_stamp``)."""
        sock.setblocking(False)
        stream = _Stream(self, sock, record, start, stamp)
        self._recorder.stream_opened()
        with self._lock:
            self._streams[sock.fileno()] = stream
            self._selector.register(sock, selectors.EVENT_READ, stream)
        record.listen(stream.wake)
        self.ready(stream)

    def ready(self, stream: _Stream) -> None:
        with self._lock:
            self._ready.add(stream)
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"!")

    def close(self) -> None:
        """Drop every connection (the simulator stops)."""
        self._closed = True
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            self._end(stream, "client_gone")
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"!")

    def _run(self) -> None:
        while not self._closed:
            for key, mask in self._selector.select(1.0):
                if key.fileobj == self._wake_r:
                    with contextlib.suppress(BlockingIOError, OSError):
                        os.read(self._wake_r, 65536)
                    continue
                stream = t.cast(_Stream, key.data)
                if mask & selectors.EVENT_READ and not self._readable(stream):
                    continue
                if mask & selectors.EVENT_WRITE:
                    self._flush(stream)
            with self._lock:
                ready, self._ready = self._ready, set()
            for stream in ready:
                if stream.sock.fileno() >= 0:
                    stream.pump()
                    self._flush(stream)

    def _readable(self, stream: _Stream) -> bool:
        """A client only ever reads a stream: bytes from it are ignored, its end ends the stream."""
        try:
            if stream.sock.recv(65536):
                return True
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            pass
        self._end(stream, "client_gone")
        return False

    def _flush(self, stream: _Stream) -> None:
        try:
            while stream.pending:
                sent = stream.sock.send(stream.pending)
                del stream.pending[:sent]
        except (BlockingIOError, InterruptedError):
            self._selector.modify(stream.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, stream)
            return
        except OSError:
            self._end(stream, "client_gone")
            return
        if stream.ending:
            self._end(stream, "complete")
        else:
            self._selector.modify(stream.sock, selectors.EVENT_READ, stream)

    def _end(self, stream: _Stream, reason: CloseReason) -> None:
        with self._lock:
            if self._streams.pop(stream.sock.fileno(), None) is None:
                return
            self._ready.discard(stream)
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(stream.sock)
        stream.record.unlisten(stream.wake)
        with contextlib.suppress(OSError):
            stream.sock.shutdown(socket.SHUT_RDWR)
        stream.sock.close()
        self._recorder.stream_closed(StreamClosure(stream.record.id, stream.opened, time.monotonic(), reason))
