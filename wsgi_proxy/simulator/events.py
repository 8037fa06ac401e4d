"""Pure builders for Response objects, input items and stream event payloads.

Nothing here does I/O or sleeps: :func:`iter_steps` yields the events of one response in order and the
store decides when each one happens.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
import time
import typing as t
from dataclasses import dataclass

__all__ = [
    "Plan",
    "Step",
    "cancelled_snapshot",
    "count_tokens",
    "delta_texts",
    "dumps",
    "failed_event",
    "input_items",
    "input_text",
    "iter_steps",
    "new_id",
    "response_object",
    "strip_obfuscation",
    "usage",
]

JsonDict = dict[str, t.Any]

LOREM = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore"
).split()

# Characters that break naive SSE handling: U+2028/U+2029/U+0085 are line breaks for str.splitlines(),
# Cyrillic and the emoji are multi-byte in UTF-8 and get split across writes.
UNICODE_WORDS = ("хорошо", "line\u2028sep", "para\u2029sep", "next\u0085line", "emoji\U0001f642", "漢字")

SERVER_ERROR_MESSAGE = "The server had an error while processing your request. Sorry about that!"

# Create-body fields echoed into the Response object, with the value the API reports when omitted.
_ECHOED_FIELDS: dict[str, t.Any] = {
    "instructions": None,
    "max_output_tokens": None,
    "max_tool_calls": None,
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "prompt_cache_key": None,
    "reasoning": {"effort": None, "summary": None},
    "safety_identifier": None,
    "service_tier": "auto",
    "temperature": 1.0,
    "text": {"format": {"type": "text"}, "verbosity": "medium"},
    "tool_choice": "auto",
    "tools": [],
    "top_logprobs": 0,
    "top_p": 1.0,
    "truncation": "disabled",
    "user": None,
    "metadata": {},
}


def new_id(prefix: str) -> str:
    """Return an OpenAI-looking id: ``prefix`` followed by 48 hex characters."""
    return prefix + secrets.token_hex(24)


def dumps(payload: object) -> bytes:
    """Encode ``payload`` the way the API does on the wire: compact JSON, raw UTF-8."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def input_text(value: object) -> str:
    """Flatten a create ``input`` (a string or a list of items) into plain text."""
    if isinstance(value, str):
        return value
    parts: list[str] = []
    if isinstance(value, list):
        for item in value:
            if isinstance(item, str):
                parts.append(item)
            elif isinstance(item, dict):
                content = item.get("content", item.get("output"))
                if isinstance(content, str):
                    parts.append(content)
                elif isinstance(content, list):
                    parts.extend(
                        p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
                    )
    return " ".join(parts)


def input_items(value: object) -> list[JsonDict]:
    """Return the stored input items of a create ``input``, each with an ``id``."""
    if value is None:
        return []
    raw = [{"role": "user", "content": value}] if isinstance(value, str) else value
    items: list[JsonDict] = []
    for entry in raw if isinstance(raw, list) else []:
        if not isinstance(entry, dict):
            continue
        item = dict(entry)
        item.setdefault("type", "message")
        if item["type"] == "message":
            if isinstance(item.get("content"), str):
                item["content"] = [{"type": "input_text", "text": item["content"]}]
            item.setdefault("status", "completed")
        item.setdefault("id", new_id("msg_"))
        items.append(item)
    return items


def count_tokens(text: str) -> int:
    """A rough token count: one token per four characters, at least one."""
    return max(1, (len(text) + 3) // 4)


def usage(input_tokens: int, output_tokens: int, *, cached: int = 0, reasoning: int = 0) -> JsonDict:
    """A Response's usage: ``cached`` of the input tokens came from the cache (at most all of them),
    and ``reasoning`` tokens were spent on top of the ``output_tokens`` of the reply."""
    output = output_tokens + reasoning
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": min(cached, input_tokens)},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": input_tokens + output,
    }


def served_tier(requested: object) -> str:
    """The ``service_tier`` a finished response reports: the tier asked for, ``default`` for ``auto``."""
    return requested if isinstance(requested, str) and requested != "auto" else "default"


