"""Server-sent events as pure functions: the linear event splitter and the side reading of an event.

An event is every byte up to and including the blank line that ends it. Nothing here alters bytes:
the splitter hands back exactly what it was fed, cut at event boundaries, and :func:`parse_event`
reads a copy. No I/O.
"""

from __future__ import annotations

import json
import re
import typing as t

__all__ = ["TERMINAL_TYPES", "EventInfo", "EventSplitter", "EventTooLarge", "data_of", "parse_event"]

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
        if self._cr_pending or buf.find(b"\r", self._pos) >= 0:
            events, start = self._split_any(buf)
        else:
            events, start = self._split_lf(buf)
        if start:
            del buf[:start]
            self._pos -= start
        if len(buf) > self._max:
            raise EventTooLarge(f"an SSE event exceeded {self._max} bytes without ending")
        return events

    def _split_lf(self, buf: bytearray) -> tuple[list[bytes], int]:
        """:meth:`feed` when no ``\\r`` is left to scan (OpenAI's framing): a blank line is a
        ``\\n\\n``, or a ``\\n`` at the start of a line; one C-level search per event."""
        pos, line_start = self._pos, self._line_start
        start = 0
        events: list[bytes] = []
        end = len(buf)
        while pos < end:
            if line_start and buf[pos] == _LF:  # a blank line right at the start of a line
                stop = pos + 1
            else:
                i = buf.find(b"\n\n", pos)
                if i < 0:
                    pos, line_start = end, buf[end - 1] == _LF
                    break
                stop = i + 2
            events.append(bytes(buf[start:stop]))
            start = pos = stop
            line_start = True
        self._pos, self._line_start = pos, line_start
        return events, start

    def _split_any(self, buf: bytearray) -> tuple[list[bytes], int]:
        """:meth:`feed` for every line ending: ``\\r\\n``, ``\\n`` and ``\\r`` (WHATWG)."""
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
        self._pos, self._line_start, self._cr_pending = pos, line_start, cr_pending
        return events, start


class EventInfo(t.NamedTuple):
    """What the relay notes about one event: its JSON ``type`` and ``sequence_number``."""

    type: str | None
    sequence_number: int | None


_HEAD_TYPE = re.compile(rb'\{\s*"type"\s*:\s*"([^"\\]{1,200})"')
_HEAD_SEQ = re.compile(rb'"sequence_number"\s*:\s*([0-9]{1,19})\b')
_HEAD = 512
_NONE = EventInfo(None, None)
# OpenAI's own shape, read off the raw event in one match: an optional ``event:`` line, then the
# ``data:`` line, its object opening with ``type`` and then ``sequence_number``.
_OPENAI_HEAD = re.compile(
    rb'(?:event:[^\r\n]*(?:\r\n?|\n))?data: ?\{"type":"([^"\\\r\n]{1,200})","sequence_number":([0-9]{1,19})\b'
)


def data_of(event: bytes) -> bytes | None:
    """The event's data: its ``data:`` lines' values joined by LF, or None when it has none."""
    # The usual shape first, in a few C-level scans: one data line, lines ended by LF.
    start = event.find(b"data:")
    if start >= 0 and (start == 0 or event[start - 1] == _LF) and b"\r" not in event:
        end = event.find(b"\n", start)
        if end >= 0 and event.find(b"\ndata:", end) < 0:
            start += 6 if event[start + 5 : start + 6] == b" " else 5
            return event[start:end]
    return _data_by_lines(event)


def _data_by_lines(event: bytes) -> bytes | None:
    """:func:`data_of` for every shape: any line endings, any number of data lines."""
    data: list[bytes] = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
    if not data:
        return None
    return data[0] if len(data) == 1 else b"\n".join(data)


#: The event types seen so far, decoded once each (bounded: an upstream could make up types).
_TYPE_NAMES: dict[bytes, str] = {}
_TYPE_NAMES_MAX = 1024


def _type_name(raw: bytes) -> str:
    name = _TYPE_NAMES.get(raw)
    if name is None:
        name = raw.decode("utf-8", "replace")
        if len(_TYPE_NAMES) < _TYPE_NAMES_MAX:
            _TYPE_NAMES[raw] = name
    return name


def parse_event(event: bytes) -> EventInfo:
    """Note the ``type`` and ``sequence_number`` of one whole event (a side copy; never raises).

    OpenAI writes both fields first, so they are read from the head of the ``data`` line; anything
    else is parsed as JSON. Comments, keep-alive comments and empty blocks give ``(None, None)``.
    """
    match = _OPENAI_HEAD.match(event)
    if match is not None:
        return EventInfo(_type_name(match.group(1)), int(match.group(2)))
    data = data_of(event)
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
    except (ValueError, RecursionError):
        return _NONE
    if not isinstance(obj, dict):
        return _NONE
    type_ = obj.get("type")
    seq = obj.get("sequence_number")
    return EventInfo(
        type_ if isinstance(type_, str) else None,
        seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
    )
