"""One end of a relayed WebSocket connection: a socket and the ``websockets`` sans-I/O protocol.

The protocol object (``websockets.protocol``, the library's documented sans-I/O layer) parses and
makes frames, answers pings and runs the closing handshake; this class moves its bytes, reads only
when a poll said the socket is readable, and bounds every write by a timeout. Nothing here starts a
thread or an event loop. Text messages are handed over whole (fragments joined) and sent as one
frame with the same payload: frames are re-masked and re-framed, never re-encoded.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import time

from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import CLOSED, OPEN, Protocol
from websockets.server import ServerProtocol

__all__ = ["Message", "Peer", "accept_upgrade"]

_READ_SIZE = 65536

#: One whole data message: its opcode (text or binary) and payload.
Message = tuple[Opcode, bytes]


def accept_upgrade(path: str, headers: list[tuple[str, str]]) -> Response:
    """The handshake answer to an upgrade request the WSGI server already parsed: a 101 with its
    ``Sec-WebSocket-Accept``, or the 400/426 of a malformed request (no extension is offered)."""
    return ServerProtocol().accept(Request(path, Headers(headers)))


class Peer:
    """One side of a relayed connection (the client's socket or the upstream's).

    :param sock: the connected socket (after the opening handshake).
    :param protocol: the sans-I/O protocol, in the OPEN state.
    :param send_timeout: seconds one write may take before the peer is taken for stalled.
    """

    def __init__(self, sock: socket.socket, protocol: Protocol, *, send_timeout: float) -> None:
        self.sock = sock
        self.protocol = protocol
        self.heard_at = time.monotonic()
        """When bytes last arrived (any frame, pongs included)."""
        self.ping_sent_at: float | None = None
        """When the unanswered ping went out, or None."""
        self._eof = False
        self._fragments: list[bytes] = []
        self._fragment_opcode = Opcode.TEXT
        sock.settimeout(send_timeout)

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def open(self) -> bool:
        return self.protocol.state is OPEN

    @property
    def ended(self) -> bool:
        """The connection is over: closed, or the peer's bytes ended."""
        return self.protocol.state is CLOSED or self.protocol.close_rcvd is not None or self._eof

    @property
    def close_code(self) -> int | None:
        """The close code the peer sent, or None (no close frame: a drop)."""
        received = self.protocol.close_rcvd
        return received.code if received is not None else None

    def receive(self) -> list[Message]:
        """Read what has arrived (call when the socket is readable) and return the whole messages it
        completed; pings are answered. Raises OSError when the socket failed."""
        sock = self.sock
        if isinstance(sock, ssl.SSLSocket):
            data = sock.recv(_READ_SIZE)
            while sock.pending():
                data += sock.recv(sock.pending())
        else:
            # One read(2): a socket with a timeout polls before each recv, and each call lets go of
            # the GIL, which this thread must then win back from thousands of others.
            try:
                data = os.read(sock.fileno(), _READ_SIZE)
            except BlockingIOError:  # readable for nothing: a spurious wake-up
                return []
        if data:
            self.heard_at = time.monotonic()
            self.ping_sent_at = None
            self.protocol.receive_data(data)
        else:
            self._eof = True
            self.protocol.receive_eof()
        messages = [m for event in self.protocol.events_received() if (m := self._message(event))]
        self.flush()
        return messages

    def _message(self, event: object) -> Message | None:
        if not isinstance(event, Frame):
            return None
        opcode = event.opcode
        if opcode in (Opcode.TEXT, Opcode.BINARY):
            self._fragment_opcode = opcode
        elif opcode is not Opcode.CONT:
            return None  # control frames: the protocol answered them
        if not event.fin:
            self._fragments.append(bytes(event.data))
            return None
        if self._fragments:
            self._fragments.append(bytes(event.data))
            payload, self._fragments = b"".join(self._fragments), []
            return self._fragment_opcode, payload
        return self._fragment_opcode, bytes(event.data)

    def send(self, message: Message) -> None:
        """Send one message as one frame; raises OSError (``TimeoutError`` for a stalled peer)."""
        opcode, payload = message
        if not self.open:
            return
        if opcode is Opcode.BINARY:
            self.protocol.send_binary(payload)
        else:
            self.protocol.send_text(payload)
        self.flush()

    def ping(self) -> None:
        if self.open and self.ping_sent_at is None:
            self.protocol.send_ping(b"wsgi-proxy")
            self.ping_sent_at = time.monotonic()
            self.flush()

    def flush(self) -> None:
        """Write what the protocol has to send. Its end of stream half-closes the socket, unless
        the peer's bytes ended first: then the socket's close, which follows, says the same, and a
        departure costs one call fewer (each a wait for the GIL among thousands of threads)."""
        for data in self.protocol.data_to_send():
            if data:
                self._write(data)
            elif not self._eof:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_WR)

    def _write(self, data: bytes, *, wait: bool = True) -> None:
        """Write ``data``: first what the socket takes now, with one write(2) on a plain socket
        (the usual case, and one GIL hand-off where the timed ``sendall`` makes two, its poll and
        its send); then, with ``wait``, the timed ``sendall`` for whatever it did not take (all of
        it on TLS), and without, nothing: the rest is dropped."""
        sent = 0
        with contextlib.suppress(BlockingIOError, ssl.SSLWantWriteError):
            if not isinstance(self.sock, ssl.SSLSocket):
                sent = os.write(self.sock.fileno(), data)  # its timeout made it non-blocking
            elif not wait:
                self.sock.setblocking(False)
                sent = self.sock.send(data)
        if wait and sent < len(data):
            self.sock.sendall(memoryview(data)[sent:])

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake (when open), ignoring a peer that is already gone."""
        with contextlib.suppress(OSError):
            if self.open:
                self.protocol.send_close(code, reason)
                self.flush()

    def close_at_once(self, code: int) -> None:
        """Send the close frame (when open) only as far as the socket takes it now, for a socket
        that is closed right after: a peer that stopped reading costs no wait, and its truncated
        frame and the close tell it the same."""
        if not self.open:
            return
        self.protocol.send_close(code)
        with contextlib.suppress(OSError):
            for data in self.protocol.data_to_send():
                if data:
                    self._write(data, wait=False)
