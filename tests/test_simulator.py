"""Tests for the fake OpenAI Responses upstream in ``wsgi_proxy.simulator``.

The official SDK checks what clients see; raw sockets check the bytes where framing matters.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import typing as t
import zlib

import openai
import pytest
import requests
from openai import OpenAI

from wsgi_proxy.simulator import Simulator, SimulatorConfig
from wsgi_proxy.simulator.config import FaultError, Faults, parse_faults
from wsgi_proxy.simulator.events import delta_texts
from wsgi_proxy.simulator.framing import split_frame
from wsgi_proxy.simulator.store import ResponseRecord, Store
from wsgi_proxy.wire.sse import EventSplitter, parse_event

TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 4,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


@pytest.fixture
def sim() -> t.Iterator[Simulator]:
    with Simulator(config=SimulatorConfig(delay_ms=1, words=4)) as simulator:
        yield simulator


@pytest.fixture
def client(sim: Simulator) -> t.Iterator[OpenAI]:
    with OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0, timeout=10) as sdk:
        yield sdk


def wait_for(predicate: t.Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


# -- raw HTTP helpers ---------------------------------------------------------------------------------


_raw_sockets: list[socket.socket] = []


@pytest.fixture(autouse=True)
def close_raw_sockets() -> t.Iterator[None]:
    yield
    while _raw_sockets:
        _raw_sockets.pop().close()


class Raw:
    """A hand-driven HTTP/1.1 exchange that keeps chunk boundaries visible (closed after each test)."""

    def __init__(self, sim: Simulator, method: str, target: str, body: object = None, **headers: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", sim.port), timeout=10)
        _raw_sockets.append(self.sock)
        payload = b"" if body is None else json.dumps(body).encode()
        lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{sim.port}", "Connection: close"]
        lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        self.buf = b""
        head = self._until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        self.status = int(head[0].split()[1])
        self.headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def _until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            if not self._fill():
                raise EOFError("connection closed")
        out, _, self.buf = self.buf.partition(marker)
        return out

    def _exact(self, size: int) -> bytes:
        while len(self.buf) < size:
            if not self._fill():
                raise EOFError("connection closed")
        out, self.buf = self.buf[:size], self.buf[size:]
        return out

    def chunk(self) -> bytes | None:
        """The next chunk's data, ``None`` at the last chunk; EOFError when the body was cut."""
        size = int(self._until(b"\r\n"), 16)
        if size == 0:
            self._until(b"\r\n")
            return None
        data = self._exact(size)
        assert self._exact(2) == b"\r\n"
        return data

    def chunks(self) -> list[bytes]:
        out = []
        while (data := self.chunk()) is not None:
            out.append(data)
        return out

    def to_eof(self) -> bytes:
        while self._fill():
            pass
        data, self.buf = self.buf, b""
        return data

    def body(self) -> bytes:
        if self.headers.get("transfer-encoding") == "chunked":
            return b"".join(self.chunks())
        if "content-length" in self.headers:
            return self._exact(int(self.headers["content-length"]))
        return self.to_eof()

    def close(self) -> None:
        self.sock.close()


def parse_sse(body: bytes, nl: bytes = b"\n") -> list[tuple[str, dict[str, t.Any]]]:
    events = []
    for block in body.split(nl + nl):
        if not block or block.startswith(b":"):
            continue
        lines = block.split(nl)
        assert lines[0].startswith(b"event: ") and lines[1].startswith(b"data: "), block
        assert len(lines) == 2
        events.append((lines[0][7:].decode(), json.loads(lines[1][6:])))
    return events


def create_body(**extra: t.Any) -> dict[str, t.Any]:
    return {"model": "gpt-4o-mini", "input": "alpha beta gamma", **extra}


def assert_gap_free(events: t.Sequence[t.Any], start: int = 0) -> None:
    numbers = [e["sequence_number"] if isinstance(e, dict) else e.sequence_number for e in events]
    assert numbers == list(range(start, start + len(numbers)))


def assert_error(resp: requests.Response, status: int, param: str | None, message: str | None = None) -> None:
    assert resp.status_code == status
    assert resp.headers["x-request-id"].startswith("req_")
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    if message is not None:
        assert error["message"] == message


# -- responses ----------------------------------------------------------------------------------------


def test_create_json_returns_completed_response(client: OpenAI) -> None:
    raw = client.responses.with_raw_response.create(model="gpt-4o-mini", input="alpha beta gamma")
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.headers["openai-version"] == "2020-10-01"
    assert "openai-processing-ms" in raw.headers
    response = raw.parse()
    assert re.fullmatch(r"resp_[0-9a-f]{48}", response.id)
    assert response.status == "completed"
    assert response.output_text == "alpha beta gamma alpha"
    assert response.usage is not None and response.usage.output_tokens == 4
    assert client.responses.retrieve(response.id).output_text == "alpha beta gamma alpha"


def test_create_stream_order_sequence_and_text(client: OpenAI) -> None:
    events = list(client.responses.create(model="gpt-4o-mini", input="alpha beta gamma", stream=True))
    assert [e.type for e in events] == TEXT_EVENTS
    assert_gap_free(events)
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert all(getattr(e, "obfuscation", None) for e in deltas)
    text = "".join(e.delta for e in deltas)
    assert text == "alpha beta gamma alpha"
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.output_text == text
    assert completed.response.background is False


