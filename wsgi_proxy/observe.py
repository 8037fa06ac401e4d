"""What each request did, reported once when it ends: one JSON log line, and the metrics.

An :class:`Observation` is opened for every request of the proxy's Blueprint, filled in as the
request goes (who, which model and upstream, attempts, events, resumes, token usage), and closed
when the answer is complete: at once for JSON answers, when the relay ends for streams. Nothing in
it is a secret: keys appear by name only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import typing as t
from dataclasses import dataclass, field

if t.TYPE_CHECKING:  # pragma: no cover
    from .metrics import Metrics

__all__ = ["ACCESS_LOGGER", "Observation", "request_id_from", "usage_of"]

#: The logger of the per-request JSON lines.
ACCESS_LOGGER = "wsgi_proxy.access"
log = logging.getLogger(ACCESS_LOGGER)

_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:/+=-]{1,128}")


def request_id_from(header: str | None) -> str:
    """The client's ``X-Request-ID`` when it is a safe token, else a new one."""
    if header and _REQUEST_ID.fullmatch(header):
        return header
    return "req_" + os.urandom(16).hex()


def usage_of(payload: t.Mapping[str, t.Any]) -> dict[str, int] | None:
    """Token counts from a Response object's ``usage`` (input, output, total), if it has them."""
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    counts = {k: usage.get(k) for k in ("input_tokens", "output_tokens", "total_tokens")}
    if not all(isinstance(v, int) for v in counts.values()):
        return None
    return t.cast(dict[str, int], counts)


@dataclass
class Observation:
    """One request, as the proxy saw it."""

    request_id: str
    method: str
    route: str
    started: float = field(default_factory=time.monotonic)
    key: str | None = None
    team: str | None = None
    model: str | None = None
    upstream: str | None = None
    upstream_request_id: str | None = None
    status: int | None = None
    attempts: int = 0
    stream: bool = False
    first_event_s: float | None = None
    events: int = 0
    bytes: int = 0
    resumes: int = 0
    usage: dict[str, int] | None = None
    error: str | None = None
    finished: bool = False
    metrics: Metrics | None = None

    def first_event(self) -> None:
        if self.first_event_s is None:
            self.first_event_s = time.monotonic() - self.started

    def finish(self) -> None:
        """Emit the request's JSON line (once)."""
        if self.finished:
            return
        self.finished = True
        line = {
            "ts": round(time.time(), 3),
            "pid": os.getpid(),
            "request_id": self.request_id,
            "upstream_request_id": self.upstream_request_id,
            "method": self.method,
            "route": self.route,
            "status": self.status,
            "key": self.key,
            "team": self.team,
            "model": self.model,
            "upstream": self.upstream,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 2),
            "attempts": self.attempts,
        }
        if self.stream:
            first = self.first_event_s
            line |= {
                "ttfe_ms": None if first is None else round(first * 1000, 2),
                "events": self.events,
                "bytes": self.bytes,
                "resumes": self.resumes,
            }
        if self.usage is not None:
            line["usage"] = self.usage
        if self.error is not None:
            line["error"] = self.error
        log.info(json.dumps(line, separators=(",", ":")))
        if self.metrics is not None:
            self._report(self.metrics, time.monotonic() - self.started)

    def _report(self, metrics: Metrics, seconds: float) -> None:
        metrics.request_finished(
            route=self.route,
            method=self.method,
            status=self.status or 0,
            upstream=self.upstream,
            seconds=seconds,
        )
        if self.first_event_s is not None:
            metrics.first_event(route=self.route, upstream=self.upstream, seconds=self.first_event_s)
        for _ in range(self.resumes):
            metrics.resumed(upstream=self.upstream)
