"""The WebSocket frame functions, table by table: what the proxy reads, checks and makes."""

from __future__ import annotations

import json

import pytest

from wsgi_proxy.errors import InvalidRequest, RateLimited, ResponseNotFound
from wsgi_proxy.wire.frames import FrameInfo, error_frame, frame_info, parse_client_frame, with_stream_id


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            b'{"type":"response.output_text.delta","sequence_number":7,"delta":"hi"}',
            FrameInfo("response.output_text.delta", 7, None),
        ),
        (
            b'{"type":"response.created","sequence_number":0,"response":{"id":"r"},"stream_id":"lane-1"}',
            FrameInfo("response.created", 0, "lane-1"),
        ),
        (b'{"type":"error","status":400,"error":{"code":"x"}}', FrameInfo("error", None, None)),
        # Not written type first: parsed as JSON.
        (
            b'{"sequence_number":3,"type":"response.in_progress","stream_id":"b"}',
            FrameInfo("response.in_progress", 3, "b"),
        ),
        # A nested sequence_number before the top-level one is not taken for it.
        (b'{"type":"x","item":{"sequence_number":9},"sequence_number":2}', FrameInfo("x", 2, None)),
        # A quoted "stream_id" inside text is escaped, so the top-level key is the only one.
        (
            b'{"type":"d","sequence_number":1,"delta":"say \\"stream_id\\":\\"z\\"","stream_id":"a"}',
            FrameInfo("d", 1, "a"),
        ),
        # Two stream_id keys (one nested): JSON decides.
        (
            b'{"type":"d","sequence_number":1,"x":{"stream_id":"inner"},"stream_id":"outer"}',
            FrameInfo("d", 1, "outer"),
        ),
        (b'{"type":"d","stream_id":"bad lane"}', FrameInfo("d", None, None)),
        (b"not json", FrameInfo(None, None, None)),
        (b"[1,2]", FrameInfo(None, None, None)),
        (b'{"type":7}', FrameInfo(None, None, None)),
        (b'{"type":"t","sequence_number":true}', FrameInfo("t", None, None)),
    ],
)
def test_frame_info(payload: bytes, expected: FrameInfo) -> None:
    assert frame_info(payload) == expected


CREATE = b'{"type":"response.create","model":"m"'
ACCEPTED: list[tuple[bytes, str, str | None, tuple[str, ...], bool]] = [
    (CREATE + b',"input":"x"}', "response.create", None, (), True),
    (CREATE + b',"stream_id":"a.b_c-1","generate":false}', "response.create", "a.b_c-1", (), False),
    (CREATE + b',"previous_response_id":"resp_1"}', "response.create", None, ("resp_1",), True),
    (CREATE + b',"conversation":{"id":"conv_1"}}', "response.create", None, ("conv_1",), True),
    (
        CREATE + b',"conversation":"conv_2","prompt_cache_options":{"comparison_response_id":"resp_3"}}',
        "response.create",
        None,
        ("conv_2", "resp_3"),
        True,
    ),
    (b'{"type":"response.steer","previous_response_id":"resp_2"}', "response.steer", None, ("resp_2",), True),
    (b'{"type":"something.new","anything":[1]}', "something.new", None, (), True),
    (
        b'{"type":"response.steer","previous_response_id":"resp_2","input":[{"type":"input_file","file_id":"file-9"}]}',
        "response.steer",
        None,
        ("resp_2", "file-9"),
        True,
    ),
    (b'{"type":"future.event","file_ids":["file-1"]}', "future.event", None, ("file-1",), True),
]


@pytest.mark.parametrize(("payload", "kind", "lane", "owned", "generate"), ACCEPTED)
def test_parse_client_frame_accepts(
    payload: bytes, kind: str, lane: str | None, owned: tuple[str, ...], generate: bool
) -> None:
    frame = parse_client_frame(payload)
    assert (frame.type, frame.stream_id, frame.owned, frame.generate) == (kind, lane, owned, generate)
    assert (frame.create is not None) == (kind == "response.create")


@pytest.mark.parametrize(
    ("payload", "param", "code"),
    [
        (b"not json", None, None),
        (b"[]", None, None),
        (b'{"model":"m"}', "type", None),
        (b'{"type":""}', "type", None),
        (b'{"type":"response.create","stream_id":"has space"}', "stream_id", "invalid_stream_id"),
        (b'{"type":"response.create","stream_id":""}', "stream_id", "invalid_stream_id"),
        (b'{"type":"response.create","stream_id":"' + b"a" * 257 + b'"}', "stream_id", "invalid_stream_id"),
        (b'{"type":"response.create","model":3}', "model", None),
        (b'{"type":"response.create","model":"m","background":true}', "background", None),
        (b'{"type":"response.create","model":"m","conversation":"conv/1"}', "conversation", None),
        (b'{"type":"response.create","model":"m","conversation":{"id":3}}', "conversation", None),
        (
            b'{"type":"response.create","model":"m","prompt_cache_options":{"comparison_response_id":"a b"}}',
            "prompt_cache_options",
            None,
        ),
        (b'{"type":"response.create","model":"m","generate":"no"}', "generate", None),
        (
            b'{"type":"response.create","model":"m","previous_response_id":"../x"}',
            "previous_response_id",
            None,
        ),
        (b'{"type":"response.steer","input":"x"}', "previous_response_id", None),
        (b'{"type":"response.steer","previous_response_id":"a/b"}', "previous_response_id", None),
    ],
)
def test_parse_client_frame_refuses(payload: bytes, param: str | None, code: str | None) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_client_frame(payload)
    assert caught.value.param == param
    assert caught.value.code == code
    assert caught.value.message.endswith(".")


def test_error_frame_is_openais_shape_with_the_lane_and_headers() -> None:
    limited = RateLimited("Slow down.", retry_after=3.0, limit="rpm")
    frame = json.loads(error_frame(limited, "lane"))
    assert frame == {
        "type": "error",
        "status": 429,
        "error": {
            "message": "Slow down.",
            "type": "rate_limit_error",
            "param": None,
            "code": limited.code,
            "headers": limited.headers(),
        },
        "stream_id": "lane",
    }
    missing = json.loads(error_frame(ResponseNotFound("resp_1")))
    assert missing["status"] == 404 and "stream_id" not in missing and "headers" not in missing["error"]


@pytest.mark.parametrize(
    ("data", "lane", "expected"),
    [
        (b'{"type":"a","sequence_number":1}', "x", b'{"type":"a","sequence_number":1,"stream_id":"x"}'),
        (b'{"type":"a"}\n', "x", b'{"type":"a","stream_id":"x"}'),
        (b"{}", "x", b'{"stream_id":"x"}'),
        (b'{"type":"a"}', None, b'{"type":"a"}'),
        (b"not an object", "x", b"not an object"),
    ],
)
def test_with_stream_id(data: bytes, lane: str | None, expected: bytes) -> None:
    assert with_stream_id(data, lane) == expected
    if expected.startswith(b"{"):
        json.loads(expected)