def test_stream_wire_format_is_compact_chunked_sse(sim: Simulator) -> None:
    raw = Raw(sim, "POST", "/v1/responses", create_body(stream=True))
    assert raw.status == 200
    assert raw.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert raw.headers["transfer-encoding"] == "chunked"
    assert raw.headers["x-request-id"].startswith("req_")
    chunks = raw.chunks()
    assert all(c.endswith(b"\n\n") for c in chunks), "one flushed chunk per event"
    body = b"".join(chunks)
    assert b"[DONE]" not in body and b"\nid:" not in body
    events = parse_sse(body)
    for name, data in events:
        assert name == data["type"]
    assert body.startswith(b'event: response.created\ndata: {"type":"response.created","sequence_number":0,')
    for line in body.split(b"\n"):
        if line.startswith(b"data: "):
            compact = json.dumps(json.loads(line[6:]), separators=(",", ":"), ensure_ascii=False)
            assert line[6:] == compact.encode()


def test_stream_options_can_disable_obfuscation(client: OpenAI) -> None:
    events = list(
        client.responses.create(
            model="gpt-4o-mini", input="x", stream=True, stream_options={"include_obfuscation": False}
        )
    )
    assert all(getattr(e, "obfuscation", None) is None for e in events if e.type.endswith(".delta"))


def test_background_create_returns_queued_then_completes(client: OpenAI) -> None:
    created = client.responses.create(model="gpt-4o-mini", input="alpha", background=True)
    assert created.status == "queued" and created.background is True
    wait_for(lambda: client.responses.retrieve(created.id).status == "completed")
    assert client.responses.retrieve(created.id).output_text == "alpha alpha alpha alpha"


def test_background_stream_resume_gives_exactly_the_rest(client: OpenAI) -> None:
    stream = client.responses.create(model="gpt-4o-mini", input="alpha beta", background=True, stream=True)
    head = []
    for event in stream:
        head.append(event)
        if len(head) == 5:
            break
    stream.close()
    assert head[0].type == "response.created" and head[0].response.status == "queued"
    assert head[1].type == "response.queued"
    rest = list(client.responses.retrieve(head[0].response.id, stream=True, starting_after=4))
    events = head + rest
    assert_gap_free(events)
    assert [e.type for e in events] == [TEXT_EVENTS[0], "response.queued", *TEXT_EVENTS[1:]]
    assert (
        "".join(t.cast(str, e.delta) for e in events if e.type.endswith(".delta")) == "alpha beta alpha beta"
    )


def test_stream_helper_replays_from_zero(sim: Simulator, client: OpenAI) -> None:
    created = client.responses.create(model="gpt-4o-mini", input="alpha", background=True, stream=True)
    response_id = next(iter(created)).response.id
    created.close()
    with client.responses.stream(response_id=response_id, starting_after=3) as stream:
        seen = [e.sequence_number for e in stream]
        final = stream.get_final_response()
    assert final.output_text == "alpha alpha alpha alpha"
    assert seen[0] == 4
    assert sim.requests[-1].query == "stream=true"


def test_resume_past_the_end_is_an_empty_stream(sim: Simulator, client: OpenAI) -> None:
    events = list(client.responses.create(model="gpt-4o-mini", input="a", background=True, stream=True))
    last = events[-1].sequence_number
    raw = Raw(sim, "GET", f"/v1/responses/{events[0].response.id}?stream=true&starting_after={last}")
    assert raw.status == 200 and raw.chunks() == []
    assert list(client.responses.retrieve(events[0].response.id, stream=True, starting_after=last + 5)) == []


