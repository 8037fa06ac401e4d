"""The body of one streaming upstream response, read as it arrives.

The only code that reaches into ``urllib3`` and ``http.client`` internals (the response's file
object and socket): a chunked body is read straight from the connection's buffered reader and
decoded by :class:`~wsgi_proxy.wire.chunked.ChunkDecoder`, so that one read takes every chunk that
has arrived; and the next bytes are waited for without consuming them. Checked against the
``urllib3`` and ``requests`` versions that ``pyproject.toml`` bounds; every such reach falls back to
plain reads when the internals are not what it expects.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import typing as t

import requests
import urllib3

from ..errors import UpstreamStreamInterrupted
from ..wire.chunked import ChunkDecoder
from .translate import translate_stream_errors

__all__ = ["READ_SIZE", "UpstreamStream"]

READ_SIZE = 65536


class UpstreamStream:
    """The body of one streaming upstream response, read as it arrives.

    A read returns whatever one receive brings, so events are relayed as they arrive on chunked,
    Content-Length and close-delimited bodies alike (requests' content and line iterators wait to
    fill a buffer on the latter two). Upstreams often send an event per chunk; http.client reads
    one chunk per call, so a chunked body is decoded here instead, every arrived chunk in one go.
    """

    def __init__(self, response: requests.Response) -> None:
        self._response = response
        self._raw: urllib3.response.BaseHTTPResponse = response.raw
        chunked = bool(getattr(self._raw, "chunked", False))
        self.framed = chunked or "content-length" in response.headers
        self._closed = False
        self._poller: select.poll | None = None
        # An encoded body goes through urllib3's decoder, which the chunks must reach first.
        fp = getattr(self._raw, "_fp", None)  # http.client.HTTPResponse
        reader = getattr(fp, "fp", None)  # its BufferedReader over the socket
        direct = chunked and "content-encoding" not in response.headers and hasattr(reader, "read1")
        self._reader: t.Any = reader if direct and getattr(fp, "chunk_left", 0) is None else None
        self._chunks = ChunkDecoder()
        # Whether the reader's buffer may hold bytes of the body (those that came with the headers,
        # at first): a wait must then look there before it waits on the socket.
        self._buffered = True

    def read_block(self, size: int) -> bytes:
        """The next ``size`` bytes of a bulk body (a file's content), fewer only at its end; b"" after
        it. Waits for them: for bulk bytes, few large writes matter more than the first byte."""
        with translate_stream_errors():
            return self._raw.read(size, decode_content=True) or b""

    def read(self) -> bytes:
        """The next bytes of the body: at least one, or b"" at its end.

        Nothing is waited for beyond the first receive: the bytes go out as soon as they are read.
        Broken chunked framing, or a connection that ends inside a chunk, raises
        :class:`UpstreamStreamInterrupted` after the payload before it has been returned.
        """
        if self._reader is None:
            with translate_stream_errors():
                return self._raw.read1(READ_SIZE, decode_content=True) or b""
        while not self._chunks.done:
            with translate_stream_errors():
                received = self._reader.read1(READ_SIZE)
                # read1 takes what is buffered, or reads past an empty buffer: fewer bytes than
                # asked for mean the buffer is empty now.
                self._buffered = len(received) == READ_SIZE
                data = self._chunks.feed(received)  # broken framing: a ChunkedFramingError
            if data:
                return data
            if not received:
                raise UpstreamStreamInterrupted("the upstream connection closed inside its chunked body")
        return b""

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the next :meth:`read` to have something to return.

        True when bytes (or the end, or an error) are there to read; False after ``timeout`` seconds
        of upstream silence, with nothing consumed, so that the relay can send a keep-alive and wait
        again. Reading with a socket timeout instead would not do: urllib3 closes the connection on a
        read timeout. Where the answer cannot be known (an unusual connection object) it says True,
        and the read simply blocks as it would without keep-alives.

        Once the reader's buffer is known to be empty (a chunked body read directly, after its first
        read) the wait is a single ``poll``: with thousands of streams in one worker every call that
        lets go of the GIL has to win it back, so a quiet stream's event costs as few as it can.
        """
        if self._reader is not None and self._chunks.done:
            return True  # the terminating chunk came with the last read: the next one ends the body
        try:
            reader = self._raw._fp.fp  # type: ignore[attr-defined]  # http.client's BufferedReader
            sock = _socket_of(reader)
            if len(self._raw._decoded_buffer):  # type: ignore[attr-defined]
                return True
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return True
            if self._reader is None or self._buffered:
                # Bytes waiting in the kernel mean the read will progress: one syscall on a busy stream.
                if self._poll(sock):
                    return True
                ahead = _peek_without_blocking(reader, sock)
                if self._chunks.would_yield(ahead) if self._reader is not None else ahead:
                    return True
            return self._poll(sock, timeout)
        except (AttributeError, TypeError, ValueError, OSError):
            return True

    def _poll(self, sock: socket.socket, timeout: float = 0.0) -> bool:
        """Whether the kernel holds bytes of ``sock`` (waiting up to ``timeout`` seconds for some)."""
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(sock, select.POLLIN | select.POLLPRI)
        return bool(self._poller.poll(timeout * 1000))

    def shutdown(self) -> None:
        """Unblock a reader in another thread and end the connection for the upstream at once (the
        disconnect watchdog calls this when the client has gone).

        Both directions: urllib3's own ``shutdown`` stops reading only, which tells the upstream
        nothing, so it went on streaming (and a foreground response on generating) until the relay's
        thread got round to closing, seconds later with thousands of threads queued for the GIL.
        """
        if self._closed:
            return
        try:
            _socket_of(self._raw._fp.fp).shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]
        except (AttributeError, TypeError):  # not the connection object this was written for
            with contextlib.suppress(Exception):
                self._raw.shutdown()
        except OSError:  # already closed or reset
            pass

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(Exception):
            self._response.close()


def _socket_of(reader: t.Any) -> socket.socket:
    """The socket under http.client's reader (the SocketIO's), also once urllib3 has let go of it."""
    sock: socket.socket = reader.raw._sock
    return sock


def _peek_without_blocking(reader: t.Any, sock: socket.socket) -> bytes:
    """What the reader holds, or can take from the socket at once, without consuming it."""
    previous = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        return bytes(reader.peek(1) or b"")
    except (BlockingIOError, ssl.SSLWantReadError):
        return b""
    finally:
        sock.settimeout(previous)
