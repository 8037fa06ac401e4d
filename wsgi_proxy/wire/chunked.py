"""HTTP/1.1 chunked transfer coding, decoded as its bytes arrive (RFC 9112, section 7.1).

A pure state machine: fed whatever one receive brought, it returns the payload bytes in it at once
(a chunk's first bytes do not wait for its last), in time linear in the bytes fed. It is strict
where a lenient parser would misframe: a size line is hex digits and nothing else (before any
extension), and a chunk must end exactly where its size said. No I/O.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

__all__ = ["ChunkDecoder", "ChunkedFramingError"]

#: The longest size line accepted (http.client's own limit).
MAX_LINE = 65536
_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
# The usual shape between two chunks, in one match: the line end after the data, the next size line.
_NEXT_SIZE = re.compile(rb"\r?\n([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\r?\n")


class ChunkedFramingError(ValueError):
    """The body's chunked framing is broken: its bytes cannot be trusted to be the upstream's."""


class _At(enum.Enum):
    SIZE = "a chunk's size line"
    DATA = "a chunk's data"
    DATA_END = "the line end after a chunk's data"
    END = "the last chunk"


@dataclass(slots=True)
class ChunkDecoder:
    """Decodes one chunked body; :attr:`done` once its last (zero-size) chunk is in.

    The trailer section after it is never read: a streamed body's connection is closed at its end,
    not reused, so nothing after the last chunk can reach another response.
    """

    _at: _At = _At.SIZE
    _left: int = 0  # bytes of the current chunk's data still to come
    _line: bytearray = field(default_factory=bytearray)  # a line of the framing begun, not ended

    @property
    def done(self) -> bool:
        return self._at is _At.END

    def feed(self, data: bytes) -> bytes:
        """The payload in ``data``, in order; raises :class:`ChunkedFramingError` on broken framing.
        Bytes after the last chunk are ignored."""
        parts: list[bytes] = []
        pos, end = 0, len(data)
        while pos < end and self._at is not _At.END:
            if self._at is _At.DATA:
                stop = min(end, pos + self._left)
                parts.append(data[pos:stop])
                self._left -= stop - pos
                pos = stop
                if not self._left:
                    self._at = _At.DATA_END
                continue
            if self._at is _At.DATA_END and not self._line:
                frame = _NEXT_SIZE.match(data, pos)
                if frame is not None:
                    self._left = int(frame.group(1), 16)
                    self._at = _At.DATA if self._left else _At.END
                    pos = frame.end()
                    continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._hold(data[pos:])
                break
            line = data[pos:newline]
            if self._line:
                line, self._line = bytes(self._line) + line, bytearray()
            pos = newline + 1
            self._end_line(line[:-1] if line.endswith(b"\r") else line)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def would_yield(self, ahead: bytes) -> bool:
        """Whether feeding ``ahead`` would give payload bytes or reach the end (without feeding it).
        Broken framing counts as yes: the read that follows reports it at once."""
        if self._at is _At.DATA:
            return bool(ahead)
        trial = ChunkDecoder(self._at, self._left, bytearray(self._line))
        try:
            return bool(trial.feed(ahead)) or trial.done
        except ChunkedFramingError:
            return True

    def _hold(self, piece: bytes) -> None:
        self._line += piece
        if len(self._line) > MAX_LINE:
            raise ChunkedFramingError(f"a line of the chunked framing ran past {MAX_LINE} bytes")

    def _end_line(self, line: bytes) -> None:
        if self._at is _At.DATA_END:
            if line:
                raise ChunkedFramingError("a chunk's data ran past the size its size line gave")
            self._at = _At.SIZE
        else:  # a size line
            digits = line.split(b";", 1)[0].strip(b" \t")
            if not _SIZE.fullmatch(digits):
                raise ChunkedFramingError("a chunk's size line is not a hexadecimal size")
            self._left = int(digits, 16)
            self._at = _At.DATA if self._left else _At.END