def test_retrieve_json_of_stored_stream_and_unstored_response(client: OpenAI) -> None:
    events = list(client.responses.create(model="gpt-4o-mini", input="a", stream=True))
    assert client.responses.retrieve(events[0].response.id).status == "completed"
    unstored = client.responses.create(model="gpt-4o-mini", input="a", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


class TestCancel:
    def test_cancel_ends_active_stream_with_failed_cancelled(self, client: OpenAI) -> None:
        stream = client.responses.create(
            model="gpt-4o-mini", input="a", background=True, stream=True, metadata={"sim_delay_ms": "50"}
        )
        events = iter(stream)
        response_id = next(events).response.id
        cancelled = client.responses.cancel(response_id)
        assert cancelled.status == "cancelled" and cancelled.output == []
        rest = list(events)
        assert rest[-1].type == "response.failed" and rest[-1].response.status == "cancelled"
        assert_gap_free(rest, start=1)
        assert client.responses.retrieve(response_id).status == "cancelled"
        assert client.responses.cancel(response_id).status == "cancelled"
        replay = list(client.responses.retrieve(response_id, stream=True))
        assert replay[-1].type == "response.failed"

    def test_cancel_mode_continue_keeps_generating(self, client: OpenAI) -> None:
        stream = client.responses.create(
            model="gpt-4o-mini",
            input="a",
            background=True,
            stream=True,
            metadata={"sim_delay_ms": "20", "sim_cancel_mode": "continue"},
        )
        events = iter(stream)
        response_id = next(events).response.id
        assert client.responses.cancel(response_id).status == "cancelled"
        assert list(events)[-1].type == "response.completed"
        assert client.responses.retrieve(response_id).status == "completed"

    def test_cancel_refusals(self, client: OpenAI) -> None:
        done = client.responses.create(model="gpt-4o-mini", input="a", background=True)
        wait_for(lambda: client.responses.retrieve(done.id).status == "completed")
        with pytest.raises(openai.BadRequestError, match="Cannot cancel a completed response."):
            client.responses.cancel(done.id)
        sync = client.responses.create(model="gpt-4o-mini", input="a")
        with pytest.raises(openai.BadRequestError, match="Cannot cancel a synchronous response."):
            client.responses.cancel(sync.id)
        with pytest.raises(openai.NotFoundError, match="Response with id 'resp_nope' not found."):
            client.responses.cancel("resp_nope")


def test_delete_then_404(sim: Simulator, client: OpenAI) -> None:
    created = client.responses.create(model="gpt-4o-mini", input="a")
    resp = requests.delete(f"{sim.base_url}/responses/{created.id}", timeout=5)
    assert resp.json() == {"id": created.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)


def test_input_items_paging(sim: Simulator, client: OpenAI) -> None:
    items = [{"role": "user", "content": f"m{i}"} for i in range(5)]
    created = client.responses.create(model="gpt-4o-mini", input=items)  # type: ignore[arg-type]
    asc = [
        t.cast(t.Any, i).content[0].text
        for i in client.responses.input_items.list(created.id, limit=2, order="asc")
    ]
    assert asc == ["m0", "m1", "m2", "m3", "m4"]
    first_page = client.responses.input_items.list(created.id, limit=2)
    assert [t.cast(t.Any, i).content[0].text for i in first_page.data] == ["m4", "m3"]
    assert first_page.has_more is True
    resp = requests.get(f"{sim.base_url}/responses/{created.id}/input_items?limit=101", timeout=5)
    assert_error(resp, 400, "limit")


def test_input_tokens_compact_and_models(client: OpenAI) -> None:
    count = client.responses.input_tokens.count(model="gpt-4o-mini", input="abcdefgh")
    assert count.object == "response.input_tokens" and count.input_tokens == 2
    compacted = client.responses.compact(model="gpt-4o-mini", input="hello there")
    assert compacted.object == "response.compaction"
    assert compacted.output[-1].type == "compaction"
    assert {"gpt-4o-mini", "gpt-5", "o4-mini"} <= {m.id for m in client.models.list()}


# -- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param"),
    [
        ("POST", "/v1/responses", b"{not json", 400, None),
        ("POST", "/v1/responses", b"[1]", 400, "body"),
        ("POST", "/v1/responses", b'{"input": "x"}', 400, "model"),
        ("POST", "/v1/responses", b'{"model": 5}', 400, "model"),
        ("POST", "/v1/responses", b'{"model": "m", "stream": "yes"}', 400, "stream"),
        ("POST", "/v1/responses", b'{"model": "m", "background": true, "store": false}', 400, "background"),
        ("POST", "/v1/responses", b'{"model": "m", "metadata": {"sim_words": 3}}', 400, "metadata.sim_words"),
        ("POST", "/v1/responses", b'{"model": "m", "metadata": {"sim_words": "many"}}', 400, "sim_words"),
        ("POST", "/v1/responses", b'{"model": "m", "metadata": {"sim_nope": "1"}}', 400, "sim_nope"),
        (
            "POST",
            "/v1/responses",
            b'{"model": "m", "previous_response_id": "resp_x"}',
            400,
            "previous_response_id",
        ),
        ("GET", "/v1/responses/resp_missing", b"", 404, None),
        ("GET", "/v1/nothing", b"", 404, None),
        ("GET", "/v1/responses", b"", 405, None),
        ("DELETE", "/v1/responses/resp_x/cancel", b"", 405, None),
    ],
)
def test_error_envelopes(
    sim: Simulator, method: str, path: str, body: bytes, status: int, param: str | None
) -> None:
    resp = requests.request(method, sim.url + path, data=body, timeout=5)
    assert_error(resp, status, param)


def test_error_messages_match_openai(sim: Simulator, client: OpenAI) -> None:
    assert_error(
        requests.get(f"{sim.base_url}/responses/resp_x", timeout=5),
        404,
        None,
        "Response with id 'resp_x' not found.",
    )
    sync = client.responses.create(model="gpt-4o-mini", input="a")
    bg = client.responses.create(model="gpt-4o-mini", input="a", background=True)
    cases = [
        (
            f"{sync.id}?stream=True",
            "stream",
            "Invalid value for 'stream': expected a boolean ('true' or 'false').",
        ),
        (f"{sync.id}?stream=1", "stream", None),
        (f"{sync.id}?stream=true&starting_after=-1", "starting_after", None),
        (f"{sync.id}?stream=true&starting_after=x", "starting_after", None),
        (f"{sync.id}?sim_framing=weird", "sim_framing", None),
        (
            f"{sync.id}?stream=true",
            "stream",
            "This response cannot be streamed because it was not created with background=true.",
        ),
        (
            f"{bg.id}?stream=true",
            "stream",
            "This response cannot be streamed because it was not created with stream=true.",
        ),
    ]
    for target, param, message in cases:
        assert_error(requests.get(f"{sim.base_url}/responses/{target}", timeout=5), 400, param, message)


def test_replay_window_expiry() -> None:
    with Simulator(config=SimulatorConfig(delay_ms=0, words=1, replay_window_s=0.05)) as sim:
        body = create_body(background=True, stream=True)
        events = parse_sse(Raw(sim, "POST", "/v1/responses", body).body())
        time.sleep(0.1)
        resp = requests.get(
            f"{sim.base_url}/responses/{events[0][1]['response']['id']}?stream=true", timeout=5
        )
        assert_error(resp, 400, "stream")
        assert "more than 5 minutes old" in resp.json()["error"]["message"]


