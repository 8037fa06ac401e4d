"""Bytes in, bytes out: the SSE event splitter and the relay of one upstream stream.

The relay forwards the upstream's bytes unchanged, in whole events (everything up to and including
a blank line), each as soon as it is complete. It looks at a copy of each event only to note its
``type`` and ``sequence_number``; it never re-serialises. No Flask or requests imports here.
"""

from __future__ import annotations

import json
import logging
import re
import typing as t
from dataclasses import dataclass

from .errors import StreamAborted, UpstreamStreamInterrupted

__all__ = ["EventInfo", "EventSplitter", "EventTooLarge", "StreamRelay", "UpstreamBody", "parse_event"]

log = logging.getLogger("wsgi_proxy.stream")

_TERMINATOR = re.compile(rb"[\r\n]")
_CR, _LF = 13, 10

#: Event types after which a Responses stream is over.
TERMINAL_TYPES = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})


class EventTooLarge(ValueError):
    """One SSE event grew past the configured limit without ending."""


class EventSplitter:
    """Splits an SSE byte stream into whole events, in time linear in the bytes fed.

    An event is every byte up to and including the blank line that ends it; lines may end in
    ``\\r\\n``, ``\\n`` or ``\\r`` (WHATWG). Bytes are never altered or re-framed: the concatenation
    of everything returned equals everything fed. A blank line ended by a ``\\r`` that is the last
    byte fed ends the event at once (nothing held back); a ``\\n`` arriving next is then its own
    harmless empty block.

    :param max_event_bytes: raise :class:`EventTooLarge` when an unfinished event exceeds this.
    """

    def __init__(self, max_event_bytes: int = 64 * 1024 * 1024) -> None:
        self._buf = bytearray()
        self._pos = 0  # next byte of _buf to scan
        self._line_start = True  # _pos is at the start of a line
        self._cr_pending = False  # _pos follows a '\r' that ended a non-blank line
        self._max = max_event_bytes

    @property
    def pending(self) -> int:
        """How many bytes of an unfinished event are held."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the events it completed, in order."""
        buf = self._buf
        buf += data
        pos, line_start, cr_pending = self._pos, self._line_start, self._cr_pending
        start = 0
        events: list[bytes] = []
        end = len(buf)
        while pos < end:
            if cr_pending:
                cr_pending = False
                if buf[pos] == _LF:  # the '\n' of a '\r\n' split across reads
                    pos += 1
                    continue
            match = _TERMINATOR.search(buf, pos)
            if match is None:
                pos, line_start = end, False
                break
            i = match.start()
            if i == pos and line_start:  # an empty line: the event is complete
                stop = i + 1
                if buf[i] == _CR and stop < end and buf[stop] == _LF:
                    stop += 1
                events.append(bytes(buf[start:stop]))
                start = pos = stop
                continue
            pos, line_start = i + 1, True
            if buf[i] == _CR:
                if pos < end:
                    if buf[pos] == _LF:
                        pos += 1
                else:
                    cr_pending = True
        if start:
            del buf[:start]
            pos -= start
        if len(buf) > self._max:
            raise EventTooLarge(f"an SSE event exceeded {self._max} bytes without ending")
        self._pos, self._line_start, self._cr_pending = pos, line_start, cr_pending
        return events


@dataclass(frozen=True, slots=True)
class EventInfo:
    """What the relay notes about one event: its JSON ``type`` and ``sequence_number``."""

    type: str | None
    sequence_number: int | None


_HEAD_TYPE = re.compile(rb'\{\s*"type"\s*:\s*"([^"\\]{1,200})"')
_HEAD_SEQ = re.compile(rb'"sequence_number"\s*:\s*([0-9]{1,19})\b')
_HEAD = 512
_NONE = EventInfo(None, None)


def _data_of(event: bytes) -> bytes | None:
    data: list[bytes] = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
    if not data:
        return None
    return data[0] if len(data) == 1 else b"\n".join(data)


