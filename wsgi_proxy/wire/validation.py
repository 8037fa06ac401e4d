"""Input checks, as pure functions: nothing the proxy should reject ever reaches the upstream.

Each function raises :class:`~wsgi_proxy.errors.InvalidRequest` naming the offending ``param``.
Query strings are checked as the client sent them and forwarded unchanged, never rebuilt.
"""

from __future__ import annotations

import json
import re
import typing as t
from dataclasses import dataclass
from urllib.parse import parse_qsl

from ..errors import InvalidRequest, RequestTooLarge, RouteNotFound

__all__ = [
    "ConversationPath",
    "CreateFields",
    "ObjectPath",
    "ResponsePath",
    "RetrieveQuery",
    "check_response_id",
    "create_fields",
    "parse_conversation_path",
    "parse_create_body",
    "parse_object_path",
    "named_ids",
    "named_in",
    "parse_json_object",
    "parse_response_path",
    "parse_retrieve_query",
    "websocket_model",
    "with_model",
]

#: Response ids as OpenAI issues them (``resp_`` + hex) and as compatible servers do: a token that
#: cannot become another path, query, fragment or header upstream.
RESPONSE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")

# 19 digits hold any non-negative int64 prefix and bound the work of parsing it.
_STARTING_AFTER = re.compile(r"[0-9]{1,19}")

_SUB_ACTIONS = {"cancel": "cancel", "input_items": "input_items"}


def check_response_id(value: str, param: str = "response_id", kind: str = "response") -> str:
    """Return ``value`` if it is a safe id (of a ``kind`` of object), else raise naming ``param``."""
    if not RESPONSE_ID.fullmatch(value):
        shown = value if len(value) <= 64 and value.isprintable() else "the given value"
        examples = {"conversation": "conv_abc123", "item": "msg_abc123", "object": "file-abc123"}
        example = examples.get(kind, "resp_abc123")
        raise InvalidRequest(
            f"Invalid '{param}': {shown!r} is not a {kind} id. Such ids are 1 to 128 letters,"
            f" digits, '_' or '-' (for example '{example}').",
            param=param,
        )
    return value


@dataclass(frozen=True)
class ResponsePath:
    """What a path below ``/responses/`` asks for."""

    action: t.Literal["item", "cancel", "input_items"]
    response_id: str


def parse_response_path(subpath: str) -> ResponsePath:
    """Parse ``{id}``, ``{id}/cancel`` or ``{id}/input_items`` (the part after ``/responses/``)."""
    head, sep, tail = subpath.partition("/")
    if sep and tail in _SUB_ACTIONS:
        return ResponsePath(t.cast(t.Any, _SUB_ACTIONS[tail]), check_response_id(head))
    return ResponsePath("item", check_response_id(subpath))


@dataclass(frozen=True)
class ConversationPath:
    """What a path below ``/conversations/`` asks for: the conversation, its items, or one item."""

    conversation_id: str
    items: bool = False
    item_id: str | None = None


def parse_conversation_path(subpath: str) -> ConversationPath:
    """Parse ``{id}``, ``{id}/items`` or ``{id}/items/{item_id}`` (the part after ``/conversations/``)."""
    parts = subpath.split("/")
    conversation_id = check_response_id(parts[0], "conversation_id", "conversation")
    if len(parts) == 1:
        return ConversationPath(conversation_id)
    if parts[1] == "items" and len(parts) <= 3:
        item = check_response_id(parts[2], "item_id", "item") if len(parts) == 3 else None
        return ConversationPath(conversation_id, items=True, item_id=item)
    raise RouteNotFound(
        "Unknown conversation route. The routes are /conversations/{id}, /conversations/{id}/items and"
        " /conversations/{id}/items/{item_id}."
    )


@dataclass(frozen=True)
class ObjectPath:
    """What a path below ``/{family}/`` asks for: an object (``vs_1``), and a route below it
    (``/files/file-2``, ``/content``, ``/cancel``), each segment a safe token."""

    object_id: str
    rest: str = ""

    @property
    def downloads(self) -> bool:
        """The route is an object's content (``/files/{id}/content``, a container file's)."""
        return self.rest.endswith("/content")


