"""The Files API: uploads kept on disk, so that one of hundreds of MB costs the simulator no memory.

``POST /files`` (``multipart/form-data`` with a ``file`` part and a ``purpose`` field) is copied to a
temporary file as it arrives, then the file part's bytes are found in it; ``GET /files`` lists every
file, ``GET /files/{id}`` is its object, ``GET /files/{id}/content`` its bytes, ``DELETE
/files/{id}`` forgets it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
import typing as t
from dataclasses import dataclass

from .errors import ApiError
from .events import JsonDict, new_id

__all__ = ["Files", "StoredFile"]

_COPY = 1024 * 1024
_HEAD = 64 * 1024
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?')
_FIELD = re.compile(rb'name="([^"]*)"(?:; filename="([^"]*)")?')


@dataclass(frozen=True)
class StoredFile:
    """One upload: where its bytes are in the copy of the request body."""

    id: str
    filename: str
    purpose: str
    created_at: int
    path: str
    offset: int
    bytes: int

    def public(self) -> JsonDict:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


def _invalid(message: str) -> ApiError:
    return ApiError(400, message, param="file")


def _parts(head: bytes, boundary: bytes) -> tuple[dict[str, bytes], int, str]:
    """The form fields before the file part, the file part's offset, and its filename."""
    fields: dict[str, bytes] = {}
    position = 0
    delimiter = b"--" + boundary
    while True:
        start = head.find(delimiter, position)
        if start < 0:
            raise _invalid("The multipart body has no 'file' part. Send the file as a part named 'file'.")
        header_end = head.find(b"\r\n\r\n", start)
        if header_end < 0:
            raise _invalid("A multipart part's headers are too long or unfinished.")
        match = _FIELD.search(head, start, header_end)
        name = match.group(1) if match else b""
        body_start = header_end + 4
        if name == b"file":
            filename = match.group(2) if match and match.group(2) is not None else b"upload"
            return fields, body_start, filename.decode("utf-8", "replace")
        end = head.find(b"\r\n" + delimiter, body_start)
        if end < 0:
            raise _invalid("A multipart field before the file is unfinished.")
        fields[name.decode("utf-8", "replace")] = head[body_start:end]
        position = end + 2


class Files:
    """Every uploaded file by id; their bytes in a temporary directory of this simulator's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, StoredFile] = {}
        self._directory = tempfile.mkdtemp(prefix="simulator-files-")

    def upload(self, rfile: t.BinaryIO, length: int, content_type: str) -> JsonDict:
        match = _BOUNDARY.search(content_type)
        if not content_type.startswith("multipart/form-data") or match is None:
            raise _invalid("Upload files as multipart/form-data.")
        boundary = match.group(1).encode()
        file_id = new_id("file-")
        path = os.path.join(self._directory, file_id)
        head = b""
        with open(path, "wb") as out:
            remaining = length
            while remaining:
                block = rfile.read(min(_COPY, remaining))
                if not block:
                    break
                if len(head) < _HEAD:
                    head += block[: _HEAD - len(head)]
                out.write(block)
                remaining -= len(block)
        fields, offset, filename = _parts(head, boundary)
        closing = b"\r\n--" + boundary + b"--"
        with open(path, "rb") as copy:
            copy.seek(max(0, length - len(closing) - 16))
            tail_at = copy.tell()
            tail = copy.read()
        end = tail.rfind(closing)
        if end < 0:
            os.unlink(path)
            raise _invalid("The multipart body is not closed by its boundary.")
        stored = StoredFile(
            file_id,
            filename,
            fields.get("purpose", b"user_data").decode("utf-8", "replace"),
            int(time.time()),
            path,
            offset,
            tail_at + end - offset,
        )
        with self._lock:
            self._by_id[file_id] = stored
        return stored.public()

    def add(self, content: bytes, filename: str, purpose: str) -> JsonDict:
        """A file the simulator makes itself (a batch's output)."""
        file_id = new_id("file-")
        path = os.path.join(self._directory, file_id)
        with open(path, "wb") as out:
            out.write(content)
        stored = StoredFile(file_id, filename, purpose, int(time.time()), path, 0, len(content))
        with self._lock:
            self._by_id[file_id] = stored
        return stored.public()

    def get(self, file_id: str) -> StoredFile:
        with self._lock:
            found = self._by_id.get(file_id)
        if found is None:
            raise ApiError(404, f"No such File object: {file_id}", param="id")
        return found

    def listing(self) -> JsonDict:
        with self._lock:
            data = [f.public() for f in self._by_id.values()]
        return {"object": "list", "data": data, "first_id": None, "last_id": None, "has_more": False}

    def delete(self, file_id: str) -> JsonDict:
        found = self.get(file_id)
        with self._lock:
            self._by_id.pop(file_id, None)
        os.unlink(found.path)
        return {"id": file_id, "object": "file", "deleted": True}

    def close(self) -> None:
        """Remove every file's bytes."""
        shutil.rmtree(self._directory, ignore_errors=True)

    def content(self, file_id: str) -> t.Iterator[bytes]:
        """The file's bytes, read from disk a block at a time."""
        found = self.get(file_id)
        with open(found.path, "rb") as copy:
            copy.seek(found.offset)
            remaining = found.bytes
            while remaining:
                block = copy.read(min(_COPY, remaining))
                if not block:
                    return
                remaining -= len(block)
                yield block
