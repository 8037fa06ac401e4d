"""Retries where they are safe, before the first byte of an answer goes to the client.

- Idempotent calls (``GET``, ``DELETE``, ``cancel``): retried after a connection failure and after a
  429, 502, 503 or 504, honouring ``retry-after-ms`` and ``Retry-After``.
- Everything else (``POST /responses`` above all): retried only when the request provably never
  reached the upstream (no connection could be made). A create is never sent twice otherwise.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
import typing as t
from dataclasses import dataclass

import requests

from ..errors import UpstreamError, UpstreamUnavailable
from .client import UpstreamClient, UpstreamRequest

__all__ = ["RETRY_STATUSES", "RetryPolicy", "backoff", "retry_after", "send_with_retries"]

log = logging.getLogger("wsgi_proxy.retries")

RETRY_STATUSES = frozenset({429, 502, 503, 504})
_BACKOFF_BASE = 0.5


def retry_after(headers: t.Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the upstream asks to wait, from ``retry-after-ms`` or ``Retry-After`` (seconds or date)."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(0.0, float(raw_ms) / 1000)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter: ``base`` doubled per attempt (1-based), at most ``cap``."""
    return float(min(cap, base * 2 ** (attempt - 1))) * random.uniform(0.5, 1.0)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How much retrying a gateway allows: ``attempts`` extra tries, each wait at most ``max_wait`` s."""

    attempts: int = 2
    max_wait: float = 8.0


def send_with_retries(
    upstream: UpstreamClient,
    call: UpstreamRequest,
    *,
    idempotent: bool,
    policy: RetryPolicy,
    on_attempt: t.Callable[[], None] = lambda: None,
) -> requests.Response:
    """Send ``call``, retrying where safe, and return the answer.

    :param idempotent: True for calls that may be repeated whatever happened to the first one.
    :param policy: how many extra attempts, and the longest wait before one.
    :param on_attempt: called before every attempt, so that failed ones are counted too.
    """
    attempt = 1
    while True:
        on_attempt()
        try:
            answer = upstream.send(call)
        except UpstreamError as exc:
            safe = exc.never_sent or (idempotent and isinstance(exc, UpstreamUnavailable))
            if not safe or attempt > policy.attempts:
                raise
            wait = backoff(attempt, _BACKOFF_BASE, policy.max_wait)
            log.info("retrying %s %s in %.2f s after: %s", call.method, call.path, wait, exc.message)
        else:
            if not idempotent or answer.status_code not in RETRY_STATUSES or attempt > policy.attempts:
                return answer
            asked = retry_after(answer.headers)
            if asked is not None and asked > policy.max_wait:
                return answer  # the client should wait that long itself
            wait = asked if asked is not None else backoff(attempt, _BACKOFF_BASE, policy.max_wait)
            answer.close()
            log.info(
                "retrying %s %s in %.2f s after HTTP %d", call.method, call.path, wait, answer.status_code
            )
        time.sleep(wait)
        attempt += 1
