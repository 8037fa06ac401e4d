"""Bytes in, bytes out: the relay of one upstream event stream to one client.

The relay forwards the upstream's bytes unchanged, in whole events (everything up to and including
a blank line), each as soon as it is complete. It looks at a copy of each event only to note its
``type`` and ``sequence_number``; it never re-serialises. When it ends it reports what happened
once, as a :class:`StreamStats`. No Flask or requests imports here.
"""

from __future__ import annotations

import enum
import logging
import time
import typing as t
from dataclasses import dataclass

from ..errors import StreamAborted, UpstreamStreamInterrupted
from .responses import chunk_summary, completed_summary, created_id
from .sse import TERMINAL_TYPES, EventSplitter, EventTooLarge, data_of, parse_event
from .usage import Usage

__all__ = [
    "Dialect",
    "KEEPALIVE",
    "Control",
    "Resume",
    "Resumer",
    "StreamEnd",
    "StreamRelay",
    "StreamStats",
    "UpstreamBody",
]

log = logging.getLogger("wsgi_proxy.stream")

#: How a stream's events are read: the Responses API's, or chat completions' (see :class:`StreamRelay`).
Dialect = t.Literal["responses", "chat"]


class StreamEnd(enum.Enum):
    """How a relayed stream ended."""

    #: The upstream's stream ended and every event of it went out.
    FINISHED = "finished"
    #: The client left (the watchdog saw its socket close).
    CLIENT_GONE = "client_gone"
    #: The client stopped reading for longer than the send timeout.
    SEND_TIMEOUT = "send_timeout"
    #: The upstream broke off and the stream could not be resumed: the client connection was aborted.
    ABORTED = "aborted"


@dataclass(frozen=True, slots=True)
class StreamStats:
    """What one relay did, reported once when it ends.

    ``failure`` says why an aborted stream was aborted (a phrase for logs); ``first_event_at`` is a
    :func:`time.monotonic` reading.
    """

    end: StreamEnd
    events: int = 0
    bytes: int = 0
    resumes: int = 0
    first_event_at: float | None = None
    response_id: str | None = None
    model: str | None = None
    usage: Usage | None = None
    service_tier: str | None = None
    last_sequence: int | None = None
    terminal: str | None = None
    failure: str | None = None

    @property
    def error(self) -> str | None:
        """The request's error as the log line shows it, or None when the stream finished."""
        if self.end is StreamEnd.FINISHED:
            return None
        if self.end is StreamEnd.ABORTED:
            return f"aborted: {self.failure}"
        return str(self.end.value)


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

    def shutdown(self) -> None:
        """End the connection both ways from any thread, so that a blocked :meth:`read` returns."""
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

    def attach(self, body: UpstreamBody) -> None:
        """The body the relay reads from now on: the first, then each resumed one."""
        ...


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

#: How long a stream goes on after its terminal event before the relay ends it: long enough for
#: what may still follow (``response.failed`` after an ``error``, the ``\n`` of a CRLF split
#: across reads, the end of the body), too short for an upstream that neither ends nor speaks.
END_GRACE = 2.0
_NEVER = float("inf")


class _Quiet(enum.Enum):
    """What a wait on a silent upstream came to (see :meth:`StreamRelay._quiet`)."""

    DATA = "bytes to read"
    KEEPALIVE = "a keep-alive is due"
    END = "the grace after the terminal event is over"