def test_api_key_checks_echo_a_masked_sent_key() -> None:
    with Simulator(config=SimulatorConfig(api_key="sk-right-key-1234", delay_ms=0)) as sim:
        url = f"{sim.base_url}/models"
        wrong = requests.get(url, headers={"Authorization": "Bearer sk-abcdefghijwxyz"}, timeout=5)
        assert wrong.status_code == 401
        assert wrong.json() == {
            "error": {
                "message": "Incorrect API key provided: sk-ab***wxyz. You can find your API key at"
                " https://platform.openai.com/account/api-keys.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
        missing = requests.get(url, timeout=5)
        assert missing.status_code == 401 and missing.json()["error"]["code"] is None
        assert missing.json()["error"]["message"].startswith("You didn't provide an API key.")
        assert requests.get(url, headers={"Authorization": "Bearer sk-right-key-1234"}, timeout=5).ok
        assert requests.get(url, headers={"api-key": "sk-right-key-1234"}, timeout=5).ok
        assert requests.get(f"{sim.url}/health", timeout=5).ok


# -- fault parser -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        ({}, {}),
        ({"model": "x", "other": "y"}, {}),
        ({"sim_words": "3"}, {"words": 3}),
        ({"sim_delay_ms": "2.5"}, {"delay_ms": 2.5}),
        ({"sim_delta_bytes": "1048576"}, {"delta_bytes": 1048576}),
        ({"sim_cut_after": "0"}, {"cut_after": 0}),
        ({"sim_cut_every": "4", "sim_cut_mode": "clean"}, {"cut_every": 4, "cut_mode": "clean"}),
        ({"sim_gap_at": "5", "sim_gap_s": "0.5"}, {"gap_at": 5, "gap_s": 0.5}),
        ({"sim_framing": "crlf", "sim_split": "1"}, {"framing": "crlf", "split": True}),
        ({"sim_transfer": "close", "sim_gzip": "true"}, {"transfer": "close", "gzip": True}),
        (
            {"sim_keepalive_every": "2", "sim_keepalive_first": "1"},
            {"keepalive_every": 2, "keepalive_first": True},
        ),
        ({"sim_comments": "0", "sim_unicode": "1"}, {"comments": False, "unicode": True}),
        ({"sim_status": "429", "sim_retry_after": "7"}, {"status": 429, "retry_after": "7"}),
        ({"sim_should_retry": "false"}, {"should_retry": False}),
        ({"sim_error": "nested", "sim_error_at": "6"}, {"error": "nested", "error_at": 6}),
        ({"sim_error_at": "6"}, {"error": "flat", "error_at": 6}),
        ({"sim_cancel_mode": "continue"}, {"cancel_mode": "continue"}),
    ],
)
def test_parse_faults_accepts(mapping: dict[str, str], expected: dict[str, object]) -> None:
    faults = parse_faults(mapping, Faults())
    for name, value in expected.items():
        assert getattr(faults, name) == value
    untouched = {f for f in Faults.__dataclass_fields__ if f not in expected}
    assert all(getattr(faults, f) == getattr(Faults(), f) for f in untouched)


@pytest.mark.parametrize(
    ("mapping", "param"),
    [
        ({"sim_words": "x"}, "sim_words"),
        ({"sim_words": "-1"}, "sim_words"),
        ({"sim_delay_ms": "nan"}, "sim_delay_ms"),
        ({"sim_delay_ms": "-3"}, "sim_delay_ms"),
        ({"sim_cut_every": "0"}, "sim_cut_every"),
        ({"sim_framing": "CRLF"}, "sim_framing"),
        ({"sim_split": "yes"}, "sim_split"),
        ({"sim_transfer": "identity"}, "sim_transfer"),
        ({"sim_status": "200"}, "sim_status"),
        ({"sim_status": "600"}, "sim_status"),
        ({"sim_retry_after": "soon"}, "sim_retry_after"),
        ({"sim_error": "loud"}, "sim_error"),
        ({"sim_cancel_mode": "stop"}, "sim_cancel_mode"),
        ({"sim_typo": "1"}, "sim_typo"),
    ],
)
def test_parse_faults_rejects(mapping: dict[str, str], param: str) -> None:
    with pytest.raises(FaultError) as info:
        parse_faults(mapping, Faults())
    assert info.value.param == param
    assert param in info.value.message


def test_parse_faults_layers_over_defaults() -> None:
    defaults = Faults(framing="crlf", split=True, words=2)
    faults = parse_faults({"sim_words": "7"}, defaults)
    assert (faults.framing, faults.split, faults.words) == ("crlf", True, 7)
    assert parse_faults({}, defaults) is defaults


def test_split_frame_cuts_crlf_between_cr_and_lf() -> None:
    frame = b'event: x\r\ndata: {"a":"\xd1\x85"}\r\n\r\n'
    pieces = split_frame(frame, "crlf")
    assert b"".join(pieces) == frame
    assert any(a.endswith(b"\r") and b.startswith(b"\n") for a, b in zip(pieces, pieces[1:], strict=False))
    assert any(p.endswith(b"\xd1") for p in pieces), "a multi-byte character is split"