_SEGMENT = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def parse_object_path(subpath: str) -> ObjectPath:
    """Parse ``{id}`` and ``{id}/{segment}/...`` (the part after ``/{family}/``)."""
    head, _, tail = subpath.partition("/")
    object_id = check_response_id(head, "id", "object")
    segments = tail.split("/") if tail else []
    if any(not _SEGMENT.fullmatch(segment) or segment in (".", "..") for segment in segments):
        raise InvalidRequest(
            "The path below the object's id has a segment that is not a plain name or id. Use ids and"
            " names of letters, digits, '_', '.' and '-' only.",
            param=None,
        )
    return ObjectPath(object_id, "".join("/" + segment for segment in segments))


@dataclass(frozen=True)
class RetrieveQuery:
    """The query parameters of ``GET /responses/{id}`` that the proxy acts on."""

    stream: bool
    starting_after: int | None


def _single(pairs: list[tuple[str, str]], name: str) -> str | None:
    values = [v for k, v in pairs if k == name]
    if len(values) > 1:
        raise InvalidRequest(f"'{name}' was given {len(values)} times; give it at most once.", param=name)
    return values[0] if values else None


def _parse_pairs(query_string: bytes) -> list[tuple[str, str]]:
    try:
        text = query_string.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidRequest(
            "The query string is not valid: percent-encode every non-ASCII character.", param=None
        ) from None
    return parse_qsl(text, keep_blank_values=True)


def parse_retrieve_query(query_string: bytes) -> RetrieveQuery:
    """Check ``stream`` and ``starting_after``; other parameters are the upstream's to judge."""
    pairs = _parse_pairs(query_string)
    stream_raw = _single(pairs, "stream")
    if stream_raw is None or stream_raw == "false":
        stream = False
    elif stream_raw == "true":
        stream = True
    else:
        raise InvalidRequest(
            f"Invalid value for 'stream': {stream_raw[:32]!r}. Expected 'true' or 'false'.", param="stream"
        )
    after_raw = _single(pairs, "starting_after")
    starting_after = None
    if after_raw is not None:
        if not _STARTING_AFTER.fullmatch(after_raw):
            raise InvalidRequest(
                f"Invalid value for 'starting_after': {after_raw[:32]!r}. Expected a non-negative integer"
                " sequence number of at most 19 digits (the last event you received).",
                param="starting_after",
            )
        starting_after = int(after_raw)
    return RetrieveQuery(stream=stream, starting_after=starting_after)


def websocket_model(query_string: bytes) -> str | None:
    """The ``model`` a WebSocket handshake names in its query (``?model=``), if any."""
    model = _single(_parse_pairs(query_string), "model")
    if model is not None and not model.strip():
        raise InvalidRequest("Invalid value for 'model': it must not be empty.", param="model")
    return model


#: The most JSON values (counted by their separators and containers) a request body may make: the
#: memory of a parsed body grows with them, some 50-100 bytes each, whatever the body's size. Far
#: above any real request (two million is several times any model's context), far below what a
#: 60 MiB body of tiny items would build (over 1.5 GB).
MAX_JSON_VALUES = 2_000_000


def _no_constant(name: str) -> t.NoReturn:
    raise ValueError(name)