def delta_texts(text: str, words: int, delta_bytes: int | None = None, unicode: bool = False) -> list[str]:
    """Return the ``delta`` strings of a reply to ``text``.

    The reply cycles through the words of the input (or lorem ipsum when it has none), so the
    assembled text is predictable. ``delta_bytes`` pads each delta to about that many bytes;
    ``unicode`` uses words full of line-separator and multi-byte characters instead.
    """
    source: t.Sequence[str] = UNICODE_WORDS if unicode else (re.findall(r"\S+", text) or LOREM)
    deltas: list[str] = []
    for i in range(words):
        word = source[i % len(source)]
        piece = word if i == 0 else " " + word
        if delta_bytes is not None:
            unit = " " + word
            padded = piece + unit * (delta_bytes // len(unit.encode()) + 1)
            # Cut on a byte boundary, dropping a multi-byte character that would straddle it.
            piece = padded.encode()[:delta_bytes].decode(errors="ignore")
        deltas.append(piece)
    return deltas


def response_object(
    *,
    response_id: str,
    body: t.Mapping[str, t.Any],
    status: str,
    background: bool,
    created_at: int | None = None,
) -> JsonDict:
    """Build the Response object for a create ``body`` (output empty, no usage yet)."""
    response: JsonDict = {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()) if created_at is None else created_at,
        "status": status,
        "background": background,
        "completed_at": None,
        "error": None,
        "incomplete_details": None,
    }
    for name, default in _ECHOED_FIELDS.items():
        value = body.get(name)
        response[name] = default if value is None else value
    response["model"] = body.get("model")
    response["output"] = []
    response["store"] = body.get("store", True) is not False
    response["usage"] = None
    return response


def cancelled_snapshot(response: t.Mapping[str, t.Any]) -> JsonDict:
    return {**response, "status": "cancelled", "output": [], "usage": None}


def failed_event(seq: int, response: JsonDict) -> JsonDict:
    return {"type": "response.failed", "sequence_number": seq, "response": response}


def strip_obfuscation(data: bytes) -> bytes:
    """Re-encode one delta event's JSON without its ``obfuscation`` field."""
    payload = json.loads(data)
    if isinstance(payload, dict) and "obfuscation" in payload:
        del payload["obfuscation"]
        return dumps(payload)
    return data


def _obfuscation() -> str:
    # The API pads deltas with a random string so their lengths leak nothing; any random text will do.
    return secrets.token_urlsafe(12)[: 1 + secrets.randbelow(15)]


@dataclass(frozen=True)
class Plan:
    """Everything :func:`iter_steps` needs to generate one response."""

    response: JsonDict
    """The initial snapshot (status ``queued`` when background, else ``in_progress``)."""
    deltas: list[str]
    input_tokens: int
    obfuscate: bool = True
    keepalive_every: int | None = None
    keepalive_first: bool = False
    error: t.Literal["flat", "nested"] | None = None
    error_at: int | None = None
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    web_search_calls: int = 0


class Step(t.NamedTuple):
    """One generated event and, when it changed, the Response snapshot after it."""

    payload: JsonDict
    snapshot: JsonDict | None
    terminal: bool


