"""The SSE splitter, the event peek and the relay, at every chunk boundary."""

from __future__ import annotations

import errno
import gc
import inspect
import itertools
import json
import re
import time
import typing as t

import pytest

from wsgi_proxy.errors import StreamAborted, UpstreamStreamInterrupted
from wsgi_proxy.wire import sse
from wsgi_proxy.wire.relay import KEEPALIVE, Resume, StreamEnd, StreamRelay, StreamStats, UpstreamBody
from wsgi_proxy.wire.sse import EventInfo, EventSplitter, EventTooLarge, parse_event

# --- helpers -----------------------------------------------------------------------------------

_LINE = re.compile(rb"([^\r\n]*)(\r\n|\r|\n)")


def _lines(event: bytes) -> list[tuple[bytes, bytes]]:
    """Split ``event`` into (content, terminator) pairs; the whole event must be made of lines."""
    lines = []
    pos = 0
    while pos < len(event):
        match = _LINE.match(event, pos)
        assert match is not None, f"unterminated line at byte {pos} of {event!r}"
        lines.append((match.group(1), match.group(2)))
        pos = match.end()
    return lines


def _is_whole_event(event: bytes) -> bool:
    """Every line terminated, exactly one blank line, and it is the last one."""
    lines = _lines(event)
    return bool(lines) and lines[-1][0] == b"" and all(content for content, _ in lines[:-1])


def _is_lone_lf(event: bytes) -> bool:
    return event == b"\n"


def _has_data(event: bytes) -> bool:
    return any(content.startswith(b"data:") for content, _ in _lines(event))


def _feed_in_pieces(data: bytes, cuts: t.Sequence[int]) -> tuple[list[bytes], EventSplitter]:
    splitter = EventSplitter()
    events: list[bytes] = []
    bounds = [0, *cuts, len(data)]
    for start, stop in itertools.pairwise(bounds):
        events += splitter.feed(data[start:stop])
    return events, splitter


def _check(data: bytes, cuts: t.Sequence[int], data_events: int) -> None:
    events, splitter = _feed_in_pieces(data, cuts)
    assert b"".join(events) == data, cuts
    for event in events:
        # A "\r" blank line that ends a read is emitted at once, so its "\n" may follow alone.
        assert _is_whole_event(event) or _is_lone_lf(event), (cuts, event)
    assert sum(_has_data(e) for e in events) == data_events, (cuts, events)
    assert splitter.pending == 0, cuts


def _event(type_: str, seq: int, **extra: t.Any) -> bytes:
    payload = json.dumps({"type": type_, "sequence_number": seq, **extra}, separators=(",", ":"))
    return f"event: {type_}\ndata: {payload}\n\n".encode()


# U+2028, U+2029 and U+0085 are line breaks to str.splitlines() (and to some JS parsers) but not to SSE.
_UNICODE = "a\u2028b\u2029c\u0085d привет"

STREAMS: list[tuple[str, bytes, int]] = [
    (
        "lf",
        b'event: response.created\ndata: {"type":"response.created","sequence_number":0}\n\n'
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
        b'"sequence_number":1,"delta":"hi"}\n\n',
        2,
    ),
    (
        "crlf",
        b'event: a\r\ndata: {"type":"a","sequence_number":0}\r\n\r\n'
        b'event: b\r\ndata: {"type":"b","sequence_number":1}\r\n\r\n',
        2,
    ),
    ("lone_cr", b'data: {"type":"a"}\r\rid: 7\rdata: {"type":"b"}\r\r', 2),
    ("mixed_terminators", b"data: 1\r\n\ndata: 2\n\r\ndata: 3\r\r\n", 3),
    ("comment", b': this is a comment\n\ndata: {"type":"a"}\n\n', 1),
    ("comment_inside_event", b"data: 1\n: note\ndata: 2\n\n", 1),
    ("keep_alive_comment", b"data: {}\n\n: keep-alive\n\n: keep-alive\n\ndata: {}\n\n", 2),
    (
        "keepalive_event",
        b'event: keepalive\ndata: {"type":"keepalive","sequence_number":0}\n\n'
        b'event: response.created\ndata: {"type":"response.created","sequence_number":1}\n\n',
        2,
    ),
    (
        "unicode_in_json",
        b'data: {"type":"d","delta":"' + _UNICODE.encode() + b'"}\n\n'
        b'data: {"type":"d","delta":"\xe2\x80\xa8\xc2\x85"}\r\n\r\n',
        2,
    ),
    ("multi_line_data", b'data: {"type":"a",\ndata: "sequence_number":3}\n\ndata:x\ndata:\ndata: y\n\n', 2),
    ("blank_line_prefixes", b"\n\r\n\r\n\ndata: {}\n\n", 1),
    ("crlf_then_lf", b"data: 1\r\n\r\ndata: 2\n\ndata: 3\n\n\ndata: 4\r\n\n", 4),
    ("fields_without_data", b"retry: 1000\n\nid: 4\n\nevent: x\ndata: 1\n\n", 1),
]

