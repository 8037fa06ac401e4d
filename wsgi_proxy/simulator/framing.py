"""Bytes on the wire for SSE bodies: frames, split writes, chunked encoding and gzip.

:class:`SseWriter` only needs a ``send(bytes)`` callable, so the server decides what a write is (a
``sendall`` on the socket) and the encoding rules stay testable without one.
"""

from __future__ import annotations

import time
import typing as t
import zlib

__all__ = [
    "LAST_CHUNK",
    "TERMINATORS",
    "SseWriter",
    "chunk",
    "comment_frame",
    "event_frame",
    "split_frame",
    "stamped",
]

TERMINATORS: dict[str, bytes] = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"}
LAST_CHUNK = b"0\r\n\r\n"


def event_frame(event_type: str, data: bytes, framing: str = "lf") -> bytes:
    """``event: <type>``, ``data: <json>`` and a blank line, with ``framing`` line terminators."""
    nl = TERMINATORS[framing]
    return b"event: " + event_type.encode() + nl + b"data: " + data + nl + nl


def stamped(data: bytes) -> bytes:
    """An event's JSON with ``"sim_sent_at"`` added last: this process's :func:`time.monotonic` now,
    a clock every process of the machine shares (``sim_stamp``: one-way delays for benchmarks)."""
    return data[:-1] + b',"sim_sent_at":%.6f}' % time.monotonic()


def comment_frame(text: str = "ping", framing: str = "lf") -> bytes:
    nl = TERMINATORS[framing]
    return b": " + text.encode() + nl + nl


def split_frame(frame: bytes, framing: str = "lf") -> list[bytes]:
    """Split an :func:`event_frame` into pieces that each cut a line in the middle.

    The cuts fall inside ``event:``, inside ``data:``, inside the JSON (right after the first UTF-8
    lead byte when there is one, so a character is split) and inside the final blank line. With CRLF
    framing two of the cuts fall exactly between ``\\r`` and ``\\n``.
    """
    nl = TERMINATORS[framing]
    first_end = frame.find(nl)
    if first_end < 0 or len(frame) < 8:
        return [frame]
    data_start = first_end + len(nl)
    data_end = len(frame) - 2 * len(nl)
    cuts = {3, data_start + 2}
    if framing == "crlf":
        cuts.add(first_end + 1)
        cuts.add(len(frame) - 1)
    else:
        cuts.add(len(frame) - len(nl))
    payload_start = data_start + len(b"data: ")
    lead = next((i for i in range(payload_start, data_end) if frame[i] >= 0xC0), None)
    cuts.add(lead + 1 if lead is not None else (payload_start + data_end) // 2)
    points = sorted(c for c in cuts if 0 < c < len(frame))
    return [frame[a:b] for a, b in zip([0, *points], [*points, len(frame)], strict=True)]


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n" % len(data) + data + b"\r\n"


class SseWriter:
    """Writes one SSE body through ``send``, one flushed write per event (or per split piece).

    :param send: writes bytes to the client, raising :class:`OSError` when it is gone.
    :param framing: ``lf``, ``crlf`` or ``cr`` line terminators.
    :param split: write each event in several pieces with ``split_pause`` seconds between them.
    :param chunked: wrap every write in a chunk and end with the last chunk; otherwise the body is
        delimited by closing the connection.
    :param gzip: compress the body, flushing with ``Z_SYNC_FLUSH`` after every write so each one
        decodes as it arrives.
    """

    def __init__(
        self,
        send: t.Callable[[bytes], object],
        *,
        framing: str = "lf",
        split: bool = False,
        chunked: bool = True,
        gzip: bool = False,
        split_pause: float = 0.001,
    ) -> None:
        self._send = send
        self._framing = framing
        self._split = split
        self._chunked = chunked
        self._split_pause = split_pause
        self._compressor = zlib.compressobj(6, zlib.DEFLATED, 31) if gzip else None

    def event(self, event_type: str, data: bytes) -> None:
        frame = event_frame(event_type, data, self._framing)
        if not self._split:
            self._write(frame)
            return
        for index, piece in enumerate(split_frame(frame, self._framing)):
            if index:
                # Separate TCP segments, so the reader really sees the pieces apart.
                time.sleep(self._split_pause)
            self._write(piece)

    def data(self, payload: bytes) -> None:
        """An event of one ``data:`` line and no type (chat completion chunks, ``[DONE]``)."""
        nl = TERMINATORS[self._framing]
        self._write(b"data: " + payload + nl + nl)

    def comment(self, text: str = "ping") -> None:
        self._write(comment_frame(text, self._framing))

    def finish(self) -> None:
        """End the body cleanly: the gzip trailer, then the last chunk."""
        if self._compressor is not None:
            self._write_raw(self._compressor.flush(zlib.Z_FINISH))
        if self._chunked:
            self._send(LAST_CHUNK)

    def _write(self, data: bytes) -> None:
        if self._compressor is not None:
            data = self._compressor.compress(data) + self._compressor.flush(zlib.Z_SYNC_FLUSH)
        self._write_raw(data)

    def _write_raw(self, data: bytes) -> None:
        if data:
            self._send(chunk(data) if self._chunked else data)