def _planned_events(plan: Plan) -> tuple[int, t.Iterator[t.Callable[[int], Step]]]:
    """How many regular text-reply events there are, and the events in order, each waiting for its
    sequence number.

    The delta builders are made one at a time: a response of a thousand words waiting in a thousand
    concurrent streams would otherwise hold a million functions for the garbage collector to traverse.
    """
    base = plan.response
    item_id = new_id("msg_")
    text = "".join(plan.deltas)
    in_progress = {**base, "status": "in_progress"}

    def lifecycle(kind: str, snapshot: JsonDict) -> t.Callable[[int], Step]:
        return lambda seq: Step({"type": kind, "sequence_number": seq, "response": snapshot}, snapshot, False)

    def item(status: str, parts: list[JsonDict]) -> JsonDict:
        return {"id": item_id, "type": "message", "status": status, "content": parts, "role": "assistant"}

    def part(value: str) -> JsonDict:
        return {"type": "output_text", "annotations": [], "logprobs": [], "text": value}

    def simple(kind: str, **fields: t.Any) -> t.Callable[[int], Step]:
        return lambda seq: Step({"type": kind, "sequence_number": seq, **fields}, None, False)

    def delta(value: str) -> t.Callable[[int], Step]:
        def build(seq: int) -> Step:
            payload: JsonDict = {
                "type": "response.output_text.delta",
                "sequence_number": seq,
                "item_id": item_id,
                "output_index": 0,
                "content_index": 0,
                "delta": value,
                "logprobs": [],
            }
            if plan.obfuscate:
                payload["obfuscation"] = _obfuscation()
            return Step(payload, None, False)

        return build

    searches = [
        {"type": "web_search_call", "id": new_id("ws_"), "status": "completed", "action": {"type": "search"}}
        for _ in range(plan.web_search_calls)
    ]

    def completed(seq: int) -> Step:
        snapshot = {
            **base,
            "status": "completed",
            "completed_at": int(time.time()),
            "output": [*searches, item("completed", [part(text)])],
            "usage": usage(
                plan.input_tokens,
                len(plan.deltas),
                cached=plan.cached_tokens,
                reasoning=plan.reasoning_tokens,
            ),
            "service_tier": served_tier(base.get("service_tier")),
        }
        return Step(
            {"type": "response.completed", "sequence_number": seq, "response": snapshot}, snapshot, True
        )

    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    head = [lifecycle("response.created", base)]
    if base.get("background"):
        head.append(lifecycle("response.queued", base))
    head += [
        lifecycle("response.in_progress", in_progress),
        simple("response.output_item.added", output_index=0, item=item("in_progress", [])),
        simple("response.content_part.added", **where, part=part("")),
    ]
    tail = [
        simple("response.output_text.done", **where, text=text, logprobs=[]),
        simple("response.content_part.done", **where, part=part(text)),
        simple("response.output_item.done", output_index=0, item=item("completed", [part(text)])),
        completed,
    ]
    deltas = (delta(d) for d in plan.deltas)
    return len(head) + len(plan.deltas) + len(tail), itertools.chain(head, deltas, tail)


def _error_steps(plan: Plan, seq: int) -> list[Step]:
    if plan.error == "nested":
        body = {
            "type": "server_error",
            "code": "server_error",
            "message": SERVER_ERROR_MESSAGE,
            "param": None,
        }
        error: JsonDict = {"type": "error", "error": body, "sequence_number": seq}
    else:
        error = {
            "type": "error",
            "code": "server_error",
            "message": SERVER_ERROR_MESSAGE,
            "param": None,
            "sequence_number": seq,
        }
    failed = {
        **plan.response,
        "status": "failed",
        "error": {"code": "server_error", "message": SERVER_ERROR_MESSAGE},
    }
    return [Step(error, None, False), Step(failed_event(seq + 1, failed), failed, True)]


def iter_steps(plan: Plan) -> t.Iterator[Step]:
    """Yield the events of one response with gap-free sequence numbers from 0.

    Keepalives consume sequence numbers like any event. An injected error replaces the event that
    would have had sequence number ``plan.error_at`` (or the terminal event) and is followed by
    ``response.failed``.
    """
    seq = 0
    if plan.keepalive_first:
        yield Step({"type": "keepalive", "sequence_number": seq}, None, False)
        seq += 1
    count, planned = _planned_events(plan)
    for index, build in enumerate(planned):
        last = index == count - 1
        if plan.error is not None and (last or (plan.error_at is not None and seq >= plan.error_at)):
            yield from _error_steps(plan, seq)
            return
        yield build(seq)
        seq += 1
        if plan.keepalive_every and (index + 1) % plan.keepalive_every == 0 and not last:
            if plan.error is not None and plan.error_at is not None and seq >= plan.error_at:
                continue
            yield Step({"type": "keepalive", "sequence_number": seq}, None, False)
            seq += 1
