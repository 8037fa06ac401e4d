"""Bytes in, bytes out: the SSE event splitter and the relay of one upstream stream.

The relay forwards the upstream's bytes unchanged, in whole events (everything up to and including
a blank line), each as soon as it is complete. It looks at a copy of each event only to note its
``type`` and ``sequence_number``; it never re-serialises. No Flask or requests imports here.
"""

from __future__ import annotations

import enum
import json
import logging
import re
import time
import typing as t
from dataclasses import dataclass

from .errors import StreamAborted, UpstreamStreamInterrupted
from .observe import usage_of

__all__ = [
    "Control",
    "EventInfo",
    "EventSplitter",
    "EventTooLarge",
    "KEEPALIVE",
    "Resume",
    "Resumer",
    "StreamRelay",
    "UpstreamBody",
    "parse_event",
]

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
    """:func:`_data_of` for every shape: any line endings, any number of data lines."""
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

    def wait(self, timeout: float) -> bool:
        """True when :meth:`read` would not block; False after ``timeout`` seconds of silence."""
        ...

    def close(self) -> None:
        """Release the connection (called once, from the relaying thread)."""
        ...


class Control(t.Protocol):
    """The relay's handle on its client (a :class:`~wsgi_proxy.watchdog.Watch`)."""

    def stop_reason(self) -> str | None:
        """Why the stream must end now (``client_gone``, ``send_timeout``, ``shutdown``), or None."""
        ...

    def writing(self, active: bool) -> None: ...

    def set_resumable(self, resumable: bool) -> None: ...

    def sleep(self, seconds: float) -> bool:
        """Wait; True if the stream was stopped meanwhile."""
        ...

    def cancel(self) -> None: ...


class Resume(enum.Enum):
    """What a resume attempt came to, when it did not give a new body."""

    RETRY = "a transient failure"
    GIVE_UP = "a permanent failure"