def parse_json_object(body: bytes) -> dict[str, t.Any]:
    """Decode a request body that must be a JSON object, as strictly as RFC 8259 reads it.

    UTF-8 only, without a byte order mark, and without ``NaN`` or ``Infinity``: what Python would
    accept beyond that, a stricter upstream could read differently from the proxy.
    """
    values = body.count(b",") + body.count(b"[") + body.count(b"{")  # C speed: ~1 ms per 10 MB
    if values > MAX_JSON_VALUES:
        raise RequestTooLarge(
            f"The request body holds more than {MAX_JSON_VALUES:,} JSON values, more than any model"
            " takes and more memory than the proxy spends on one request. Send a shorter input."
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(
            "The request body is not valid UTF-8. Send the JSON object encoded as UTF-8.", param=None
        ) from None
    if text.startswith("\ufeff"):
        raise InvalidRequest(
            "The request body starts with a byte order mark, which JSON does not allow. Send it without one.",
            param=None,
        )
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidRequest(
            "The JSON body of your request is nested too deeply to be read. Flatten it.", param=None
        ) from None
    except ValueError as exc:
        if str(exc) in ("NaN", "Infinity", "-Infinity"):
            raise InvalidRequest(
                f"The JSON body of your request holds {exc}, which JSON does not allow. Send a number"
                " or null instead.",
                param=None,
            ) from None
        raise InvalidRequest(
            "We could not parse the JSON body of your request. Send a JSON object with"
            " 'Content-Type: application/json'.",
            param=None,
        ) from None
    if not isinstance(value, dict):
        raise InvalidRequest(
            f"The request body must be a JSON object, not a JSON {type(value).__name__}.", param=None
        )
    return value


@dataclass(frozen=True, slots=True)
class CreateFields:
    """The fields of a create request the proxy acts on; every other field passes through untouched."""

    model: str | None = None
    stream: bool | None = None
    background: bool | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, t.Any] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: dict[str, t.Any] | None = None
    include: list[str] | None = None
    stream_options: dict[str, t.Any] | None = None
    named: tuple[str, ...] = ()
    """The files, vector stores and containers the body names anywhere (:func:`named_ids`)."""

    @property
    def conversation_id(self) -> str | None:
        """The conversation the create reads and extends (``conversation`` is an id or ``{"id": ...}``)."""
        value = self.conversation
        return value.get("id") if isinstance(value, dict) else value

    @property
    def comparison_response_id(self) -> str | None:
        """``prompt_cache_options.comparison_response_id``: another response the create names."""
        options = self.prompt_cache_options or {}
        value = options.get("comparison_response_id")
        return value if isinstance(value, str) else None

    @property
    def owned_ids(self) -> tuple[str, ...]:
        """Every id the create names that the caller must own, the one it continues first."""
        ids = (self.previous_response_id, self.conversation_id, self.comparison_response_id)
        return tuple(dict.fromkeys([*(i for i in ids if i is not None), *self.named]))


def _not_blank(value: str) -> str | None:
    return "it must not be empty" if not value.strip() else None


def _safe_id(value: object) -> bool:
    return isinstance(value, str) and RESPONSE_ID.fullmatch(value) is not None


def _a_response_id(value: str) -> str | None:
    return None if _safe_id(value) else "it must be a response id such as 'resp_abc123'"


def _a_conversation(value: str | dict[str, t.Any]) -> str | None:
    if _safe_id(value.get("id") if isinstance(value, dict) else value):
        return None
    return "it must be a conversation id such as 'conv_abc123', or an object with one as 'id'"


def _a_comparison(value: dict[str, t.Any]) -> str | None:
    named = value.get("comparison_response_id")
    if named is None or _safe_id(named):
        return None
    return "its comparison_response_id must be a response id such as 'resp_abc123'"


def _strings(value: list[t.Any]) -> str | None:
    return None if all(isinstance(item, str) for item in value) else "every item must be a string"


@dataclass(frozen=True, slots=True)
class _Field:
    """What one of :class:`CreateFields` may hold: JSON null, or a value of ``types`` that passes
    ``check`` (which says what is wrong, as a clause, or None)."""

    types: tuple[type, ...]
    expected: str
    check: t.Callable[[t.Any], str | None] | None = None

    def fault(self, value: object) -> str | None:
        """What is wrong with ``value`` (not null), as a clause, or None."""
        if not isinstance(value, self.types):
            return f"it is {_JSON_KINDS.get(type(value), 'an object')}"
        return self.check(value) if self.check is not None else None