class StreamRelay:
    """The WSGI iterable of one SSE response: upstream bytes in, the same bytes out, whole events.

    It yields ``b""`` first so the status line and headers go out at once, then every complete
    event as it arrives. While the upstream is silent and the client holds whole events only, it
    sends a ``: keep-alive`` comment every ``keepalive_interval`` seconds. When the upstream breaks
    off before a terminal event and a ``resumer`` is given (background streams), it re-opens the
    stream after the last event forwarded and carries on in the same response, each event exactly
    once. When it cannot, it raises :class:`StreamAborted` so the client's connection ends without a
    clean terminator and the client knows to resume. ``close()`` releases everything whether or not
    iteration began (WSGI servers call it), and ``on_close`` then gets the :class:`StreamStats`.

    :param body: the upstream body.
    :param label: names the stream in logs (the method and path).
    :param control: the client side (disconnects, send timeouts, shutdown).
    :param resumer: re-opens a broken background stream; ``None`` when it cannot be resumed.
    :param response_id: the response's id when known in advance (a retrieve).
    :param keepalive_interval: seconds of silence before a keep-alive comment (0: never).
    :param silence_limit: seconds of upstream silence after which the body counts as broken, however
        many keep-alives went out meanwhile (the upstream's read timeout; 0: none).
    :param max_event_bytes: the largest event relayed.
    :param on_response_id: called with the id of ``response.created`` (to record where it lives).
    :param on_close: called once with the stream's statistics when the relay ends, however it ends.
    :param on_forward: called with the number of events and bytes of each write (metrics).
    :param scrub: applied to each write, to remove a secret an upstream should never have echoed.
    :param dialect: ``responses`` (typed events, over at their terminal event) or ``chat`` (chat
        completions and completions: untyped ``data:`` chunks, over at ``data: [DONE]``, the usage
        in a chunk of its own).
    """

    # A worker holds one per open stream, thousands at once: without a __dict__ each is 1.4 KB smaller.
    __slots__ = (
        "_body",
        "_bytes",
        "_chat",
        "_clean_eof",
        "_control",
        "_done",
        "_end",
        "_ended_at",
        "_events",
        "_failure",
        "_first_event_at",
        "_gen",
        "_keepalive",
        "_label",
        "_last_sequence",
        "_max_event_bytes",
        "_model",
        "_on_close",
        "_on_forward",
        "_on_response_id",
        "_released",
        "_replayed_through",
        "_response_id",
        "_resumer",
        "_resumes",
        "_scrub",
        "_silence_limit",
        "_splitter",
        "_started",
        "_terminal",
        "_tier",
        "_usage",
    )

    def __init__(
        self,
        body: UpstreamBody,
        *,
        label: str,
        control: Control,
        resumer: Resumer | None = None,
        response_id: str | None = None,
        keepalive_interval: float = 0.0,
        silence_limit: float = 0.0,
        max_event_bytes: int = 64 * 1024 * 1024,
        on_response_id: t.Callable[[str], None] | None = None,
        on_close: t.Callable[[StreamStats], None] | None = None,
        on_forward: t.Callable[[int, int], None] | None = None,
        scrub: t.Callable[[bytes], bytes] | None = None,
        dialect: Dialect = "responses",
    ) -> None:
        self._body = body
        self._chat = dialect == "chat"
        self._label = label
        self._control = control
        self._resumer = resumer
        self._keepalive = keepalive_interval
        self._silence_limit = silence_limit
        self._max_event_bytes = max_event_bytes
        self._on_response_id = on_response_id
        self._on_close = on_close
        self._on_forward = on_forward
        self._scrub = scrub
        self._splitter = EventSplitter(max_event_bytes)
        self._released = False
        self._started = False
        self._done = False
        self._clean_eof = False
        # After a resume, events up to this sequence number were already forwarded: an upstream
        # that replays them anyway must not make the client see them twice.
        self._replayed_through: int | None = None
        self._end = StreamEnd.FINISHED
        self._failure: str | None = None
        self._response_id = response_id
        self._events = 0
        self._bytes = 0
        self._resumes = 0
        self._first_event_at: float | None = None
        self._model: str | None = None
        self._usage: Usage | None = None
        self._tier: str | None = None
        self._last_sequence: int | None = None
        self._terminal: str | None = None
        self._ended_at: float | None = None  # when the terminal event arrived
        control.set_resumable(resumer is not None and response_id is not None)
        control.attach(body)
        self._gen: t.Generator[bytes, None, None] = self._run()

    def __iter__(self) -> StreamRelay:
        return self

    def __next__(self) -> bytes:
        return next(self._gen)

    def stats(self) -> StreamStats:
        """What the relay has done so far (the final figures once it has ended)."""
        return StreamStats(
            end=self._end,
            events=self._events,
            bytes=self._bytes,
            resumes=self._resumes,
            first_event_at=self._first_event_at,
            response_id=self._response_id,
            model=self._model,
            usage=self._usage,
            service_tier=self._tier,
            last_sequence=self._last_sequence,
            terminal=self._terminal,
            failure=self._failure,
        )

    def close(self) -> None:
        """End the relay and release the upstream connection (idempotent)."""
        self._gen.close()
        self._release()

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._end is StreamEnd.FINISHED and self._started and not self._done:
            # Closed before the end by the server: its write to the client failed, or the watchdog
            # cut a client that stopped reading.
            reason = self._control.stop_reason()
            self._end = StreamEnd.SEND_TIMEOUT if reason == "send_timeout" else StreamEnd.CLIENT_GONE
        try:
            self._body.close()
        finally:
            self._control.cancel()
            if self._on_close is not None:
                self._on_close(self.stats())

    def _observe(self, event: bytes) -> bool:
        """Note what ``event`` says; False when it must not be forwarded (a replayed duplicate)."""
        if self._chat:
            self._observe_chunk(event)
            return True
        info = parse_event(event)
        seq = info.sequence_number
        if self._replayed_through is not None and seq is not None:
            if seq <= self._replayed_through:
                return False
            self._replayed_through = None
        if seq is not None:
            self._last_sequence = seq
        if info.type is None:
            return True
        self._events += 1
        if self._first_event_at is None:
            self._first_event_at = time.monotonic()
        if info.type in TERMINAL_TYPES:
            self._terminal = info.type
            if self._ended_at is None:
                self._ended_at = time.monotonic()
            if info.type == "response.completed":
                summary = completed_summary(event)
                self._usage, self._model, self._tier = summary.usage, summary.model, summary.service_tier
        elif info.type == "response.created" and self._response_id is None:
            self._response_id = created_id(event)
            self._control.set_resumable(self._resumer is not None and self._response_id is not None)
            if self._response_id is not None and self._on_response_id is not None:
                self._on_response_id(self._response_id)
        return True

    def _observe_chunk(self, event: bytes) -> None:
        """Note a chat completion chunk: ``[DONE]`` ends the stream, a chunk with usage counts."""
        data = data_of(event)
        if data is None:
            return
        self._events += 1
        if self._first_event_at is None:
            self._first_event_at = time.monotonic()
        if data.strip() == b"[DONE]":
            self._terminal = "[DONE]"
            if self._ended_at is None:
                self._ended_at = time.monotonic()
        elif b'"usage"' in data:
            summary = chunk_summary(data)
            if summary.usage is not None:
                self._usage, self._model, self._tier = summary.usage, summary.model, summary.service_tier
                self._response_id = summary.response_id

    def _failure_at_eof(self) -> str | None:
        if self._splitter.pending:
            return f"the upstream ended in the middle of an event ({self._splitter.pending} bytes unfinished)"
        if self._terminal is None and (self._resumer is not None or self._events):
            # Also when the transport framed the end: a Responses stream is over at its terminal event.
            return "the upstream stream ended before its terminal event"
        return None

    def _write(self, data: bytes) -> t.Generator[bytes, None, None]:
        self._bytes += len(data)
        self._control.writing(True)
        yield data
        self._control.writing(False)

    def _pump(self) -> t.Generator[bytes, None, str | None]:
        """Relay the current body to its end; return why it failed, or None for a clean end."""
        self._clean_eof = False
        heard_at = spoke_at = time.monotonic()  # the upstream's last bytes; the last bytes sent
        while True:
            try:
                # One wait per read, busy stream or quiet: it returns at once when bytes are there.
                if self._ended_at is not None or (self._keepalive and not self._splitter.pending):
                    quiet = self._quiet(heard_at, spoke_at)
                    if quiet is _Quiet.END:
                        return None
                    if quiet is _Quiet.KEEPALIVE:
                        yield from self._write(KEEPALIVE)
                        spoke_at = time.monotonic()
                        continue
                    if quiet is not _Quiet.DATA:
                        return quiet
                chunk = self._body.read()
                heard_at = spoke_at = time.monotonic()
                if not chunk:
                    self._clean_eof = True
                    return self._failure_at_eof()
                events = self._splitter.feed(chunk)
            except UpstreamStreamInterrupted as exc:
                return exc.reason
            except EventTooLarge as exc:
                return str(exc)
            if self._replayed_through is None:
                for event in events:
                    self._observe(event)
            else:  # after a resume: what the upstream replays is not forwarded twice
                events = [event for event in events if self._observe(event)]
            if events:
                data = events[0] if len(events) == 1 else b"".join(events)
                if self._scrub is not None:
                    data = self._scrub(data)
                if self._on_forward is not None:
                    self._on_forward(len(events), len(data))
                yield from self._write(data)
                del data
            # Dropped before the next wait, which may last minutes: of what was read, a quiet stream
            # keeps only its splitter's pending bytes (thousands of streams kept ~1.5 KB each).
            del chunk, events
            if self._ended_at is not None and time.monotonic() >= self._ended_at + END_GRACE:
                return None  # the response is over, and so is the grace for what may follow it

    def _quiet(self, heard_at: float, spoke_at: float) -> _Quiet | str:
        """Wait for the upstream's next bytes, at most until something else is due.

        :class:`_Quiet` says what is due (bytes to read, a keep-alive between whole events, the end of
        the grace after the terminal event); a string is a failure: the upstream was silent for
        ``silence_limit`` seconds.
        """
        due: _Quiet | str = _Quiet.KEEPALIVE
        deadline = spoke_at + self._keepalive if self._keepalive and not self._splitter.pending else _NEVER
        if self._ended_at is not None:
            if self._ended_at + END_GRACE < deadline:
                due, deadline = _Quiet.END, self._ended_at + END_GRACE
        elif self._silence_limit and heard_at + self._silence_limit < deadline:
            # Once the response is over, the grace alone decides.
            due = f"the upstream was silent for {self._silence_limit:g} s (its read timeout)"
            deadline = heard_at + self._silence_limit
        # Overdue, it still looks: bytes that are there are read before anything else is done.
        if self._body.wait(max(0.0, deadline - time.monotonic())):
            return _Quiet.DATA
        return due

    def _run(self) -> t.Generator[bytes, None, None]:
        try:
            self._started = True
            yield b""
            attempt = 0
            while True:
                events_before = self._events
                failure = yield from self._pump()
                if failure is None:
                    self._done = True
                    return
                progressed = self._events > events_before
                if progressed:
                    attempt = 0  # the last body made progress: a fresh budget of attempts
                elif self._clean_eof and self._ended_upstream():
                    self._done = True
                    return  # nothing after our last event and the response is over: a true end
                outcome = self._recover(failure, attempt)
                if outcome is None:
                    self._done = True
                    return
                if isinstance(outcome, str):
                    self._abort(outcome)
                attempt, body = outcome
                self._body.close()
                self._body = body
                self._control.attach(body)
                self._splitter = EventSplitter(self._max_event_bytes)  # a half event is dropped
                self._replayed_through = self._last_sequence
                self._resumes += 1
        finally:
            self._release()

    def _ended_upstream(self) -> bool:
        if self._resumer is None or self._response_id is None or self._control.stop_reason():
            return False
        return self._resumer.has_ended(self._response_id)

    def _recover(self, failure: str, attempt: int) -> tuple[int, UpstreamBody] | str | None:
        """After a failure: a new body (with the attempt count), a reason to abort, or None to end."""
        while True:
            reason = self._control.stop_reason()
            if reason == "client_gone":
                self._end = StreamEnd.CLIENT_GONE
                return None
            if reason == "send_timeout":
                self._end = StreamEnd.SEND_TIMEOUT
                return None
            if reason == "shutdown":
                return f"{failure}; the worker is shutting down"
            if self._resumer is None:
                return failure
            if self._response_id is None:
                return f"{failure}, before the response id was known"
            if self._events and self._last_sequence is None:
                # Without a cursor a resume would replay what the client already has.
                return f"{failure}; its events carry no sequence_number to resume after"
            attempt += 1
            if attempt > self._resumer.max_attempts:
                return f"{failure}; resuming failed {self._resumer.max_attempts} times"
            if self._control.sleep(self._resumer.backoff(attempt)):
                continue  # stopped while waiting: the reason decides
            outcome = self._resumer.reopen(self._response_id, self._last_sequence)
            if outcome is Resume.GIVE_UP:
                return f"{failure}; the upstream refused to resume it"
            if not isinstance(outcome, Resume):
                log.info(
                    "resumed upstream stream %s after sequence_number %s (%s)",
                    self._label,
                    self._last_sequence,
                    failure,
                )
                return attempt, outcome

    def _abort(self, failure: str) -> t.NoReturn:
        self._end, self._failure, self._done = StreamEnd.ABORTED, failure, True
        log.warning(
            "upstream stream %s broke after %d events (last sequence_number %s): %s;"
            " aborting the client connection so the client can resume",
            self._label,
            self._events,
            self._last_sequence,
            failure,
        )
        raise StreamAborted(f"upstream stream {self._label} broke: {failure}")
