"""One record per request, reported once when the request ends: one JSON log line, and the metrics.

A :class:`RequestRecord` is opened for every request of the proxy's Blueprint and told what
happens as the request goes, through one method per fact (who called, which model, each attempt
upstream, the answer, the relay's statistics, the error). It is closed when the answer is
complete: at once for JSON answers, when the relay ends for streams. Nothing in it is a secret:
keys appear by name only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import typing as t

from ..config.prices import usd
from ..errors import ProxyError, RateLimited, UpstreamError
from ..wire.headers import budget_remaining
from ..wire.usage import Usage
from .tracing import operation_of

if t.TYPE_CHECKING:  # pragma: no cover
    from ..config.gateway import Budget
    from ..gateway.session import SessionStats
    from ..wire.relay import StreamStats
    from .metrics import Metrics
    from .tracing import RequestTrace

__all__ = ["ACCESS_LOGGER", "RequestRecord", "request_id_from"]

#: The logger of the per-request JSON lines.
ACCESS_LOGGER = "wsgi_proxy.access"
log = logging.getLogger(ACCESS_LOGGER)

_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:/+=-]{1,128}")


def request_id_from(header: str | None) -> str:
    """The client's ``X-Request-ID`` when it is a safe token, else a new one."""
    if header and _REQUEST_ID.fullmatch(header):
        return header
    return "req_" + os.urandom(16).hex()