# Pairs of cuts grow quadratically: keep every sample short enough for them.
_PAIR_LIMIT = 256


@pytest.mark.parametrize(("data", "data_events"), [s[1:] for s in STREAMS], ids=[s[0] for s in STREAMS])
def test_splitter_every_single_cut_reassembles_whole_events(data: bytes, data_events: int) -> None:
    _check(data, [], data_events)
    for cut in range(1, len(data)):
        _check(data, [cut], data_events)


@pytest.mark.parametrize(("data", "data_events"), [s[1:] for s in STREAMS], ids=[s[0] for s in STREAMS])
def test_splitter_every_pair_of_cuts_reassembles_whole_events(data: bytes, data_events: int) -> None:
    assert len(data) <= _PAIR_LIMIT, "keep samples short: pairs of cuts grow quadratically"
    for cuts in itertools.combinations(range(1, len(data)), 2):
        _check(data, cuts, data_events)


def test_splitter_byte_at_a_time_reassembles_whole_events() -> None:
    for _, data, data_events in STREAMS:
        _check(data, list(range(1, len(data))), data_events)


def test_splitter_crlf_split_inside_data_line_is_not_a_blank_line() -> None:
    # iter_lines() turns this split into a false blank line and the SDK then fails on half an event.
    splitter = EventSplitter()
    assert splitter.feed(b"data: a\r") == []
    assert splitter.feed(b"\ndata: b\r\n\r\n") == [b"data: a\r\ndata: b\r\n\r\n"]
    assert splitter.pending == 0


def test_splitter_crlf_split_before_blank_line_lf_completes_event() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: a\r") == []
    assert splitter.feed(b"\n\r") == [b"data: a\r\n\r"]
    assert splitter.feed(b"\ndata: b\n\n") == [b"\n", b"data: b\n\n"]
    assert splitter.pending == 0


def test_splitter_crlf_blank_line_split_between_cr_and_lf_emits_without_waiting() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: a\r\n\r") == [b"data: a\r\n\r"]
    assert splitter.pending == 0
    assert splitter.feed(b"\n") == [b"\n"]
    assert splitter.pending == 0


def test_splitter_lone_cr_framing_splits_events() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: a\r\rdata: b\r") == [b"data: a\r\r"]
    assert splitter.feed(b"\r") == [b"data: b\r\r"]
    assert splitter.pending == 0


def test_splitter_holds_unfinished_event() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: a\n\ndata: b\n") == [b"data: a\n\n"]
    assert splitter.pending == len(b"data: b\n")


def test_splitter_four_mib_line_in_small_pieces_is_linear() -> None:
    payload = b'{"type":"response.completed","sequence_number":9,"text":"' + b"x" * (4 * 1024 * 1024) + b'"}'
    data = b"event: response.completed\ndata: " + payload + b"\n\n"
    splitter = EventSplitter()
    events: list[bytes] = []
    started = time.perf_counter()
    for start in range(0, len(data), 512):
        events += splitter.feed(data[start : start + 512])
    elapsed = time.perf_counter() - started
    # Generous: a linear splitter takes ~0.1 s here, a quadratic one ~10 s.
    assert elapsed < 2.0, f"feeding 4 MiB in 512-byte pieces took {elapsed:.1f} s"
    assert events == [data]
    assert splitter.pending == 0


@pytest.mark.parametrize(
    ("pieces", "raises"),
    [
        ([b"data: " + b"x" * 2000], True),
        ([b"data: " + b"x" * 600, b"x" * 600], True),
        ([b"data: " + b"x" * 1018], False),  # exactly 1024 bytes held: at the limit, not past it
        ([b"data: " + b"x" * 2000 + b"\n\n"], False),  # complete in one read: nothing held
        ([b"data: 1\n\n" * 300], False),  # many small events in one read
    ],
    ids=["one_read", "two_reads", "at_limit", "complete_large_event", "many_small_events"],
)
def test_splitter_max_event_bytes(pieces: list[bytes], raises: bool) -> None:
    splitter = EventSplitter(max_event_bytes=1024)
    if raises:
        with pytest.raises(EventTooLarge, match="1024"):
            for piece in pieces:
                splitter.feed(piece)
    else:
        for piece in pieces:
            splitter.feed(piece)


