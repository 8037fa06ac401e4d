"""The body of one streaming upstream response, read as it arrives.

The only code that reaches into ``urllib3`` and ``http.client`` internals (the response's file
object, its chunk bookkeeping and socket), to read every chunk that has already arrived in one go
and to wait for the next bytes without consuming them. Checked against the ``urllib3`` and
``requests`` versions that ``pyproject.toml`` bounds; every such reach falls back to plain reads
when the internals are not what it expects.
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
from .translate import translate_stream_errors

__all__ = ["READ_SIZE", "UpstreamStream"]

READ_SIZE = 65536


class UpstreamStream:
    """The body of one streaming upstream response, read with ``raw.read1``.

    ``read1`` returns whatever one receive brings, so events are relayed as they arrive on
    chunked, Content-Length and close-delimited bodies alike (requests' content and line iterators
    wait to fill a buffer on the latter two).
    """

    def __init__(self, response: requests.Response) -> None:
        self._response = response
        self._raw: urllib3.response.BaseHTTPResponse = response.raw
        self._chunked = bool(getattr(self._raw, "chunked", False))
        self.framed = self._chunked or "content-length" in response.headers
        self._closed = False
        self._poller: select.poll | None = None
        # A decoder may need more network bytes before it yields any: read encoded bodies one by one.
        self._coalesce = "content-encoding" not in response.headers and hasattr(self._raw, "_fp")
        self._deferred: UpstreamStreamInterrupted | None = None

    def read_block(self, size: int) -> bytes:
        """The next ``size`` bytes of a bulk body (a file's content), fewer only at its end; b"" after
        it. Waits for them: for bulk bytes, few large writes matter more than the first byte."""
        with translate_stream_errors():
            return self._raw.read(size, decode_content=True) or b""

    def read(self) -> bytes:
        """The next bytes of the body: at least one, or b"" at its end.

        One ``read1`` takes at most one HTTP chunk, and upstreams often send an event per chunk; so
        while more of the body has already arrived, it is read on and returned together, up to
        ``READ_SIZE``. Nothing is waited for: the bytes go out as soon as the arrived ones are read.
        A failure after the first bytes is raised by the next call, so that those bytes go out first.
        """
        if self._deferred is not None:
            error, self._deferred = self._deferred, None
            raise error
        with translate_stream_errors():
            data = self._raw.read1(READ_SIZE, decode_content=True) or b""
        size = len(data)
        if not size or not self._coalesce:
            return data
        parts = [data]
        # Chunk by chunk, http.client's read1 is the same read without urllib3's per-call bookkeeping
        # (which only counts bytes for a Content-Length, and chunked bodies have none).
        fp = self._raw._fp  # type: ignore[attr-defined]  # http.client.HTTPResponse
        read1 = fp.read1 if self._chunked else lambda n: self._raw.read1(n, decode_content=True)
        try:
            with translate_stream_errors():
                while size < READ_SIZE and self._more_arrived(fp):
                    more = read1(READ_SIZE - size)
                    if not more:
                        break
                    parts.append(more)
                    size += len(more)
        except UpstreamStreamInterrupted as exc:
            self._deferred = exc
        return data if len(parts) == 1 else b"".join(parts)

    def _more_arrived(self, fp: t.Any) -> bool:
        """Whether the next ``read1`` returns body bytes at once: no waiting, and not the end."""
        try:
            reader = fp.fp
            sock = reader.raw._sock
            if not isinstance(sock, ssl.SSLSocket) and self._poll(sock):
                ahead = reader.peek(1)  # bytes wait in the kernel: the peek cannot block
            else:
                ahead = _peek_without_blocking(reader, sock)
            return _body_bytes_in_buffer(ahead, fp.chunked, fp.chunk_left)
        except (AttributeError, TypeError, ValueError, OSError):
            return False

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the next :meth:`read` to have something to return.

        True when bytes (or the end, or an error) are there to read; False after ``timeout`` seconds
        of upstream silence, with nothing consumed, so that the relay can send a keep-alive and wait
        again. Reading with a socket timeout instead would not do: urllib3 closes the connection on a
        read timeout. Where the answer cannot be known (an unusual connection object) it says True,
        and the read simply blocks as it would without keep-alives.
        """
        try:
            fp = self._raw._fp  # type: ignore[attr-defined]  # http.client.HTTPResponse
            reader = fp.fp  # its BufferedReader over the socket
            sock: socket.socket = reader.raw._sock  # the SocketIO's socket, also when urllib3 let go of it
            # Bytes waiting in the kernel mean the read will progress: one syscall on a busy stream.
            if self._poll(sock) or len(self._raw._decoded_buffer):  # type: ignore[attr-defined]
                return True
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return True
            if _complete_in_buffer(_peek_without_blocking(reader, sock), fp.chunked, fp.chunk_left):
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
        """Unblock a reader in another thread (the disconnect watchdog calls this)."""
        if self._closed:
            return
        with contextlib.suppress(Exception):
            self._raw.shutdown()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(Exception):
            self._response.close()


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


def _body_bytes_in_buffer(ahead: bytes, chunked: bool, chunk_left: int | None) -> bool:
    """Whether ``ahead`` holds body bytes that the next read returns without the network.

    Stricter than :func:`_complete_in_buffer`: at the end of a chunk, the next chunk's size line
    and at least one of its bytes must be there, and the last (zero-size) chunk does not count.
    """
    if not chunked or chunk_left:
        return bool(ahead)
    if chunk_left == 0:  # the CRLF ending the previous chunk is still unread
        ahead = ahead[2:]
    line, newline, rest = ahead.partition(b"\n")
    if not newline or not rest:
        return False
    try:
        return int(line.split(b";", 1)[0].strip(), 16) > 0
    except ValueError:
        return False


def _complete_in_buffer(ahead: bytes, chunked: bool, chunk_left: int | None) -> bool:
    """Whether ``ahead`` lets the next read return data without waiting for the network.

    With chunked framing, at the end of a chunk the reader must first get past the chunk's CRLF
    and the next size line; bytes that stop short of that would make the read block.
    """
    if not chunked or chunk_left:
        return bool(ahead)
    if chunk_left == 0:  # the CRLF ending the previous chunk is still unread
        ahead = ahead[2:]
    return b"\n" in ahead