def test_delta_texts_are_deterministic_and_sized() -> None:
    assert delta_texts("one two", 3) == ["one", " two", " one"]
    assert [len(d.encode()) for d in delta_texts("word", 2, delta_bytes=1000)] == [1000, 1000]


# -- faults on the wire -------------------------------------------------------------------------------


def test_crlf_split_writes(sim: Simulator, client: OpenAI) -> None:
    raw = Raw(sim, "POST", "/v1/responses?sim_framing=crlf&sim_split=1", create_body(stream=True))
    chunks = raw.chunks()
    body = b"".join(chunks)
    events = parse_sse(body, b"\r\n")
    assert len(chunks) > 3 * len(events)
    assert sum(
        a.endswith(b"\r") and b.startswith(b"\n") for a, b in zip(chunks, chunks[1:], strict=False)
    ) >= len(events)
    assert b"\n" not in body.replace(b"\r\n", b"")
    sdk = list(
        client.responses.create(model="m", input="a b", stream=True, extra_query={"sim_framing": "cr"})
    )
    assert sdk[-1].type == "response.completed"


def test_config_default_faults_apply_to_every_request() -> None:
    config = SimulatorConfig(delay_ms=0, words=2, faults=Faults(framing="crlf", split=True))
    with Simulator(config=config) as sim:
        chunks = Raw(sim, "POST", "/v1/responses", create_body(stream=True)).chunks()
        assert chunks[0] == b"eve"
        assert parse_sse(b"".join(chunks), b"\r\n")[-1][0] == "response.completed"


def test_close_delimited_body(sim: Simulator, client: OpenAI) -> None:
    raw = Raw(sim, "POST", "/v1/responses", create_body(stream=True, metadata={"sim_transfer": "close"}))
    assert raw.headers["connection"] == "close"
    assert "transfer-encoding" not in raw.headers and "content-length" not in raw.headers
    assert parse_sse(raw.to_eof())[-1][0] == "response.completed"
    events = list(
        client.responses.create(model="m", input="a", stream=True, metadata={"sim_transfer": "close"})
    )
    assert events[-1].type == "response.completed"


def test_cut_aborts_chunked_body_and_job_continues(sim: Simulator, client: OpenAI) -> None:
    stream = client.responses.create(
        model="m", input="a", background=True, stream=True, metadata={"sim_cut_after": "3"}
    )
    seen = []
    with pytest.raises(openai.APIConnectionError):
        for event in stream:
            seen.append(event)
    assert len(seen) == 3
    response_id = seen[0].response.id
    wait_for(lambda: client.responses.retrieve(response_id).status == "completed")
    assert [c.reason for c in sim.stream_closures] == ["cut"]
    # The create-time cut does not apply to replays.
    assert list(client.responses.retrieve(response_id, stream=True))[-1].type == "response.completed"


def test_cut_raw_has_no_last_chunk(sim: Simulator) -> None:
    raw = Raw(sim, "POST", "/v1/responses?sim_cut_after=2", create_body(stream=True))
    assert raw.chunk() is not None and raw.chunk() is not None
    with pytest.raises(EOFError):
        raw.chunk()


def test_clean_cut_ends_without_terminal_event(client: OpenAI) -> None:
    events = list(
        client.responses.create(
            model="m", input="a", stream=True, extra_query={"sim_cut_after": "2", "sim_cut_mode": "clean"}
        )
    )
    assert [e.type for e in events] == TEXT_EVENTS[:2]


def test_cut_every_forces_repeated_resume(client: OpenAI) -> None:
    stream = client.responses.create(
        model="m", input="a", background=True, stream=True, metadata={"sim_cut_every": "4"}
    )
    events: list[t.Any] = []
    while True:
        try:
            for event in stream:
                events.append(event)
            break
        except openai.APIConnectionError:
            stream = client.responses.retrieve(
                events[0].response.id, stream=True, starting_after=events[-1].sequence_number
            )
    assert_gap_free(events)
    assert events[-1].type == "response.completed"
    assert len(events) > 8


def test_gzip_is_decodable_event_by_event(sim: Simulator, client: OpenAI) -> None:
    raw = Raw(sim, "POST", "/v1/responses?sim_gzip=1", create_body(stream=True))
    assert raw.headers["content-encoding"] == "gzip"
    decoder = zlib.decompressobj(31)
    chunks = raw.chunks()
    decoded = [decoder.decompress(c) for c in chunks]
    assert all(d.endswith(b"\n\n") for d in decoded[:-1]), "each chunk decodes to whole frames"
    assert decoder.eof
    assert parse_sse(b"".join(decoded))[-1][0] == "response.completed"
    events = list(client.responses.create(model="m", input="a", stream=True, extra_query={"sim_gzip": "1"}))
    assert events[-1].type == "response.completed"
    json_resp = requests.get(f"{sim.base_url}/models?sim_gzip=1", timeout=5)
    assert json_resp.headers["content-encoding"] == "gzip" and json_resp.json()["object"] == "list"


def test_keepalives_consume_sequence_numbers(client: OpenAI) -> None:
    events = list(
        client.responses.create(
            model="m",
            input="a",
            stream=True,
            metadata={"sim_keepalive_every": "3", "sim_keepalive_first": "1"},
        )
    )
    assert_gap_free(events)
    assert t.cast(str, events[0].type) == "keepalive" and events[1].type == "response.created"
    kinds: list[str] = [e.type for e in events]
    assert kinds[4] == "keepalive" and kinds.count("keepalive") == 1 + (len(TEXT_EVENTS) - 1) // 3
    assert kinds[-1] == "response.completed"