# --- parse_event -------------------------------------------------------------------------------

_BIG = "y" * (3 * 1024 * 1024)


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (_event("response.created", 0, response={"id": "resp_1"}), EventInfo("response.created", 0)),
        (b'data: {"type":"a","sequence_number":12}\r\n\r\n', EventInfo("a", 12)),
        (b'data:{"type":"a","sequence_number":1}\n\n', EventInfo("a", 1)),
        (b'data: {"type":"keepalive","sequence_number":466}\n\n', EventInfo("keepalive", 466)),
        (b": keep-alive\n\n", EventInfo(None, None)),
        (b": comment\ndata: \n\n", EventInfo(None, None)),
        (b"\n", EventInfo(None, None)),
        (b"event: x\n\n", EventInfo(None, None)),
        (b"data: [DONE]\n\n", EventInfo(None, None)),
        (b"data: [1, 2]\n\n", EventInfo(None, None)),
        (b'data: {"type":"a"}\n\n', EventInfo("a", None)),
        (b'data: {"sequence_number":2,"type":"b"}\n\n', EventInfo("b", 2)),
        (b'data: {"type":5,"sequence_number":2}\n\n', EventInfo(None, 2)),
        (b'data: {"type":"a","sequence_number":true}\n\n', EventInfo("a", None)),
        (b'data: {"type":"a","sequence_number":"3"}\n\n', EventInfo("a", None)),
        # A nested sequence_number comes first: the fast path must not take it.
        (
            b'data: {"type":"response.output_item.done","item":{"sequence_number":99},"sequence_number":7}\n\n',
            EventInfo("response.output_item.done", 7),
        ),
        (b'data: {"type":"a","item":{"sequence_number":99}}\n\n', EventInfo("a", None)),
        (b'data: {"type":"a",\ndata: "sequence_number":4}\n\n', EventInfo("a", 4)),
        (b'event: a\rdata: {"type":"a","sequence_number":4}\r\r', EventInfo("a", 4)),
        # The event line ends at its "\r": the data line after it is the first one, not a later one.
        (
            b'event: x\rdata: {"type":"a","sequence_number":1}\ndata: {"type":"b","sequence_number":2}\n\n',
            EventInfo("a", 1),
        ),
        (b'data: {"type":"a" ,"sequence_number":4}\n\n', EventInfo("a", 4)),
        (
            b'data: {"type":"d","sequence_number":5,"delta":"' + _UNICODE.encode() + b'"}\n\n',
            EventInfo("d", 5),
        ),
        (
            b'data: {"type":"response.completed","sequence_number":9,"t":"' + _BIG.encode() + b'"}\n\n',
            EventInfo("response.completed", 9),
        ),
        (
            b'data: {"t":"' + _BIG.encode() + b'","type":"response.completed","sequence_number":10}\n\n',
            EventInfo("response.completed", 10),
        ),
    ],
    ids=[
        "sdk_event",
        "crlf",
        "no_space",
        "keepalive",
        "comment",
        "comment_empty_data",
        "lone_lf",
        "event_without_data",
        "not_json",
        "json_array",
        "no_sequence",
        "sequence_first",
        "non_string_type",
        "bool_sequence",
        "string_sequence",
        "nested_sequence_first",
        "only_nested_sequence",
        "multi_line_data",
        "lone_cr_lines",
        "event_line_ended_by_cr",
        "spaced_json",
        "unicode",
        "multi_mib_head",
        "multi_mib_tail",
    ],
)
def test_parse_event_extracts_type_and_sequence(event: bytes, expected: EventInfo) -> None:
    assert parse_event(event) == expected


@pytest.mark.parametrize(
    "event",
    [
        _event("response.output_text.delta", 3, delta="hi"),
        b'data: {"a":1}\n\n',
        b'data:{"a":1}\n\n',
        b"data:\n\n",
        b"data:  two spaces\n\n",
        b"id: 7\nevent: x\ndata: v\n\n",
        b"data: a\ndata: b\n\n",
        b"data: a\nevent: x\ndata: b\n\n",
        b": data: in a comment\ndata: v\n\n",
        b"event: mydata:x\ndata: v\n\n",
        b"event: x\n: not data\n\n",
        b"data: v\r\n\r\n",
        b"data: v\rdata: w\r\r",
        b"data: v",
        b"xdata: v\n\n",
        b'data: {"s":"data: inside"}\n\n',
    ],
)
def test_data_fast_path_agrees_with_the_line_by_line_reading(event: bytes) -> None:
    assert sse.data_of(event) == sse._data_by_lines(event)


