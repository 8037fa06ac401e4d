"""What the proxy reads of Response objects, as pure functions: their id, model, tier and usage.

From a JSON answer (:func:`summary_of`) or from the ``response.created`` and ``response.completed``
events of a stream (:func:`created_id`, :func:`completed_summary`). Each reads a copy and never
raises: a payload of another shape simply yields nothing.
"""

from __future__ import annotations

import json
import re
import typing as t
from dataclasses import dataclass

from .sse import data_of
from .usage import Usage, usage_of
from .validation import RESPONSE_ID

__all__ = [
    "Summary",
    "adopted_ids",
    "chunk_summary",
    "completed_summary",
    "created_id",
    "event_summary",
    "summary_of",
]


@dataclass(frozen=True, slots=True)
class Summary:
    """A finished response's id (when it is a safe one), model, service tier and usage, each when present."""

    response_id: str | None = None
    model: str | None = None
    usage: Usage | None = None
    service_tier: str | None = None


_EMPTY = Summary()
_TIER = re.compile(r"[A-Za-z0-9_.-]{1,32}")  # a service tier is a name, such as default or flex


def _summary(response: object) -> Summary:
    if not isinstance(response, dict):
        return _EMPTY
    value, model, tier = response.get("id"), response.get("model"), response.get("service_tier")
    return Summary(
        response_id=value if isinstance(value, str) and RESPONSE_ID.fullmatch(value) else None,
        model=model if isinstance(model, str) else None,
        usage=usage_of(response),
        service_tier=tier if isinstance(tier, str) and _TIER.fullmatch(tier) else None,
    )


def _load(data: bytes | None) -> object:
    try:
        return json.loads(data or b"")
    except (ValueError, RecursionError):
        return None


def summary_of(content: bytes) -> Summary:
    """The summary of a JSON answer that is a Response object."""
    return _summary(_load(content))


def chunk_summary(data: bytes | None) -> Summary:
    """The summary of a chat completion chunk (an SSE event's data): its id, model and usage."""
    return _summary(_load(data))


def adopted_ids(content: bytes, paths: t.Iterable[str]) -> list[str]:
    """The safe ids an answer holds at ``paths`` (``output_file_id``, ``file.id``): objects the
    upstream made for an object the caller owns, such as a batch's output file."""
    found: list[str] = []
    answer = _load(content)
    for path in paths:
        value: object = answer
        for member in path.split("."):
            value = value.get(member) if isinstance(value, dict) else None
        if isinstance(value, str) and RESPONSE_ID.fullmatch(value):
            found.append(value)
    return found


def event_summary(data: bytes | None) -> Summary:
    """The summary of the response an event object carries (``response.created``, ``.completed``):
    an SSE event's data, or a WebSocket frame."""
    payload = _load(data)
    return _summary(payload.get("response") if isinstance(payload, dict) else None)


def completed_summary(event: bytes) -> Summary:
    """The summary of the response a ``response.completed`` SSE event carries (parsed once per stream)."""
    return event_summary(data_of(event))


def created_id(event: bytes) -> str | None:
    """The response id carried by a ``response.created`` SSE event, if it is a safe one."""
    return event_summary(data_of(event)).response_id