#: The fields of :class:`CreateFields`, checked in this order (the first wrong one is the error).
#: Checked by hand, not by a pydantic model: validating one in a thread left 8 KB more of that
#: thread's stack resident for its life (1,000 threads that each validated a create body grew the
#: process by 21.7 KB each, against 13.5 KB), and a worker holding thousands of streams has a thread
#: for each.
_CREATE_FIELDS = {
    "model": _Field((str,), "a model name (string)", _not_blank),
    "stream": _Field((bool,), "a boolean (true or false)"),
    "background": _Field((bool,), "a boolean (true or false)"),
    "store": _Field((bool,), "a boolean (true or false)"),
    "previous_response_id": _Field((str,), "a response id (string)", _a_response_id),
    "conversation": _Field((str, dict), "a conversation id (string) or an object with one", _a_conversation),
    "prompt_cache_key": _Field((str,), "a string"),
    "prompt_cache_options": _Field((dict,), "an object", _a_comparison),
    "include": _Field((list,), "a list of strings", _strings),
    "stream_options": _Field((dict,), "an object"),
}

_JSON_KINDS = {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "an array"}


def parse_create_body(body: bytes) -> CreateFields:
    """Check the create body: a JSON object whose proxy-relevant fields have the right types."""
    return create_fields(parse_json_object(body), body)


#: Keys whose values name objects of the caller's team: files, vector stores, containers.
NAMING_KEYS = frozenset(
    {
        "file_id",
        "input_file_id",
        "file_ids",
        "vector_store_id",
        "vector_store_ids",
        "container_id",
        "container",
    }
)
# A key written with an escape (``"file\u005fid"``) is the same key: such bodies are walked too.
_NAMING_MARKS = (b'"file_id', b'_file_id"', b'"vector_store_id', b'"container', b"\\u")


def named_ids(value: object) -> tuple[str, ...]:
    """Every object id a JSON value names under :data:`NAMING_KEYS`, at any depth, each once.

    A code interpreter's ``container`` may be an id or an object (``{"type": "auto", "file_ids":
    [...]}``), whose ids count too. An id that is not a safe token is refused, naming its key.
    """
    found: dict[str, None] = {}
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
            continue
        if not isinstance(item, dict):
            continue
        for key, inner in item.items():
            if key in NAMING_KEYS and isinstance(inner, str | list):
                for candidate in inner if isinstance(inner, list) else [inner]:
                    if isinstance(candidate, str):
                        found[check_response_id(candidate, key, "object")] = None
            elif isinstance(inner, dict | list):
                stack.append(inner)
    return tuple(found)


def named_in(obj: dict[str, t.Any], raw: bytes) -> tuple[str, ...]:
    """:func:`named_ids` of a JSON object whose bytes are ``raw``: walked only where one of
    :data:`NAMING_KEYS` appears in them (a scan at C speed instead of a walk of the object)."""
    return named_ids(obj) if any(mark in raw for mark in _NAMING_MARKS) else ()


def create_fields(obj: dict[str, t.Any], raw: bytes | None = None) -> CreateFields:
    """The proxy-relevant fields of a create (a body, or a WebSocket ``response.create``), checked.

    :param raw: the object's bytes, when at hand: the ids it names are looked for only where one
        of :data:`NAMING_KEYS` appears in them (a scan at C speed instead of a walk of the object).
    """
    named = named_ids(obj) if raw is None else named_in(obj, raw)
    found: dict[str, t.Any] = {}
    for name, field in _CREATE_FIELDS.items():
        value = obj.get(name)
        if value is None:
            continue
        wrong = field.fault(value)
        if wrong is not None:
            raise InvalidRequest(
                f"Invalid value for '{name}': {wrong}. Expected {field.expected}.", param=name
            )
        found[name] = value
    return CreateFields(**found, named=named)


def with_model(body: bytes, model: str) -> bytes:
    """The create body with ``model`` replaced, for a route that knows the model by another name.

    The only place the proxy re-serialises a body: an alias cannot be applied otherwise. The body
    was already checked by :func:`parse_json_object`. A lone surrogate the client escaped
    (``"\\ud800"``) cannot be written as UTF-8, so then every non-ASCII character is escaped.
    """
    obj = json.loads(body)
    obj["model"] = model
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":")).encode("ascii")