# --- StreamRelay -------------------------------------------------------------------------------


#: Queued in a FakeBody: the upstream stays silent for one keep-alive interval.
SILENCE = object()
#: Queued in a FakeBody: nothing is there yet, and the next item arrives during a wait.
LATER = object()


class FakeBody:
    """An upstream body that returns queued chunks, raises queued errors, then ends (``b""``)."""

    def __init__(self, items: t.Iterable[bytes | Exception | object], *, framed: bool = True) -> None:
        self.framed = framed
        self._items = list(items)
        self.reads = 0
        self.waits = 0
        self.closes = 0

    def wait(self, timeout: float) -> bool:
        self.waits += 1
        if self._items and self._items[0] in (SILENCE, LATER):
            if timeout <= 0:  # a zero wait only looks
                return False
            return self._items.pop(0) is LATER  # a silence lasts the whole interval
        return True

    def read(self) -> bytes:
        self.reads += 1
        while self._items and self._items[0] in (SILENCE, LATER):  # a read without wait() blocks on
            self._items.pop(0)
        if not self._items:
            return b""
        item = self._items.pop(0)
        if isinstance(item, Exception):
            raise item
        assert isinstance(item, bytes)
        return item

    def shutdown(self) -> None:
        raise AssertionError("only the watchdog shuts a body down")

    def close(self) -> None:
        self.closes += 1


class FakeControl:
    """Stands in for the watchdog's Watch: a settable stop reason, and counters."""

    def __init__(self, reason: str | None = None) -> None:
        self.reason = reason
        self.calls = 0  # cancel() calls
        self.resumable = False
        self.sleeps: list[float] = []
        self.bodies: list[object] = []  # attached, in order

    def stop_reason(self) -> str | None:
        return self.reason

    def attach(self, body: UpstreamBody) -> None:
        self.bodies.append(body)

    def writing(self, active: bool) -> None:
        pass

    def set_resumable(self, resumable: bool) -> None:
        self.resumable = resumable

    def sleep(self, seconds: float) -> bool:
        self.sleeps.append(seconds)
        return self.reason is not None

    def cancel(self) -> None:
        self.calls += 1


CREATED = _event("response.created", 0)
DELTA = _event("response.output_text.delta", 1, delta="hé")
COMPLETED = _event("response.completed", 2)


def _relay(
    body: FakeBody, control: FakeControl | None = None, **kwargs: t.Any
) -> tuple[StreamRelay, FakeControl]:
    control = control or FakeControl()
    return StreamRelay(body, label="test", control=control, **kwargs), control


def test_a_waiting_relay_keeps_none_of_the_bytes_it_read() -> None:
    """Thousands of quiet streams wait at once: the last read of each is not kept while it waits."""
    read = bytes(bytearray(DELTA))  # an object of its own, read once
    holders: list[list[str]] = []

    class Watched(FakeBody):
        def wait(self, timeout: float) -> bool:
            if self.reads == 2:  # the wait after the read of ``read``
                # A suspended generator's frame is the generator's, found as the generator.
                holding = [r for r in gc.get_referrers(read) if inspect.isgenerator(r)]
                holders.append([generator.gi_code.co_name for generator in holding])
            return super().wait(timeout)

    relay, _ = _relay(Watched([CREATED, read, COMPLETED]), keepalive_interval=10)
    assert b"".join(relay) == CREATED + DELTA + COMPLETED
    assert len(holders) == 1 and not {"_pump", "_write"} & set(holders[0]), holders


def test_relay_first_item_is_empty_bytes() -> None:
    body = FakeBody([CREATED, COMPLETED])
    relay, _ = _relay(body)
    assert next(relay) == b""
    assert body.reads == 0


