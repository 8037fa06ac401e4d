"""The Conversations API: conversations and their items, kept in memory.

Routes (below the flavor's prefix): ``POST /conversations``; ``GET``, ``POST`` (metadata) and
``DELETE /conversations/{id}``; ``POST`` and ``GET /conversations/{id}/items`` (``after``, ``limit``,
``order``); ``GET`` and ``DELETE /conversations/{id}/items/{item_id}``. A create that names a
``conversation`` reads its items as earlier input and appends its own input, then its output once
it completes, as OpenAI's does.
"""

from __future__ import annotations

import threading
import time
import typing as t
from dataclasses import dataclass, field

from .errors import ApiError
from .events import JsonDict, input_items, new_id

__all__ = ["Conversations", "conversation_not_found", "page"]


def conversation_not_found(conversation_id: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"Conversation with id '{conversation_id}' not found.", param=param)


def page(items: list[JsonDict], args: t.Mapping[str, str], default_order: str = "desc") -> JsonDict:
    """One page of a list answer, by ``after``, ``limit`` (1-100) and ``order``."""
    raw_limit = args.get("limit", "20")
    if not (raw_limit.isascii() and raw_limit.isdigit() and 1 <= int(raw_limit) <= 100):
        raise ApiError(
            400,
            f"Invalid value for 'limit': expected an integer between 1 and 100, but got {raw_limit!r}.",
            param="limit",
            code="invalid_value",
        )
    order = args.get("order", default_order)
    if order not in ("asc", "desc"):
        raise ApiError(
            400,
            f"Invalid value for 'order': expected one of 'asc', 'desc', but got {order!r}.",
            param="order",
            code="invalid_value",
        )
    ordered = list(reversed(items)) if order == "desc" else list(items)
    after = args.get("after")
    if after:
        ids = [item["id"] for item in ordered]
        ordered = ordered[ids.index(after) + 1 :] if after in ids else []
    limit = int(raw_limit)
    data = ordered[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(ordered) > limit,
    }


@dataclass
class _Conversation:
    id: str
    created_at: int
    metadata: JsonDict
    items: list[JsonDict] = field(default_factory=list)

    def public(self) -> JsonDict:
        return {
            "id": self.id,
            "object": "conversation",
            "created_at": self.created_at,
            "metadata": self.metadata,
        }


def _items(value: object) -> list[JsonDict]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ApiError(
            400, "Invalid type for 'items': expected an array.", param="items", code="invalid_type"
        )
    return input_items(value)


def _metadata(body: t.Mapping[str, t.Any]) -> JsonDict:
    metadata = body.get("metadata")
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ApiError(
            400,
            "Invalid type for 'metadata': expected an object of strings.",
            param="metadata",
            code="invalid_type",
        )
    return metadata


class Conversations:
    """Every conversation by id (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, _Conversation] = {}

    def _get(self, conversation_id: str, param: str | None = None) -> _Conversation:
        found = self._by_id.get(conversation_id)
        if found is None:
            raise conversation_not_found(conversation_id, param)
        return found

    def create(self, body: t.Mapping[str, t.Any]) -> JsonDict:
        conversation = _Conversation(
            new_id("conv_"), int(time.time()), _metadata(body), _items(body.get("items"))
        )
        with self._lock:
            self._by_id[conversation.id] = conversation
        return conversation.public()

    def retrieve(self, conversation_id: str) -> JsonDict:
        with self._lock:
            return self._get(conversation_id).public()

    def update(self, conversation_id: str, body: t.Mapping[str, t.Any]) -> JsonDict:
        metadata = _metadata(body)
        with self._lock:
            conversation = self._get(conversation_id)
            conversation.metadata = metadata
            return conversation.public()

    def delete(self, conversation_id: str) -> JsonDict:
        with self._lock:
            self._get(conversation_id)
            del self._by_id[conversation_id]
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}

    def add_items(self, conversation_id: str, value: object, param: str | None = None) -> list[JsonDict]:
        items = _items(value)
        with self._lock:
            self._get(conversation_id, param).items.extend(items)
        return items

    def items(self, conversation_id: str, param: str | None = None) -> list[JsonDict]:
        with self._lock:
            return list(self._get(conversation_id, param).items)

    def item(self, conversation_id: str, item_id: str) -> JsonDict:
        with self._lock:
            for item in self._get(conversation_id).items:
                if item["id"] == item_id:
                    return item
        raise ApiError(404, f"Item with id '{item_id}' not found.")

    def delete_item(self, conversation_id: str, item_id: str) -> JsonDict:
        with self._lock:
            conversation = self._get(conversation_id)
            kept = [item for item in conversation.items if item["id"] != item_id]
            if len(kept) == len(conversation.items):
                raise ApiError(404, f"Item with id '{item_id}' not found.")
            conversation.items = kept
            return conversation.public()

    def append_output(self, conversation_id: str, output: list[JsonDict]) -> None:
        """A response that named the conversation completed: its output joins the items."""
        with self._lock:
            found = self._by_id.get(conversation_id)
            if found is not None:
                found.items.extend(output)
