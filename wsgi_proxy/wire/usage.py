"""What a response used, read from its ``usage`` and its output items, as pure functions.

Every counter the API reports, from every shape it reports them in: a Response's ``usage``
(``input_tokens_details``, ``output_tokens_details``), a chat completion's or an embedding's
(``prompt_tokens``, ``completion_tokens`` and their details), an image's (``input_tokens_details.
image_tokens``), and the tool calls a Response's ``output`` holds (web search, file search, code
interpreter, image generation), which are priced per call. Nothing here raises: a payload of
another shape yields nothing, a detail of the wrong type counts as 0.
"""

from __future__ import annotations

import dataclasses
import typing as t
from dataclasses import dataclass

__all__ = ["COUNTERS", "TOOL_CALLS", "Usage", "usage_of"]

#: A Response's output item types that are billed per call, and the counter each one adds to.
TOOL_CALLS = {
    "web_search_call": "web_search_calls",
    "file_search_call": "file_search_calls",
    "code_interpreter_call": "code_interpreter_calls",
    "image_generation_call": "image_generation_calls",
}


@dataclass(frozen=True, slots=True)
class Usage:
    """What one response used. The detailed token counts are parts of ``input_tokens`` (cached,
    cache writes, images, audio) and of ``output_tokens`` (reasoning, audio), as the API counts them."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    input_image_tokens: int = 0
    input_audio_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    output_audio_tokens: int = 0
    total_tokens: int = 0
    web_search_calls: int = 0
    file_search_calls: int = 0
    code_interpreter_calls: int = 0
    image_generation_calls: int = 0

    def counts(self) -> dict[str, int]:
        """Every counter, in :data:`COUNTERS` order."""
        return {name: getattr(self, name) for name in COUNTERS}

    def reported(self) -> dict[str, int]:
        """The counters a log line shows: the three totals always, the others when not 0."""
        return {name: value for name, value in self.counts().items() if value or name in _ALWAYS_REPORTED}


#: Every counter of :class:`Usage`, in the order reports show them.
COUNTERS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Usage))
_ALWAYS_REPORTED = frozenset({"input_tokens", "output_tokens", "total_tokens"})

# (counter, path in the usage object), the first path present wins; Responses' names, then chat's.
_TOKENS: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...] = (
    ("input_tokens", (("input_tokens",), ("prompt_tokens",))),
    (
        "cached_input_tokens",
        (("input_tokens_details", "cached_tokens"), ("prompt_tokens_details", "cached_tokens")),
    ),
    (
        "cache_write_tokens",
        (
            ("input_tokens_details", "cache_write_tokens"),
            ("input_tokens_details", "cache_creation_tokens"),
            ("prompt_tokens_details", "cache_write_tokens"),
            ("cache_creation_input_tokens",),
        ),
    ),
    (
        "input_image_tokens",
        (("input_tokens_details", "image_tokens"), ("prompt_tokens_details", "image_tokens")),
    ),
    (
        "input_audio_tokens",
        (("input_tokens_details", "audio_tokens"), ("prompt_tokens_details", "audio_tokens")),
    ),
    ("output_tokens", (("output_tokens",), ("completion_tokens",))),
    (
        "reasoning_tokens",
        (("output_tokens_details", "reasoning_tokens"), ("completion_tokens_details", "reasoning_tokens")),
    ),
    (
        "output_audio_tokens",
        (("output_tokens_details", "audio_tokens"), ("completion_tokens_details", "audio_tokens")),
    ),
    ("total_tokens", (("total_tokens",),)),
)


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _at(usage: t.Mapping[str, t.Any], paths: tuple[tuple[str, ...], ...]) -> int | None:
    for path in paths:
        value: object = usage
        for member in path:
            value = value.get(member) if isinstance(value, dict) else None
        if value is not None:
            return _count(value)
    return None


def usage_of(payload: t.Mapping[str, t.Any]) -> Usage | None:
    """What the object ``payload`` (a Response, chat completion, embedding or image answer) used,
    or None when it carries no usage with whole input and total counts (a response still running).

    A missing ``total_tokens`` is input plus output; a missing output (embeddings) is 0.
    """
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    counts: dict[str, int] = {}
    for name, paths in _TOKENS:
        value = _at(usage, paths)
        if value is not None:
            counts[name] = value
    if "input_tokens" not in counts:
        return None
    counts.setdefault("total_tokens", counts["input_tokens"] + counts.get("output_tokens", 0))
    output = payload.get("output")
    if isinstance(output, list):
        for item in output:
            kind = item.get("type") if isinstance(item, dict) else None
            counter = TOOL_CALLS.get(kind) if isinstance(kind, str) else None
            if counter is not None:
                counts[counter] = counts.get(counter, 0) + 1
    return Usage(**counts)