@pytest.mark.parametrize(
    "chunks",
    [
        [CREATED + DELTA + COMPLETED],
        [CREATED, DELTA, COMPLETED],
        [CREATED[:5], CREATED[5:] + DELTA[:-1], DELTA[-1:] + COMPLETED],
        [bytes([b]) for b in CREATED + DELTA + COMPLETED],
        [b": keep-alive\n\n", CREATED.replace(b"\n", b"\r\n"), COMPLETED],
    ],
    ids=["one_chunk", "event_per_chunk", "ragged", "byte_per_chunk", "comments_and_crlf"],
)
def test_relay_bytes_out_equal_bytes_in(chunks: list[bytes]) -> None:
    body = FakeBody(chunks)
    relay, on_close = _relay(body)
    out = list(relay)
    assert out[0] == b""
    assert b"".join(out) == b"".join(chunks)
    assert all(_is_whole_event(e) for item in out[1:] for e in EventSplitter().feed(item))
    assert body.closes == 1
    assert on_close.calls == 1


def test_relay_holds_half_event_until_completed() -> None:
    body = FakeBody([CREATED[:20], CREATED[20:] + DELTA[:10], DELTA[10:], COMPLETED])
    relay, _ = _relay(body)
    assert next(relay) == b""
    assert next(relay) == CREATED
    assert body.reads == 2  # the first chunk alone produced nothing
    assert next(relay) == DELTA
    assert body.reads == 3


def test_relay_tracks_last_sequence_and_terminal() -> None:
    body = FakeBody([CREATED, b": keep-alive\n\n", DELTA])
    relay, _ = _relay(body)
    next(relay)
    next(relay)
    assert (relay.stats().last_sequence, relay.stats().terminal, relay.stats().events) == (0, None, 1)
    with pytest.raises(StreamAborted):  # it ended before its terminal event
        list(relay)
    assert (relay.stats().last_sequence, relay.stats().terminal, relay.stats().events) == (1, None, 2)

    body = FakeBody([CREATED, DELTA, COMPLETED])
    relay, _ = _relay(body)
    list(relay)
    assert (relay.stats().last_sequence, relay.stats().terminal, relay.stats().events) == (
        2,
        "response.completed",
        3,
    )


def test_relay_interruption_after_events_aborts_and_closes_once() -> None:
    body = FakeBody([CREATED, DELTA, UpstreamStreamInterrupted("reset by peer")])
    relay, on_close = _relay(body)
    got: list[bytes] = []
    with pytest.raises(StreamAborted, match="reset by peer") as info:
        for item in relay:
            got.append(item)
    assert isinstance(info.value, ConnectionResetError)
    assert info.value.errno == errno.ECONNRESET  # what makes gunicorn close quietly, without a traceback
    assert b"".join(got) == CREATED + DELTA
    assert relay.stats().last_sequence == 1
    assert (body.closes, on_close.calls) == (1, 1)
    relay.close()  # the WSGI server calls close() afterwards
    assert (body.closes, on_close.calls) == (1, 1)


def test_relay_interruption_when_client_gone_ends_quietly() -> None:
    body = FakeBody([CREATED, UpstreamStreamInterrupted("shut down by the watchdog")])
    relay, on_close = _relay(body, FakeControl(reason="client_gone"))
    assert b"".join(relay) == CREATED
    assert (body.closes, on_close.calls) == (1, 1)


@pytest.mark.parametrize(
    ("chunks", "framed", "aborts"),
    [
        ([CREATED, DELTA], False, True),  # close-delimited cut looks like an end: it is not one
        ([CREATED, DELTA, COMPLETED], False, False),
        ([_event("response.failed", 2)], False, False),
        ([_event("error", 0)], False, False),
        ([CREATED, DELTA], True, True),  # framed or not, a stream without its terminal event was cut
        ([b": keep-alive\n\n"], False, False),
        ([], False, False),
        ([CREATED, DELTA[:-1]], True, True),  # EOF inside an event
        ([CREATED, DELTA[:-1]], False, True),
    ],
    ids=[
        "close_delimited_no_terminal",
        "close_delimited_completed",
        "close_delimited_failed",
        "close_delimited_error",
        "framed_no_terminal",
        "close_delimited_only_comments",
        "empty",
        "framed_partial_event",
        "close_delimited_partial_event",
    ],
)
def test_relay_end_of_body(chunks: list[bytes], framed: bool, aborts: bool) -> None:
    body = FakeBody(chunks, framed=framed)
    relay, on_close = _relay(body)
    if aborts:
        with pytest.raises(StreamAborted):
            list(relay)
    else:
        assert b"".join(relay) == b"".join(chunks)
    assert (body.closes, on_close.calls) == (1, 1)