class Resumer(t.Protocol):
    """Re-opens a broken background stream after the last event the client received."""

    max_attempts: int

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before attempt number ``attempt`` (1-based)."""
        ...

    def reopen(self, response_id: str, after: int | None) -> UpstreamBody | Resume:
        """A new body with the events after ``after``, or why there is none."""
        ...

    def has_ended(self, response_id: str) -> bool:
        """Whether the response is over upstream (asked when a stream ends with nothing new)."""
        ...


KEEPALIVE = b": keep-alive\n\n"


class StreamRelay:
    """The WSGI iterable of one SSE response: upstream bytes in, the same bytes out, whole events.

    It yields ``b""`` first so the status line and headers go out at once, then every complete
    event as it arrives. While the upstream is silent and the client holds whole events only, it
    sends a ``: keep-alive`` comment every ``keepalive_interval`` seconds. When the upstream breaks
    off before a terminal event and a ``resumer`` is given (background streams), it re-opens the
    stream after the last event forwarded and carries on in the same response, each event exactly
    once. When it cannot, it raises :class:`StreamAborted` so the client's connection ends without a
    clean terminator and the client knows to resume. ``close()`` releases everything whether or not
    iteration began (WSGI servers call it).

    :param body: the upstream body.
    :param label: names the stream in logs (the method and path).
    :param control: the client side (disconnects, send timeouts, shutdown).
    :param resumer: re-opens a broken background stream; ``None`` when it cannot be resumed.
    :param response_id: the response's id when known in advance (a retrieve).
    :param keepalive_interval: seconds of silence before a keep-alive comment (0: never).
    :param max_event_bytes: the largest event relayed.
    :param on_response_id: called with the id of ``response.created`` (to record where it lives).
    :param on_close: called once when the relay ends, however it ends.
    :param on_forward: called with the number of events and bytes of each write (metrics).
    """

    def __init__(
        self,
        body: UpstreamBody,
        *,
        label: str,
        control: Control,
        resumer: Resumer | None = None,
        response_id: str | None = None,
        keepalive_interval: float = 0.0,
        max_event_bytes: int = 64 * 1024 * 1024,
        on_response_id: t.Callable[[str], None] | None = None,
        on_close: t.Callable[[], None] | None = None,
        on_forward: t.Callable[[int, int], None] | None = None,
    ) -> None:
        self._on_forward = on_forward
        self._body = body
        self._on_response_id = on_response_id
        self._on_close = on_close
        self._label = label
        self._control = control
        self._resumer = resumer
        self._keepalive = keepalive_interval
        self._max_event_bytes = max_event_bytes
        self._splitter = EventSplitter(max_event_bytes)
        self._released = False
        self._clean_eof = False
        self.response_id = response_id
        self.events = 0
        self.bytes = 0
        self.first_event_at: float | None = None
        self.usage: dict[str, int] | None = None
        self.model: str | None = None
        self.resumes = 0
        #: Why the stream ended early (client gone, aborted after an upstream failure), or None.
        self.failure: str | None = None
        self.last_sequence: int | None = None
        self.terminal: str | None = None
        control.set_resumable(resumer is not None and response_id is not None)
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
        if self._released:
            return
        self._released = True
        try:
            self._body.close()
        finally:
            self._control.cancel()
            if self._on_close is not None:
                self._on_close()

    def _observe(self, event: bytes) -> None:
        info = parse_event(event)
        if info.sequence_number is not None:
            self.last_sequence = info.sequence_number
        if info.type is None:
            return
        self.events += 1
        if self.first_event_at is None:
            self.first_event_at = time.monotonic()
        if info.type in TERMINAL_TYPES:
            self.terminal = info.type
            if info.type == "response.completed":
                self.usage, self.model = _completed_usage(event)
        elif info.type == "response.created" and self.response_id is None:
            self.response_id = _created_id(event)
            self._control.set_resumable(self._resumer is not None and self.response_id is not None)
            if self.response_id is not None and self._on_response_id is not None:
                self._on_response_id(self.response_id)

    def _failure_at_eof(self) -> str | None:
        if self._splitter.pending:
            return f"the upstream ended in the middle of an event ({self._splitter.pending} bytes unfinished)"
        if self.terminal is None and (self._resumer is not None or (not self._body.framed and self.events)):
            return "the upstream stream ended before its terminal event"
        return None

    def _write(self, data: bytes) -> t.Generator[bytes, None, None]:
        self.bytes += len(data)
        self._control.writing(True)
        yield data
        self._control.writing(False)

    def _pump(self) -> t.Generator[bytes, None, str | None]:
        """Relay the current body to its end; return why it failed, or None for a clean end."""
        self._clean_eof = False
        while True:
            try:
                if self._keepalive and not self._splitter.pending and not self._body.wait(self._keepalive):
                    yield from self._write(KEEPALIVE)
                    continue
                chunk = self._body.read()
                if not chunk:
                    self._clean_eof = True
                    return self._failure_at_eof()
                events = self._splitter.feed(chunk)
            except UpstreamStreamInterrupted as exc:
                return exc.reason
            except EventTooLarge as exc:
                return str(exc)
            if events:
                for event in events:
                    self._observe(event)
                data = events[0] if len(events) == 1 else b"".join(events)
                if self._on_forward is not None:
                    self._on_forward(len(events), len(data))
                yield from self._write(data)

    def _run(self) -> t.Generator[bytes, None, None]:
        try:
            yield b""
            attempt = 0
            while True:
                events_before = self.events
                failure = yield from self._pump()
                if failure is None:
                    return
                progressed = self.events > events_before
                if progressed:
                    attempt = 0  # the last body made progress: a fresh budget of attempts
                elif self._clean_eof and self._ended_upstream():
                    return  # nothing after our last event and the response is over: a true end
                outcome = self._recover(failure, attempt)
                if outcome is None:
                    return
                if isinstance(outcome, str):
                    self._abort(outcome)
                attempt, body = outcome
                self._body.close()
                self._body = body
                self._splitter = EventSplitter(self._max_event_bytes)  # a half event is dropped
                self.resumes += 1
        finally:
            self._release()

    def _ended_upstream(self) -> bool:
        if self._resumer is None or self.response_id is None or self._control.stop_reason():
            return False
        return self._resumer.has_ended(self.response_id)

    def _recover(self, failure: str, attempt: int) -> tuple[int, UpstreamBody] | str | None:
        """After a failure: a new body (with the attempt count), a reason to abort, or None to end."""
        while True:
            reason = self._control.stop_reason()
            if reason in ("client_gone", "send_timeout"):
                self.failure = reason
                return None
            if reason == "shutdown":
                return f"{failure}; the worker is shutting down"
            if self._resumer is None:
                return failure
            if self.response_id is None:
                return f"{failure}, before the response id was known"
            attempt += 1
            if attempt > self._resumer.max_attempts:
                return f"{failure}; resuming failed {self._resumer.max_attempts} times"
            if self._control.sleep(self._resumer.backoff(attempt)):
                continue  # stopped while waiting: the reason decides
            outcome = self._resumer.reopen(self.response_id, self.last_sequence)
            if outcome is Resume.GIVE_UP:
                return f"{failure}; the upstream refused to resume it"
            if not isinstance(outcome, Resume):
                log.info(
                    "resumed upstream stream %s after sequence_number %s (%s)",
                    self._label,
                    self.last_sequence,
                    failure,
                )
                return attempt, outcome

    def _abort(self, failure: str) -> t.NoReturn:
        self.failure = "aborted: " + failure
        log.warning(
            "upstream stream %s broke after %d events (last sequence_number %s): %s;"
            " aborting the client connection so the client can resume",
            self._label,
            self.events,
            self.last_sequence,
            failure,
        )
        raise StreamAborted(f"upstream stream {self._label} broke: {failure}")


def _completed_usage(event: bytes) -> tuple[dict[str, int] | None, str | None]:
    """The token usage and model of a ``response.completed`` event (parsed once per stream)."""
    try:
        response = json.loads(_data_of(event) or b"").get("response")
    except (ValueError, AttributeError):
        return None, None
    if not isinstance(response, dict):
        return None, None
    model = response.get("model")
    return usage_of(response), model if isinstance(model, str) else None


def _created_id(event: bytes) -> str | None:
    """The response id carried by a ``response.created`` event."""
    data = _data_of(event)
    try:
        response = json.loads(data or b"").get("response") or {}
    except (ValueError, AttributeError):
        return None
    value = response.get("id") if isinstance(response, dict) else None
    return value if isinstance(value, str) else None
