"""Chat completions, completions, embeddings, moderations, images and audio: the stateless
endpoints, as pure functions of a request body (the handler writes them, as JSON, a chunk stream or
bytes).

A chat completion's reply cycles through the words of its messages, like a response's; streamed, it
is one ``chat.completion.chunk`` per word, a last chunk with ``finish_reason``, with
``stream_options.include_usage`` a chunk with the usage and no choices, then ``data: [DONE]``.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import time
import typing as t

from .config import Faults
from .errors import ApiError
from .events import JsonDict, count_tokens, delta_texts, dumps, input_text, new_id, served_tier

__all__ = ["ChatPlan", "embeddings", "image_generation", "moderations", "speech", "transcription"]


def _text(messages: object) -> str:
    if not isinstance(messages, list) or not messages:
        raise ApiError(
            400,
            "Missing required parameter: 'messages'.",
            param="messages",
            code="missing_required_parameter",
        )
    return input_text(messages)


_NO_FAULTS = Faults()


class ChatPlan:
    """One chat completion (or completion) to answer: its words, and its shape as JSON or chunks."""

    def __init__(
        self, body: t.Mapping[str, t.Any], words: int, *, legacy: bool = False, faults: Faults = _NO_FAULTS
    ) -> None:
        self.legacy = legacy
        self.faults = faults
        self.tier = body.get("service_tier")
        text = input_text(body.get("prompt")) if legacy else _text(body.get("messages"))
        self.id = new_id("cmpl-" if legacy else "chatcmpl-")
        self.model = body.get("model")
        self.created = int(time.time())
        self.deltas = delta_texts(text, words)
        self.prompt_tokens = count_tokens(text)
        self.completion_tokens = len(self.deltas)
        options = body.get("stream_options")
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True

    @property
    def usage(self) -> JsonDict:
        """The usage in chat's names, ``sim_cached_tokens`` and ``sim_reasoning_tokens`` in its details."""
        reasoning = self.faults.reasoning_tokens
        prompt, completion = self.prompt_tokens, self.completion_tokens + reasoning
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": min(self.faults.cached_tokens, prompt)},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        }

    def _envelope(self, obj: str) -> JsonDict:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "service_tier": served_tier(self.tier),
        }

    def completion(self) -> JsonDict:
        """The whole answer (``stream`` false)."""
        text = "".join(self.deltas)
        if self.legacy:
            choice: JsonDict = {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
            return {**self._envelope("text_completion"), "choices": [choice], "usage": self.usage}
        message = {"role": "assistant", "content": text, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
        return {**self._envelope("chat.completion"), "choices": [choice], "usage": self.usage}

    def chunks(self) -> list[bytes]:
        """The streamed answer: each chunk's JSON, then ``[DONE]``."""
        obj = "text_completion" if self.legacy else "chat.completion.chunk"
        out: list[bytes] = []
        for index, piece in enumerate([*self.deltas, None]):
            finish = "stop" if piece is None else None
            if self.legacy:
                choice: JsonDict = {
                    "index": 0,
                    "text": piece or "",
                    "logprobs": None,
                    "finish_reason": finish,
                }
            else:
                delta: JsonDict = {} if piece is None else {"content": piece}
                if index == 0:
                    delta["role"] = "assistant"
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            out.append(dumps({**self._envelope(obj), "choices": [choice]}))
        if self.include_usage:
            out.append(dumps({**self._envelope(obj), "choices": [], "usage": self.usage}))
        out.append(b"[DONE]")
        return out


def _vector(text: str, dimensions: int) -> list[float]:
    """A deterministic unit-ish vector for ``text``."""
    seed = hashlib.sha256(text.encode()).digest()
    raw = (seed * (dimensions * 4 // len(seed) + 1))[: dimensions * 4]
    return [round(v / 2**32 - 0.5, 6) for v in struct.unpack(f"<{dimensions}I", raw)]


def embeddings(body: t.Mapping[str, t.Any]) -> JsonDict:
    value = body.get("input")
    given = value if isinstance(value, list) else [value]
    inputs: list[str] = [i for i in given if isinstance(i, str)]
    if not inputs or len(inputs) != len(given):
        raise ApiError(
            400, "Invalid type for 'input': expected a string or an array of strings.", param="input"
        )
    dimensions = body.get("dimensions", 8)
    if not isinstance(dimensions, int) or not 1 <= dimensions <= 3072:
        raise ApiError(400, "Invalid value for 'dimensions'.", param="dimensions")
    data = [
        {"object": "embedding", "index": n, "embedding": _vector(text, dimensions)}
        for n, text in enumerate(inputs)
    ]
    tokens = sum(count_tokens(text) for text in inputs)
    return {
        "object": "list",
        "data": data,
        "model": body.get("model"),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def moderations(body: t.Mapping[str, t.Any]) -> JsonDict:
    value = body.get("input")
    inputs = value if isinstance(value, list) else [value]
    results = [{"flagged": False, "categories": {}, "category_scores": {}} for _ in inputs]
    return {"id": new_id("modr-"), "model": body.get("model") or "omni-moderation-latest", "results": results}


def image_generation(body: t.Mapping[str, t.Any]) -> JsonDict:
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ApiError(
            400, "Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter"
        )
    count = body.get("n", 1)
    pixels = base64.b64encode(hashlib.sha256(prompt.encode()).digest() * 4).decode()
    tokens = count_tokens(prompt)
    return {
        "created": int(time.time()),
        "data": [
            {"b64_json": pixels} for _ in range(count if isinstance(count, int) and 0 < count <= 10 else 1)
        ],
        "usage": {"input_tokens": tokens, "output_tokens": 0, "total_tokens": tokens},
    }


def speech(body: t.Mapping[str, t.Any]) -> bytes:
    """Audio bytes for ``input``: an ID3 header and bytes that follow from the text, 1 KiB a word."""
    text = body.get("input")
    if not isinstance(text, str) or not text:
        raise ApiError(
            400, "Missing required parameter: 'input'.", param="input", code="missing_required_parameter"
        )
    seed = hashlib.sha256(text.encode()).digest()
    return b"ID3" + seed * (32 * max(1, len(text.split())))


def transcription(body: bytes) -> JsonDict:
    """The text of an uploaded recording: how many bytes it had (the multipart body's, roughly)."""
    return {"text": f"a recording of {len(body)} bytes", "usage": {"type": "duration", "seconds": 1}}