def test_relay_ends_at_the_terminal_event_whatever_follows() -> None:
    # An upstream that sends its terminal event and then stays silent, or sends more, is over.
    body = FakeBody([CREATED, COMPLETED + b"data: {", SILENCE, DELTA])
    relay, on_close = _relay(body, keepalive_interval=15.0)
    assert b"".join(relay) == CREATED + COMPLETED
    assert body.reads == 2 and (body.closes, on_close.calls) == (1, 1)
    assert relay.stats().end is StreamEnd.FINISHED


def test_relay_after_an_error_event_ends_instead_of_waiting() -> None:
    error = _event("error", 1)
    body = FakeBody([CREATED, error, SILENCE, SILENCE])
    relay, _ = _relay(body, keepalive_interval=15.0)
    assert b"".join(relay) == CREATED + error
    assert relay.stats().terminal == "error"


def test_relay_event_too_large_aborts() -> None:
    body = FakeBody([CREATED, b"data: " + b"x" * 4096])
    relay, on_close = _relay(body, max_event_bytes=1024)
    with pytest.raises(StreamAborted, match="exceeded 1024 bytes"):
        list(relay)
    assert (body.closes, on_close.calls) == (1, 1)


def test_relay_close_before_iteration_releases_body_once() -> None:
    body = FakeBody([CREATED])
    relay, on_close = _relay(body)
    relay.close()
    assert (body.closes, on_close.calls, body.reads) == (1, 1, 0)
    relay.close()
    assert (body.closes, on_close.calls) == (1, 1)
    assert list(relay) == []


def test_relay_close_mid_stream_releases_body_once() -> None:
    body = FakeBody([CREATED, DELTA, COMPLETED])
    relay, on_close = _relay(body)
    next(relay)
    next(relay)
    relay.close()
    assert (body.closes, on_close.calls) == (1, 1)


# --- keep-alives and transparent resume ------------------------------------------------------------


def test_relay_sends_keepalive_comment_during_silence_at_event_boundaries_only() -> None:
    half = DELTA[:10]
    body = FakeBody([CREATED, SILENCE, half, SILENCE, DELTA[10:], COMPLETED])
    relay, _ = _relay(body, keepalive_interval=15.0)
    out = list(relay)
    assert out == [b"", CREATED, KEEPALIVE, DELTA, COMPLETED]  # no keep-alive inside the half event


def test_relay_waits_once_per_read_on_a_quiet_stream() -> None:
    # Each wait lets go of the GIL, which thousands of threads in a worker must then win back.
    body = FakeBody([CREATED, LATER, DELTA, LATER, DELTA, LATER, COMPLETED])
    relay, _ = _relay(body, keepalive_interval=15.0)
    assert list(relay) == [b"", CREATED, DELTA, DELTA, COMPLETED]
    assert body.waits == body.reads == 4 + 1  # the four events, then the end of the body


def test_relay_without_keepalive_interval_never_sends_one() -> None:
    body = FakeBody([CREATED, SILENCE, COMPLETED])
    relay, _ = _relay(body)
    assert KEEPALIVE not in list(relay)


class FakeResumer:
    """Hands out queued outcomes for reopen(); records what it was asked."""

    max_attempts = 3

    def __init__(self, outcomes: list[t.Any], *, ended: bool = False) -> None:
        self.outcomes = outcomes
        self.asked: list[tuple[str, int | None]] = []
        self.ended = ended

    def backoff(self, attempt: int) -> float:
        return 0.01 * attempt

    def reopen(self, response_id: str, after: int | None) -> t.Any:
        self.asked.append((response_id, after))
        return self.outcomes.pop(0)

    def has_ended(self, response_id: str) -> bool:
        return self.ended


CREATED_WITH_ID = (
    b'event: response.created\ndata: {"type":"response.created","sequence_number":0,'
    b'"response":{"id":"resp_abc","status":"queued","background":true}}\n\n'
)
CUT = UpstreamStreamInterrupted("the upstream connection failed (ProtocolError)")


def test_relay_resumes_after_a_cut_from_the_last_whole_event() -> None:
    first = FakeBody([CREATED_WITH_ID, DELTA, DELTA[:12], CUT])  # a half event, then the cut
    second = FakeBody([_event("response.output_text.delta", 2), _event("response.completed", 3)])
    resumer = FakeResumer([second])
    relay, control = _relay(first, resumer=resumer)
    out = b"".join(relay)
    assert resumer.asked == [("resp_abc", 1)]
    assert out == CREATED_WITH_ID + DELTA + _event("response.output_text.delta", 2) + _event(
        "response.completed", 3
    )
    assert (relay.stats().resumes, relay.stats().terminal, control.resumable) == (
        1,
        "response.completed",
        True,
    )
    assert (first.closes, second.closes, control.calls) == (1, 1, 1)
    assert control.bodies == [first, second]  # a client leaving now shuts the resumed body down