class RequestRecord:
    """One request, as the proxy saw it.

    :param request_id: the id the answer and the upstream request carry.
    :param method: the client's HTTP method.
    :param route: the route's name (one of a small fixed set: it is a metric label).
    :param metrics: where the request is counted when it ends; None counts nothing.
    """

    def __init__(
        self,
        request_id: str,
        method: str,
        route: str,
        *,
        metrics: Metrics | None = None,
        trace: RequestTrace | None = None,
    ) -> None:
        self.request_id = request_id
        self.method = method
        self.route = route
        self.started = time.monotonic()
        self.key: str | None = None
        self.team: str | None = None
        self.model: str | None = None
        self.upstream: str | None = None
        self.upstream_request_id: str | None = None
        self.status: int | None = None
        self.attempts = 0
        self.usage: Usage | None = None
        self.cost_nano_usd: int | None = None
        self.budget_left: str | None = None
        self.error: str | None = None
        self.stream: StreamStats | None = None
        self.streaming = False
        self.connection: SessionStats | None = None
        self._metrics = metrics
        #: The request's spans, when traces are on (see :mod:`~wsgi_proxy.observe.tracing`).
        self.trace = trace
        self._error_metric: tuple[str, str] | None = None
        self._finished = False

    # --- what happened, in the order it happens ----------------------------------------------

    def renamed(self, route: str) -> None:
        """The route turned out to be a more specific one (a retrieve, a delete, a cancel)."""
        self.route = route

    def identified(self, key: str | None, team: str | None) -> None:
        self.key, self.team = key, team

    def asked_for(self, model: str | None) -> None:
        self.model = model

    def attempt(self, upstream: str) -> None:
        """One more try upstream is about to be made (counted whatever its outcome)."""
        self.attempts += 1
        self.upstream = upstream
        if self.trace is not None:
            self.trace.attempt(upstream, self.attempts)

    def answered(self, upstream_request_id: str | None) -> None:
        self.upstream_request_id = upstream_request_id
        if self.trace is not None:
            self.trace.answered(upstream_request_id)

    def reopened(self, after: int | None, started: float, outcome: str) -> None:
        """One attempt to resume the relayed stream, begun at ``started`` (a :func:`time.time`)."""
        if self.trace is not None:
            self.trace.resumed(self.upstream or "none", after, started, outcome)

    def budgeted(self, left: t.Sequence[tuple[Budget, int]]) -> None:
        """The caller's budgets had room; ``left`` is what remains of each (for the answer's header)."""
        if left:
            self.budget_left = budget_remaining((b.counter, b.kind, amount) for b, amount in left)

    def used(self, usage: Usage | None, cost_nano_usd: int | None) -> None:
        """What the answer used, and what that cost in nano-dollars (None: no price)."""
        self.usage, self.cost_nano_usd = usage, cost_nano_usd

    def failed(self, error: ProxyError) -> None:
        """The proxy answers with ``error``."""
        self.error = error.code or error.type
        if isinstance(error, UpstreamError):
            self._error_metric = ("upstream", error.code or "upstream_error")
        elif isinstance(error, RateLimited):
            self._error_metric = ("rate_limited", error.limit)

    def stream_started(self) -> None:
        """The answer is a relayed stream: the record closes when :meth:`stream_ended` is called."""
        self.streaming = True
        if self._metrics is not None:
            self._metrics.stream_opened()

    def stream_ended(self, stats: StreamStats) -> None:
        """The relay ended, with ``stats``: the record closes."""
        self.stream = stats
        if stats.error is not None:
            self.error = stats.error
        if self._metrics is not None:
            self._metrics.stream_closed()
            if stats.failure is not None:
                self._error_metric = ("upstream", "stream_aborted")
        self.finish()

    def connection_ended(self, stats: SessionStats) -> None:
        """A WebSocket connection the proxy served ended, with ``stats`` (its record closes on the 101)."""
        self.connection = stats

    def sent(self, status: int) -> None:
        """The status line went out; a JSON answer's record closes here."""
        self.status = status
        if not self.streaming:
            self.finish()

    # --- reporting ---------------------------------------------------------------------------

    @property
    def first_event_s(self) -> float | None:
        if self.stream is None or self.stream.first_event_at is None:
            return None
        return self.stream.first_event_at - self.started

    def line(self, now: float) -> dict[str, t.Any]:
        """The request's log line as a JSON object."""
        line: dict[str, t.Any] = {
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
            "duration_ms": round((now - self.started) * 1000, 2),
            "attempts": self.attempts,
        }
        if self.stream is not None:
            first = self.first_event_s
            line |= {
                "ttfe_ms": None if first is None else round(first * 1000, 2),
                "events": self.stream.events,
                "bytes": self.stream.bytes,
                "resumes": self.stream.resumes,
            }
        if self.connection is not None:
            stats = self.connection
            line |= {
                "creates": stats.creates,
                "frames_in": stats.frames_in,
                "frames_out": stats.frames_out,
                "resumes": stats.resumes,
                "upstream_connections": stats.upstream_connections,
                "close_code": stats.close_code,
                "ended_by": stats.ended_by,
            }
        if self.usage is not None:
            line["usage"] = self.usage.reported()
            line["cost_usd"] = None if self.cost_nano_usd is None else usd(self.cost_nano_usd)
        if self.error is not None:
            line["error"] = self.error
        return line

    def finish(self) -> None:
        """Emit the request's JSON line and count it (once)."""
        if self._finished:
            return
        self._finished = True
        now = time.monotonic()
        line = self.line(now)
        log.info(json.dumps(line, separators=(",", ":")))
        if self._metrics is not None:
            self._report(self._metrics, now - self.started)
        if self.trace is not None:
            self.trace.finish(self._span_attributes(line), self.status, self.error)

    def _span_attributes(self, line: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
        """The request span's attributes: the GenAI conventions' and the proxy's own."""
        stream, usage = self.stream, self.usage
        return {
            "gen_ai.operation.name": operation_of(self.route),
            "gen_ai.provider.name": "openai" if self.model is not None else None,
            "gen_ai.request.model": self.model,
            "gen_ai.response.model": stream.model if stream is not None else None,
            "gen_ai.response.id": stream.response_id if stream is not None else None,
            "gen_ai.usage.input_tokens": usage.input_tokens if usage is not None else None,
            "gen_ai.usage.output_tokens": usage.output_tokens if usage is not None else None,
            "openai.response.service_tier": stream.service_tier if stream is not None else None,
            "wsgi_proxy.request_id": self.request_id,
            "wsgi_proxy.key": self.key,
            "wsgi_proxy.team": self.team,
            "wsgi_proxy.upstream": self.upstream,
            "wsgi_proxy.attempts": self.attempts,
            "wsgi_proxy.resumes": stream.resumes if stream is not None else None,
            "wsgi_proxy.cost_usd": line.get("cost_usd"),
        }

    def _report(self, metrics: Metrics, seconds: float) -> None:
        upstream = self.upstream
        metrics.request_finished(
            route=self.route, method=self.method, status=self.status or 0, upstream=upstream, seconds=seconds
        )
        first = self.first_event_s
        if first is not None:
            metrics.first_event(route=self.route, upstream=upstream, seconds=first)
        for _ in range(self.stream.resumes if self.stream is not None else 0):
            metrics.resumed(upstream=upstream)
        if self._error_metric is not None:
            family, label = self._error_metric
            if family == "upstream":
                metrics.upstream_error(upstream=upstream, kind=label)
            else:
                metrics.rate_limited(limit=label)
