"""Transparent resume: re-open a broken background stream after the last event forwarded.

The relay (``streaming.py``) decides when; this module knows how: ``GET /responses/{id}?stream=true
&starting_after=N`` with the query the client's own request implies, bounded attempts with jittered
exponential backoff, and which upstream answers are worth another try. A resume is a retrieve: it
never creates or bills a response again.
"""

from __future__ import annotations

import json
import logging
import time
import typing as t
from dataclasses import dataclass
from urllib.parse import urlencode

from ..errors import UpstreamError
from ..wire.query import replace_param
from ..wire.relay import Resume, UpstreamBody
from ..wire.validation import CreateFields
from .body import UpstreamStream
from .client import UpstreamClient, UpstreamRequest
from .retries import backoff

__all__ = ["ResumePolicy", "StreamResumer", "create_resume_query", "resume_query"]

log = logging.getLogger("wsgi_proxy.resume")

#: Statuses after which another attempt may succeed.
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
#: Response statuses after which no more events will come.
ENDED_STATUSES = frozenset({"completed", "failed", "cancelled", "incomplete"})


def resume_query(query: bytes, after: int | None) -> bytes:
    """The client's raw query with ``starting_after`` set to ``after`` (kept as sent when None).

    Every other parameter keeps its exact bytes and order (repeated ``include[]`` included).
    """
    if after is None:
        return query
    return replace_param(query, "starting_after", b"%d" % after)


def create_resume_query(fields: CreateFields) -> bytes:
    """The retrieve query that replays a created stream as its create asked for it.

    ``include`` and ``stream_options.include_obfuscation`` shape the events, so a resumed stream
    carries them over; ``starting_after`` is added by :func:`resume_query`.
    """
    pairs: list[tuple[str, str]] = [("stream", "true")]
    pairs += [("include[]", item) for item in fields.include or ()]
    if fields.stream_options and fields.stream_options.get("include_obfuscation") is False:
        pairs.append(("include_obfuscation", "false"))
    return urlencode(pairs).encode("ascii")


@dataclass(frozen=True, slots=True)
class ResumePolicy:
    """How hard a broken stream is resumed: ``attempts`` per break, the first after ``backoff``
    seconds, doubled per attempt up to ``backoff_max`` (with jitter)."""

    attempts: int = 5
    backoff: float = 0.25
    backoff_max: float = 4.0


class StreamResumer:
    """Re-opens one background stream (see :class:`~wsgi_proxy.wire.relay.Resumer`).

    :param upstream: the upstream client.
    :param headers: the upstream headers of the original request (credentials included).
    :param query: the query to replay the stream with (without ``starting_after`` for a create).
    :param policy: the attempts per break before the client's connection is aborted, and their waits.
    :param on_reopen: told of each attempt once it is over: the sequence number it resumed after,
        when it began (a :func:`time.time`), and what came of it (``resumed``, or the value of the
        :class:`~wsgi_proxy.wire.relay.Resume` it came to).
    """

    def __init__(
        self,
        upstream: UpstreamClient,
        headers: t.Mapping[str, str],
        query: bytes,
        policy: ResumePolicy,
        on_reopen: t.Callable[[int | None, float, str], None] | None = None,
    ) -> None:
        self.max_attempts = policy.attempts
        self._upstream = upstream
        self._headers = dict(headers)
        self._query = query
        self._policy = policy
        self._on_reopen = on_reopen

    def backoff(self, attempt: int) -> float:
        return backoff(attempt, self._policy.backoff, self._policy.backoff_max)

    def reopen(self, response_id: str, after: int | None) -> UpstreamBody | Resume:
        started = time.time()
        outcome = self._reopen(response_id, after)
        if self._on_reopen is not None:
            self._on_reopen(after, started, outcome.value if isinstance(outcome, Resume) else "resumed")
        return outcome

    def _reopen(self, response_id: str, after: int | None) -> UpstreamBody | Resume:
        call = UpstreamRequest(
            "GET", f"/responses/{response_id}", resume_query(self._query, after), self._headers, stream=True
        )
        try:
            answer = self._upstream.send(call)
        except UpstreamError as exc:
            log.info("resuming %s failed: %s", response_id, exc.message)
            return Resume.RETRY
        content_type = answer.headers.get("Content-Type", "")
        if answer.status_code == 200 and content_type.startswith("text/event-stream"):
            return UpstreamStream(answer)
        try:
            self._upstream.read_body(answer)
        except UpstreamError:
            pass
        log.info("resuming %s: the upstream answered %d", response_id, answer.status_code)
        return Resume.RETRY if answer.status_code in RETRYABLE_STATUSES else Resume.GIVE_UP

    def has_ended(self, response_id: str) -> bool:
        headers = {k: v for k, v in self._headers.items() if k.lower() != "accept-encoding"}
        try:
            answer = self._upstream.send(UpstreamRequest("GET", f"/responses/{response_id}", headers=headers))
            status = json.loads(answer.content).get("status") if answer.status_code == 200 else None
        except (UpstreamError, ValueError, AttributeError, RecursionError):
            return False
        return status in ENDED_STATUSES