def test_relay_resume_retries_transient_failures_then_gives_up() -> None:
    body = FakeBody([CREATED_WITH_ID, CUT])
    resumer = FakeResumer([Resume.RETRY, Resume.RETRY, Resume.RETRY])
    relay, control = _relay(body, resumer=resumer)
    with pytest.raises(StreamAborted, match="resuming failed 3 times"):
        list(relay)
    assert len(resumer.asked) == 3
    assert control.sleeps == [0.01, 0.02, 0.03]


def test_relay_resume_gives_up_at_once_on_a_permanent_refusal() -> None:
    relay, _ = _relay(FakeBody([CREATED_WITH_ID, CUT]), resumer=FakeResumer([Resume.GIVE_UP]))
    with pytest.raises(StreamAborted, match="refused"):
        list(relay)


def test_relay_progress_renews_the_attempt_budget() -> None:
    # Every body delivers one event and is cut: far more breaks than max_attempts, yet it completes.
    bodies = [FakeBody([_event("response.output_text.delta", n), CUT]) for n in range(1, 10)]
    bodies.append(FakeBody([_event("response.completed", 10)]))
    resumer = FakeResumer([*bodies])
    relay, _ = _relay(FakeBody([CREATED_WITH_ID, CUT]), resumer=resumer)
    out = list(relay)
    assert relay.stats().resumes == 10
    assert [after for _, after in resumer.asked] == list(range(10))
    assert out[-1] == _event("response.completed", 10)


def test_relay_cannot_resume_before_the_response_id_is_known() -> None:
    relay, _ = _relay(FakeBody([CUT]), resumer=FakeResumer([]))
    with pytest.raises(StreamAborted, match="before the response id was known"):
        list(relay)


def test_relay_on_worker_shutdown_aborts_instead_of_resuming() -> None:
    resumer = FakeResumer([])
    relay, _ = _relay(FakeBody([CREATED_WITH_ID, CUT]), FakeControl(reason="shutdown"), resumer=resumer)
    with pytest.raises(StreamAborted, match="shutting down"):
        list(relay)
    assert resumer.asked == []


def test_relay_clean_end_without_terminal_resumes_and_ends_when_nothing_is_left() -> None:
    # The stream ends cleanly but early; the replay after it brings nothing and the response is over.
    resumer = FakeResumer([FakeBody([])], ended=True)
    relay, _ = _relay(FakeBody([CREATED_WITH_ID, DELTA]), resumer=resumer)
    assert b"".join(relay) == CREATED_WITH_ID + DELTA
    assert resumer.asked == [("resp_abc", 1)]


def test_relay_empty_retrieve_past_the_end_is_a_clean_end() -> None:
    resumer = FakeResumer([], ended=True)
    relay, _ = _relay(FakeBody([]), resumer=resumer, response_id="resp_abc")
    assert list(relay) == [b""]
    assert resumer.asked == []


def test_relay_event_too_large_after_a_clean_resume_is_not_taken_for_the_end() -> None:
    # The first body ends cleanly but early; the resumed one brings an event over the limit. That
    # is a failure to report, not a finished response, even though the upstream says it is over.
    big = b"data: " + b"x" * 2048
    resumer = FakeResumer([FakeBody([big]), Resume.GIVE_UP], ended=True)
    relay, _ = _relay(FakeBody([CREATED_WITH_ID, DELTA]), resumer=resumer, max_event_bytes=1024)
    with pytest.raises(StreamAborted, match="refused"):
        list(relay)


# --- failures that must never pass for a clean end --------------------------------------------------


class SlowBody(FakeBody):
    """A FakeBody whose silences really last: wait() sleeps its whole timeout."""

    def wait(self, timeout: float) -> bool:
        if self._items and self._items[0] is SILENCE:
            time.sleep(timeout)
            return False
        return True


