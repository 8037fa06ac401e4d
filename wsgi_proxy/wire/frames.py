"""The Responses API's WebSocket messages, as pure functions: what the proxy reads of a frame, the
client frames it checks before they go upstream, and the error frames it makes itself.

Server frames carry the same event objects as SSE ``data`` lines, with a ``stream_id`` when the
create named a lane. Nothing here alters a frame the proxy relays: :func:`frame_info` reads a copy,
and :func:`with_stream_id` is only for events that did not come over the socket (a stream resumed
over HTTP), which must name their lane like the frames they continue.
"""

from __future__ import annotations

import json
import re
import typing as t
from dataclasses import dataclass

from ..errors import InvalidRequest, ProxyError
from .validation import CreateFields, check_response_id, create_fields, named_in, parse_json_object

__all__ = [
    "STREAM_ID",
    "ClientFrame",
    "FrameInfo",
    "error_frame",
    "frame_info",
    "parse_client_frame",
    "relayed_error_frame",
    "with_stream_id",
]

#: A lane's name as OpenAI accepts it.
STREAM_ID = re.compile(r"[A-Za-z0-9_.-]{1,256}")

_HEAD_TYPE = re.compile(rb'\s*\{\s*"type"\s*:\s*"([^"\\]{1,200})"')
_HEAD_SEQ = re.compile(rb'"sequence_number"\s*:\s*([0-9]{1,19})\b')
_STREAM_KEY = b'"stream_id"'
_STREAM_VALUE = re.compile(rb'"stream_id"\s*:\s*"([A-Za-z0-9_.-]{1,256})"')
_HEAD = 512


@dataclass(frozen=True, slots=True)
class FrameInfo:
    """What the proxy notes about one server frame: its ``type``, ``sequence_number`` and lane."""

    type: str | None
    sequence_number: int | None
    stream_id: str | None


_NONE = FrameInfo(None, None, None)


def frame_info(payload: bytes) -> FrameInfo:
    """Note the ``type``, ``sequence_number`` and ``stream_id`` of one server frame (never raises).

    OpenAI writes ``type`` and ``sequence_number`` first, so they are read from the frame's head, and
    a frame with one ``"stream_id"`` key holds it at the top level (event payloads quote their text,
    so the key cannot appear inside a string unescaped); anything else is parsed as JSON.
    """
    head = payload[:_HEAD]
    type_match = _HEAD_TYPE.match(head)
    seq_match = _HEAD_SEQ.search(head)
    keys = payload.count(_STREAM_KEY)
    if type_match and keys <= 1 and (seq_match is None or head.count(b"{", 0, seq_match.start()) == 1):
        lane = _STREAM_VALUE.search(payload) if keys else None
        return FrameInfo(
            type_match.group(1).decode("utf-8", "replace"),
            int(seq_match.group(1)) if seq_match else None,
            lane.group(1).decode("ascii") if lane else None,
        )
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        return _NONE
    if not isinstance(obj, dict):
        return _NONE
    type_, seq, lane_value = obj.get("type"), obj.get("sequence_number"), obj.get("stream_id")
    return FrameInfo(
        type_ if isinstance(type_, str) else None,
        seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
        lane_value if isinstance(lane_value, str) and STREAM_ID.fullmatch(lane_value) else None,
    )


@dataclass(frozen=True, slots=True)
class ClientFrame:
    """What the proxy acts on in one client frame.

    :param type: the frame's ``type`` (``response.create``, ``response.steer``, or one the proxy
        does not know, relayed as it is).
    :param stream_id: the lane it names, or None for the unnamed one.
    :param create: the create's fields, for ``response.create``.
    :param owned: the ids the frame names that the caller must own: the response a create continues
        or a steer steers, a conversation, a comparison response.
    :param generate: False for a warm-up create (no output).
    """

    type: str
    stream_id: str | None = None
    create: CreateFields | None = None
    owned: tuple[str, ...] = ()
    generate: bool = True


def parse_client_frame(payload: bytes) -> ClientFrame:
    """Check one client text frame before it goes upstream; :class:`InvalidRequest` names the field."""
    obj = parse_json_object(payload)
    kind = obj.get("type")
    if not isinstance(kind, str) or not kind:
        raise InvalidRequest(
            "Every WebSocket message must be a JSON object with a string 'type', such as 'response.create'.",
            param="type",
        )
    lane = obj.get("stream_id")
    if lane is not None and not (isinstance(lane, str) and STREAM_ID.fullmatch(lane)):
        raise InvalidRequest(
            "Invalid 'stream_id': use 1 to 256 letters, digits, '_', '.' or '-'.",
            param="stream_id",
            code="invalid_stream_id",
        )
    if kind == "response.create":
        return _create_frame(obj, lane, payload)
    if kind == "response.steer":
        previous = obj.get("previous_response_id")
        if not isinstance(previous, str):
            raise InvalidRequest(
                "A 'response.steer' names the running response it steers in 'previous_response_id'.",
                param="previous_response_id",
            )
        steered = check_response_id(previous, "previous_response_id")
        return ClientFrame(kind, lane, owned=tuple(dict.fromkeys([steered, *named_in(obj, payload)])))
    # A type the proxy does not know goes on as it is, but not with another team's files in it.
    return ClientFrame(kind, lane, owned=named_in(obj, payload))


def _create_frame(obj: dict[str, t.Any], lane: str | None, payload: bytes) -> ClientFrame:
    fields = create_fields(obj, payload)
    if fields.background:
        raise InvalidRequest(
            "Background mode is not supported over a WebSocket. Send background creates over HTTP"
            " (POST /v1/responses).",
            param="background",
        )
    generate = obj.get("generate", True)
    if not isinstance(generate, bool):
        raise InvalidRequest("Invalid value for 'generate': expected true or false.", param="generate")
    return ClientFrame("response.create", lane, create=fields, owned=fields.owned_ids, generate=generate)


def error_frame(error: ProxyError, stream_id: str | None = None) -> bytes:
    """The ``error`` frame for a failure the proxy answers itself, shaped as OpenAI's.

    Headers an HTTP answer would carry (``Retry-After``) go in ``error.headers``, the only place a
    WebSocket client can read them.
    """
    body: dict[str, t.Any] = {
        "message": error.message,
        "type": error.type,
        "param": error.param,
        "code": error.code,
    }
    headers = error.headers()
    if headers:
        body["headers"] = headers
    return relayed_error_frame(error.status, body, stream_id)


def relayed_error_frame(status: int, error: dict[str, t.Any], stream_id: str | None = None) -> bytes:
    """An ``error`` frame with ``status`` and an error object as given (an upstream's own)."""
    frame: dict[str, t.Any] = {"type": "error", "status": status, "error": error}
    if stream_id is not None:
        frame["stream_id"] = stream_id
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False).encode()


def with_stream_id(data: bytes, stream_id: str | None) -> bytes:
    """An event object (compact JSON) with its lane's ``stream_id`` added as its last member."""
    end = data.rstrip()
    if stream_id is None or not end.endswith(b"}"):
        return data
    member = b'"stream_id":"' + stream_id.encode("ascii") + b'"}'
    body = end[:-1].rstrip()
    return body + (member if body.endswith(b"{") else b"," + member)