def test_comments_between_events(sim: Simulator, client: OpenAI) -> None:
    body = Raw(sim, "POST", "/v1/responses?sim_comments=1", create_body(stream=True)).body()
    assert body.count(b": ping\n\n") == len(TEXT_EVENTS) - 1
    events = list(
        client.responses.create(model="m", input="a", stream=True, extra_query={"sim_comments": "1"})
    )
    assert len(events) == len(TEXT_EVENTS)


def test_unicode_bytes_are_raw_and_intact(sim: Simulator, client: OpenAI) -> None:
    body = Raw(sim, "POST", "/v1/responses?sim_unicode=1&sim_words=6", create_body(stream=True)).body()
    for char in ("\u2028", "\u2029", "\u0085", "хорошо", "\U0001f642"):
        assert char.encode() in body
    events = list(
        client.responses.create(model="m", input="a", stream=True, extra_query={"sim_unicode": "1"})
    )
    text = "".join(t.cast(str, e.delta) for e in events if e.type.endswith(".delta"))
    assert "line\u2028sep" in text and "хорошо" in text and events[-1].response.output_text == text


def test_large_deltas_make_a_multi_mib_completed_line(sim: Simulator) -> None:
    body = Raw(sim, "POST", "/v1/responses?sim_delta_bytes=524288", create_body(stream=True)).body()
    longest = max(len(line) for line in body.split(b"\n"))
    assert longest > 2 * 1024 * 1024
    completed = parse_sse(body)[-1][1]
    assert len(completed["response"]["output"][0]["content"][0]["text"]) == 4 * 524288


def test_gap_is_silent_for_the_requested_time(client: OpenAI) -> None:
    stamps = []
    for event in client.responses.create(
        model="m", input="a", stream=True, metadata={"sim_gap_at": "5", "sim_gap_s": "0.4"}
    ):
        stamps.append((event.sequence_number, time.monotonic()))
    gaps = {seq: at - stamps[i - 1][1] for i, (seq, at) in enumerate(stamps) if i}
    assert gaps[5] >= 0.35
    assert max(v for k, v in gaps.items() if k != 5) < 0.3


@pytest.mark.parametrize(
    ("where", "status", "code"),
    [
        ("metadata", 429, "rate_limit_exceeded"),
        ("query", 503, "service_unavailable"),
        ("query", 500, "server_error"),
    ],
)
def test_status_injection(sim: Simulator, where: str, status: int, code: str) -> None:
    faults = {"sim_status": str(status), "sim_retry_after": "7", "sim_should_retry": "true"}
    if where == "metadata":
        resp = requests.post(f"{sim.base_url}/responses", json=create_body(metadata=faults), timeout=5)
    else:
        resp = requests.get(f"{sim.base_url}/responses/resp_whatever", params=faults, timeout=5)
    assert resp.status_code == status
    assert resp.headers["retry-after"] == "7" and resp.headers["x-should-retry"] == "true"
    assert resp.json()["error"]["code"] == code


def test_status_injection_through_sdk(client: OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        client.responses.create(model="m", input="a", stream=True, metadata={"sim_status": "429"})
    assert info.value.code == "rate_limit_exceeded"


def test_flat_error_event_is_yielded_then_failed(client: OpenAI) -> None:
    events = list(client.responses.create(model="m", input="a", stream=True, metadata={"sim_error_at": "4"}))
    assert [e.type for e in events] == [*TEXT_EVENTS[:4], "error", "response.failed"]
    assert events[4].sequence_number == 4 and events[-1].response.status == "failed"
    assert_gap_free(events)


def test_nested_error_event_raises_in_sdk(client: OpenAI) -> None:
    stream = client.responses.create(model="m", input="a", stream=True, metadata={"sim_error": "nested"})
    with pytest.raises(openai.APIError, match="The server had an error"):
        list(stream)


def test_replay_inherits_metadata_faults_but_get_can_override(sim: Simulator, client: OpenAI) -> None:
    meta = {"sim_framing": "crlf"}
    events = list(client.responses.create(model="m", input="a", background=True, stream=True, metadata=meta))
    response_id = events[0].response.id
    assert events[0].response.metadata == meta
    assert b"\r\n" in Raw(sim, "GET", f"/v1/responses/{response_id}?stream=true").body()
    assert b"\r" not in Raw(sim, "GET", f"/v1/responses/{response_id}?stream=true&sim_framing=lf").body()


# -- disconnects --------------------------------------------------------------------------------------


def test_client_gone_is_noticed_during_a_silent_gap(sim: Simulator) -> None:
    body = create_body(stream=True, metadata={"sim_gap_at": "3", "sim_gap_s": "5"})
    raw = Raw(sim, "POST", "/v1/responses", body)
    for _ in range(3):
        raw.chunk()
    wait_for(lambda: sim.open_streams == 1)
    left_at = time.monotonic()
    raw.close()
    wait_for(lambda: sim.stream_closures, timeout=2)
    closure = sim.stream_closures[0]
    assert closure.reason == "client_gone"
    assert closure.closed_at - left_at < 0.5
    assert sim.open_streams == 0


def test_background_job_continues_after_client_leaves(sim: Simulator, client: OpenAI) -> None:
    raw = Raw(sim, "POST", "/v1/responses", create_body(stream=True, background=True))
    created = json.loads(raw.chunk().split(b"data: ")[1])
    raw.close()
    response_id = created["response"]["id"]
    wait_for(lambda: client.responses.retrieve(response_id).status == "completed")


def test_synchronous_stream_stops_when_client_leaves(sim: Simulator, client: OpenAI) -> None:
    raw = Raw(sim, "POST", "/v1/responses?sim_delay_ms=30&sim_words=100", create_body(stream=True))
    created = json.loads(raw.chunk().split(b"data: ")[1])
    raw.close()
    wait_for(lambda: sim.stream_closures)
    assert sim.stream_closures[0].reason == "client_gone"
    record = sim.store._records[created["response"]["id"]]
    wait_for(lambda: record.finished)
    assert record.end_reason == "stopped"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created["response"]["id"])