def parse_event(event: bytes) -> EventInfo:
    """Note the ``type`` and ``sequence_number`` of one whole event (a side copy; never raises).

    OpenAI writes both fields first, so they are read from the head of the ``data`` line; anything
    else is parsed as JSON. Comments, keep-alive comments and empty blocks give ``(None, None)``.
    """
    data = _data_of(event)
    if data is None:
        return _NONE
    head = data[:_HEAD]
    type_match = _HEAD_TYPE.match(head)
    seq_match = _HEAD_SEQ.search(head)
    # Only a top-level key counts: nothing may open a nested object before it.
    if type_match and seq_match and head.count(b"{", 0, seq_match.start()) == 1:
        return EventInfo(type_match.group(1).decode("utf-8", "replace"), int(seq_match.group(1)))
    try:
        obj = json.loads(data)
    except ValueError:
        return _NONE
    if not isinstance(obj, dict):
        return _NONE
    type_ = obj.get("type")
    seq = obj.get("sequence_number")
    return EventInfo(
        type_ if isinstance(type_, str) else None,
        seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
    )


class UpstreamBody(t.Protocol):
    """The upstream side of a relay (implemented in ``upstream.py``)."""

    #: True when the transport marks the body's end (chunked or Content-Length), so a clean EOF is
    #: a real end; False for a close-delimited body, whose cut looks like an end.
    framed: bool

    def read(self) -> bytes:
        """Bytes as soon as any arrive; ``b""`` at a clean end; raises UpstreamStreamInterrupted."""
        ...

    def close(self) -> None:
        """Release the connection (called once, from the relaying thread)."""
        ...


class StreamRelay:
    """The WSGI iterable of one SSE response: upstream bytes in, the same bytes out, whole events.

    It yields ``b""`` first so the status line and headers go out at once. When the upstream
    breaks off, it raises :class:`StreamAborted` so the client's connection ends without a clean
    terminator and the client knows to resume. ``close()`` releases everything whether or not
    iteration began (WSGI servers call it).

    :param body: the upstream body.
    :param label: names the stream in logs (a response id or the request path).
    :param client_gone: tells whether the disconnect watchdog saw the client leave.
    :param on_close: called once when the relay ends, however it ends.
    :param max_event_bytes: the largest event relayed.
    """

    def __init__(
        self,
        body: UpstreamBody,
        *,
        label: str,
        client_gone: t.Callable[[], bool] = lambda: False,
        on_close: t.Callable[[], None] = lambda: None,
        max_event_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._body = body
        self._label = label
        self._client_gone = client_gone
        self._on_close: t.Callable[[], None] | None = on_close
        self._splitter = EventSplitter(max_event_bytes)
        self.events = 0
        self.last_sequence: int | None = None
        self.terminal: str | None = None
        self._gen: t.Generator[bytes, None, None] = self._run()

    def __iter__(self) -> StreamRelay:
        return self

    def __next__(self) -> bytes:
        return next(self._gen)

    def close(self) -> None:
        """End the relay and release the upstream connection (idempotent)."""
        self._gen.close()
        self._release()

    def _release(self) -> None:
        on_close, self._on_close = self._on_close, None
        if on_close is None:
            return
        try:
            self._body.close()
        finally:
            on_close()

    def _observe(self, event: bytes) -> None:
        info = parse_event(event)
        if info.sequence_number is not None:
            self.last_sequence = info.sequence_number
        if info.type is not None:
            self.events += 1
            if info.type in TERMINAL_TYPES:
                self.terminal = info.type

    def _failure_at_eof(self) -> str | None:
        if self._splitter.pending:
            return f"the upstream ended in the middle of an event ({self._splitter.pending} bytes unfinished)"
        if not self._body.framed and self.terminal is None and self.events:
            return "the upstream closed a close-delimited stream before its terminal event"
        return None

    def _run(self) -> t.Generator[bytes, None, None]:
        try:
            yield b""
            while True:
                try:
                    chunk = self._body.read()
                    if not chunk:
                        failure = self._failure_at_eof()
                        break
                    events = self._splitter.feed(chunk)
                except UpstreamStreamInterrupted as exc:
                    failure = exc.reason
                    break
                except EventTooLarge as exc:
                    failure = str(exc)
                    break
                if events:
                    for event in events:
                        self._observe(event)
                    yield events[0] if len(events) == 1 else b"".join(events)
            if failure is None or self._client_gone():
                return
            # Seam for transparent resume: a background stream could be re-opened here from
            # `self.last_sequence`. Until then the client must see a broken stream, never an end.
            log.warning(
                "upstream stream %s broke after %d events (last sequence_number %s): %s;"
                " aborting the client connection so the client can resume",
                self._label,
                self.events,
                self.last_sequence,
                failure,
            )
            raise StreamAborted(f"upstream stream {self._label} broke: {failure}")
        finally:
            self._release()