def test_a_silent_upstream_is_cut_at_its_read_timeout_despite_keepalives() -> None:
    body = SlowBody([CREATED, *[SILENCE] * 100, DELTA])
    relay, _ = _relay(body, keepalive_interval=0.02, silence_limit=0.1)
    out: list[bytes] = []
    started = time.monotonic()
    with pytest.raises(StreamAborted, match="silent for 0.1 s"):
        for item in relay:
            out.append(item)
    assert time.monotonic() - started < 1.0
    assert out[:2] == [b"", CREATED] and set(out[2:]) == {KEEPALIVE}
    assert 3 <= len(out[2:]) <= 5  # keep-alives every 0.02 s until the 0.1 s limit


def test_a_silent_background_stream_is_resumed_then_aborted() -> None:
    silent = [FakeBody([SILENCE]) for _ in range(3)]
    resumer = FakeResumer([*silent])
    body = SlowBody([CREATED_WITH_ID, SILENCE, SILENCE])
    relay, _ = _relay(body, keepalive_interval=0.02, silence_limit=0.05, resumer=resumer)
    with pytest.raises(StreamAborted, match="resuming failed 3 times"):
        list(relay)
    assert [after for _, after in resumer.asked] == [0, 0, 0]


def test_events_without_sequence_numbers_are_never_resumed() -> None:
    bare = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"x"}\n\n'
    created = b'data: {"type":"response.created","response":{"id":"resp_abc"}}\n\n'
    resumer = FakeResumer([FakeBody([created, bare, COMPLETED])])
    relay, _ = _relay(FakeBody([created, bare, CUT]), resumer=resumer)
    with pytest.raises(StreamAborted, match="no sequence_number"):
        list(relay)
    assert resumer.asked == []


def test_events_a_resumed_upstream_replays_are_not_forwarded_twice() -> None:
    # An upstream that ignores starting_after replays from the start: the client gets each event once.
    replay = FakeBody(
        [CREATED_WITH_ID, DELTA, _event("response.output_text.delta", 2), _event("response.completed", 3)]
    )
    relay, _ = _relay(FakeBody([CREATED_WITH_ID, DELTA, CUT]), resumer=FakeResumer([replay]))
    out = b"".join(relay)
    assert out == CREATED_WITH_ID + DELTA + _event("response.output_text.delta", 2) + _event(
        "response.completed", 3
    )
    assert relay.stats().events == 4


def test_a_replay_that_brings_nothing_new_uses_up_the_attempts() -> None:
    replays = [FakeBody([CREATED_WITH_ID, DELTA, CUT]) for _ in range(3)]
    relay, _ = _relay(FakeBody([CREATED_WITH_ID, DELTA, CUT]), resumer=FakeResumer([*replays]))
    with pytest.raises(StreamAborted, match="resuming failed 3 times"):
        list(relay)


@pytest.mark.parametrize(
    ("reason", "end"),
    [
        (None, StreamEnd.CLIENT_GONE),
        ("client_gone", StreamEnd.CLIENT_GONE),
        ("send_timeout", StreamEnd.SEND_TIMEOUT),
    ],
)
def test_a_relay_closed_by_the_server_mid_stream_reports_why(reason: str | None, end: StreamEnd) -> None:
    stats: list[StreamStats] = []
    relay, _ = _relay(
        FakeBody([CREATED, DELTA, COMPLETED]), FakeControl(reason=reason), on_close=stats.append
    )
    next(relay)
    next(relay)
    relay.close()  # what gunicorn does when a write to the client fails
    (final,) = stats
    assert final.end is end and final.error == end.value


def test_a_relay_read_to_its_end_is_finished() -> None:
    stats: list[StreamStats] = []
    relay, _ = _relay(FakeBody([CREATED, DELTA, COMPLETED]), on_close=stats.append)
    list(relay)
    relay.close()
    assert stats[0].end is StreamEnd.FINISHED and stats[0].error is None


@pytest.mark.parametrize("hostile", ["../models", "resp_1?x=1", "resp 1", "a/b", "resp_\r\nX: 1", "x" * 129])
def test_an_unsafe_id_from_response_created_never_reaches_a_resume_url(hostile: str) -> None:
    created = (
        b'data: {"type":"response.created","sequence_number":0,"response":{"id":'
        + json.dumps(hostile).encode()
        + b"}}\n\n"
    )
    resumer = FakeResumer([])
    remembered: list[str] = []
    relay, _ = _relay(FakeBody([created, CUT]), resumer=resumer, on_response_id=remembered.append)
    with pytest.raises(StreamAborted, match="before the response id was known"):
        list(relay)
    assert resumer.asked == [] and remembered == []  # neither resumed with it nor recorded