def test_stop_closes_open_streams_promptly() -> None:
    sim = Simulator(config=SimulatorConfig(delay_ms=0)).start()
    raw = Raw(sim, "POST", "/v1/responses?sim_gap_at=2&sim_gap_s=30", create_body(stream=True))
    raw.chunk()
    started = time.monotonic()
    sim.stop()
    with pytest.raises((EOFError, OSError)):
        while True:
            raw.chunk()
    assert time.monotonic() - started < 2


def test_client_gone_is_noticed_between_slow_events_of_streams_and_replays(sim: Simulator) -> None:
    raw = Raw(sim, "POST", "/v1/responses?sim_delay_ms=5000", create_body(stream=True, background=True))
    created = json.loads(raw.chunk().split(b"data: ")[1])
    response_id = created["response"]["id"]
    replay = Raw(sim, "GET", f"/v1/responses/{response_id}?stream=true")
    replay.chunk()
    wait_for(lambda: sim.open_streams == 2)
    for index, conn in enumerate((replay, raw)):
        left_at = time.monotonic()
        conn.close()
        wait_for(lambda: len(sim.stream_closures) > index, timeout=2)  # noqa: B023
        closure = sim.stream_closures[index]
        assert closure.reason == "client_gone"
        assert closure.closed_at - left_at < 0.5
    assert sim.open_streams == 0
    assert sim.store._records[response_id].finished is False  # the background job goes on


def test_client_sending_more_during_a_stream_is_not_taken_for_gone(sim: Simulator) -> None:
    body = json.dumps(create_body(stream=True, metadata={"sim_gap_at": "3", "sim_gap_s": "0.5"})).encode()
    pipelined = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", sim.port), timeout=10) as sock:
        head = f"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body + pipelined)
        received = b""
        while data := sock.recv(65536):
            received += data
    assert b"event: response.completed" in received
    assert received.count(b"HTTP/1.1 200 OK") == 2 and received.endswith(b"}")
    assert [c.reason for c in sim.stream_closures] == ["complete"]


def test_streams_share_one_generating_and_one_watching_thread(sim: Simulator) -> None:
    before = threading.active_count()
    streams = [
        Raw(sim, "POST", "/v1/responses?sim_delay_ms=2000", create_body(stream=True, background=True))
        for _ in range(20)
    ]
    for raw in streams:
        raw.chunk()
    wait_for(lambda: sim.open_streams == 20)
    # One thread per connection, plus the pacer and the client watcher: no thread per job.
    assert threading.active_count() - before <= 20 + 2


# -- introspection ------------------------------------------------------------------------------------


def test_recorded_requests_keep_raw_target_and_body(sim: Simulator) -> None:
    target = "/v1/responses/resp_x?include%5B%5D=a&include%5B%5D=b&stream=True"
    requests.get(sim.url + target, headers={"X-Thing": "1"}, timeout=5)
    chunked = requests.post(f"{sim.base_url}/responses", data=iter([b'{"model":', b'"m"}']), timeout=5)
    assert chunked.status_code == 200
    first, second = sim.requests
    assert first.path == "/v1/responses/resp_x"
    assert first.query == "include%5B%5D=a&include%5B%5D=b&stream=True"
    assert first.headers["x-thing"] == "1" and ("X-Thing", "1") in first.raw_headers
    assert second.body == b'{"model":"m"}' and second.headers["transfer-encoding"] == "chunked"
    sim.clear_requests()
    assert sim.requests == []


def test_http_introspection_endpoints(sim: Simulator, client: OpenAI) -> None:
    list(client.responses.create(model="m", input="a", stream=True))
    assert requests.get(f"{sim.url}/health", timeout=5).status_code == 200
    recorded = requests.get(f"{sim.url}/_sim/requests", timeout=5).json()
    assert [r["path"] for r in recorded] == ["/v1/responses"]
    assert json.loads(recorded[0]["body"])["stream"] is True
    streams = requests.get(f"{sim.url}/_sim/streams", timeout=5).json()
    assert streams["open"] == 0 and streams["closures"][0]["reason"] == "complete"
    assert requests.post(f"{sim.url}/_sim/reset", timeout=5).ok
    assert requests.get(f"{sim.url}/_sim/requests", timeout=5).json() == []
    assert len(sim.requests) == 0


def test_keep_alive_connection_serves_several_requests(sim: Simulator) -> None:
    with requests.Session() as session:
        for _ in range(3):
            resp = session.post(f"{sim.base_url}/responses", json=create_body(stream=True), timeout=5)
            assert resp.content.endswith(b"\n\n")
        assert session.get(f"{sim.base_url}/models", timeout=5).ok


