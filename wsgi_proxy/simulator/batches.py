"""The Batch API, as far as it has state: a batch names an uploaded input file, can be read,
listed and cancelled. Batches do not run here: they stay ``validating`` until cancelled, but one
created with ``metadata: {"sim_complete": "1"}`` is ``completed`` at once, with an output file (a
line per input line) the simulator makes itself."""

from __future__ import annotations

import threading
import time
import typing as t

from .errors import ApiError
from .events import JsonDict, new_id
from .files import Files

__all__ = ["Batches"]

_ENDPOINTS = frozenset({"/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/completions"})


class Batches:
    """Every batch by id (thread-safe), checked against the files they name."""

    def __init__(self, files: Files) -> None:
        self._files = files
        self._lock = threading.Lock()
        self._by_id: dict[str, JsonDict] = {}

    def create(self, body: t.Mapping[str, t.Any]) -> JsonDict:
        input_file_id = body.get("input_file_id")
        if not isinstance(input_file_id, str):
            raise ApiError(400, "Missing required parameter: 'input_file_id'.", param="input_file_id")
        self._files.get(input_file_id)  # the 404 of a file that does not exist
        endpoint = body.get("endpoint")
        if endpoint not in _ENDPOINTS:
            raise ApiError(400, f"Invalid value for 'endpoint': {endpoint!r}.", param="endpoint")
        batch: JsonDict = {
            "id": new_id("batch_"),
            "object": "batch",
            "endpoint": endpoint,
            "input_file_id": input_file_id,
            "completion_window": body.get("completion_window", "24h"),
            "status": "validating",
            "created_at": int(time.time()),
            "metadata": body.get("metadata"),
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
        }
        metadata = body.get("metadata")
        if isinstance(metadata, dict) and metadata.get("sim_complete") == "1":
            lines = b"".join(self._files.content(input_file_id)).splitlines()
            output = b"".join(
                b'{"id": "batch_req_%d", "response": {"status_code": 200}}\n' % n for n in range(len(lines))
            )
            made = self._files.add(output, "batch_output.jsonl", "batch_output")
            batch |= {"status": "completed", "output_file_id": made["id"], "completed_at": int(time.time())}
            batch["request_counts"] = {"total": len(lines), "completed": len(lines), "failed": 0}
        with self._lock:
            self._by_id[batch["id"]] = batch
        return batch

    def get(self, batch_id: str) -> JsonDict:
        with self._lock:
            found = self._by_id.get(batch_id)
        if found is None:
            raise ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id")
        return found

    def cancel(self, batch_id: str) -> JsonDict:
        batch = self.get(batch_id)
        with self._lock:
            batch["status"] = "cancelled"
            batch["cancelled_at"] = int(time.time())
            return batch

    def listing(self) -> JsonDict:
        with self._lock:
            data = list(self._by_id.values())
        return {"object": "list", "data": data, "first_id": None, "last_id": None, "has_more": False}