@pytest.mark.slow
def test_serve_prints_address_and_exits_on_sigterm() -> None:
    code = "from wsgi_proxy.simulator import serve; serve('127.0.0.1', 0)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            match = re.fullmatch(r"simulator listening on (http://127\.0\.0\.1:\d+/v1)", line)
            assert match, line
            assert requests.get(match.group(1).removesuffix("/v1") + "/health", timeout=5).ok
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=5) == 0
        finally:
            proc.kill()


def test_the_shared_writer_streams_plain_background_responses_without_a_thread_each() -> None:
    with Simulator(config=SimulatorConfig(delay_ms=60, words=5, shared_writer=True)) as sim:
        body = {"model": "gpt-4o-mini", "input": "x", "background": True, "stream": True}
        threads_before = threading.active_count()
        answers = [
            requests.post(f"{sim.base_url}/responses", json=body, stream=True, timeout=10) for _ in range(20)
        ]
        deadline = time.monotonic() + 10
        while sim.open_streams < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sim.open_streams == 20
        assert threading.active_count() - threads_before < 20  # the handlers' threads are gone
        numbers = []
        for answer in answers:
            splitter, seen = EventSplitter(), []
            while chunk := answer.raw.read1(65536):
                seen += [parse_event(e).sequence_number for e in splitter.feed(chunk)]
            numbers.append(seen)
            answer.close()
        response_id = ""
        resumed = requests.post(f"{sim.base_url}/responses", json=body, stream=True, timeout=10)
        for event in EventSplitter().feed(resumed.raw.read1(65536)):
            if parse_event(event).type == "response.created":
                response_id = json.loads(event.split(b"data: ", 1)[1])["response"]["id"]
        resumed.close()
        replay = requests.get(
            f"{sim.base_url}/responses/{response_id}",
            params={"stream": "true", "starting_after": "3"},
            timeout=10,
        )
    assert all(seq == list(range(len(seq))) and len(seq) > 5 for seq in numbers)
    assert b'"sequence_number":4' in replay.content and b'"sequence_number":3,' not in replay.content
    assert all(c.reason == "complete" for c in sim.stream_closures[:20])


@pytest.mark.parametrize("shared_writer", [False, True], ids=["thread per stream", "shared writer"])
def test_stamped_events_carry_the_time_they_were_sent(shared_writer: bool) -> None:
    config = SimulatorConfig(delay_ms=5, words=3, shared_writer=shared_writer)
    with Simulator(config=config) as sim:
        body = {
            "model": "gpt-4o-mini",
            "input": "x",
            "background": True,
            "stream": True,
            "metadata": {"sim_stamp": "1"},
        }
        before = time.monotonic()
        with requests.post(f"{sim.base_url}/responses", json=body, stream=True, timeout=10) as answer:
            splitter, events = EventSplitter(), []
            while chunk := answer.raw.read1(65536):
                events += splitter.feed(chunk)
        after = time.monotonic()
    stamps = [json.loads(event.split(b"data: ", 1)[1])["sim_sent_at"] for event in events]
    assert len(stamps) == len(events) > 5 and stamps == sorted(stamps)
    assert before <= stamps[0] and stamps[-1] <= after
    assert parse_event(events[-1]).type == "response.completed"


def test_stop_ends_every_running_response_and_the_counts_come_alone() -> None:
    with Simulator(config=SimulatorConfig(delay_ms=200, words=1000, shared_writer=True)) as sim:
        body = {"model": "gpt-4o-mini", "input": "x", "background": True, "stream": True}
        answers = [
            requests.post(f"{sim.base_url}/responses", json=body, stream=True, timeout=10) for _ in range(3)
        ]
        wait_for(lambda: sim.open_streams == 3)
        counts = requests.get(f"{sim.url}/_sim/streams?closures=false", timeout=5).json()
        assert counts == {"open": 3, "websockets": 0}
        assert requests.post(f"{sim.url}/_sim/stop", timeout=5).json() == {"ok": True}
        ends = []
        for answer in answers:
            data = b""
            while chunk := answer.raw.read1(65536):
                data += chunk
            ends.append(data.endswith(b"\n\n"))
            answer.close()
        wait_for(lambda: sim.open_streams == 0)
        assert all(
            record.finished and record.end_reason == "stopped" for record in sim.store._records.values()
        )
    assert ends == [True, True, True]  # whole events, then the end of the body: nothing cut mid-event


def test_the_store_forgets_finished_responses_first_finished_first_and_never_running_ones() -> None:
    store = Store(max_responses=2)
    faults = Faults()

    def record(n: int) -> ResponseRecord:
        snapshot = {"id": f"resp_{n}", "status": "in_progress"}
        return ResponseRecord(snapshot=snapshot, background=True, stream=True, faults=faults, input_items=[])

    first, second, third, fourth = (record(n) for n in range(4))
    for running in (first, second, third):
        store.add(running)
    assert [store.get(f"resp_{n}") for n in range(3)] == [first, second, third]  # running: all kept
    second.finish("stopped")  # over the limit: the one that finished goes
    assert store.get("resp_1") is None and store.get("resp_0") is first
    third.finish("stopped")
    first.finish("stopped")
    store.add(fourth)  # first and third finished; third finished first, so it goes
    assert [store.get(f"resp_{n}") is not None for n in range(4)] == [True, False, False, True]
    assert store.delete("resp_0") is first and store.get("resp_0") is None
