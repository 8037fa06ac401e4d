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

import requests

from .errors import UpstreamError, UpstreamUnavailable
from .upstream import UpstreamClient

__all__ = ["RETRY_STATUSES", "backoff", "retry_after", "send_with_retries"]

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


def send_with_retries(
    upstream: UpstreamClient,
    method: str,
    path: str,
    *,
    query: bytes,
    headers: t.Mapping[str, str],
    body: bytes | None,
    stream: bool,
    idempotent: bool,
    attempts: int,
    max_wait: float,
) -> tuple[requests.Response, int]:
    """Send, retrying where safe; return the answer and how many attempts it took.

    :param idempotent: True for calls that may be repeated whatever happened to the first one.
    :param attempts: extra attempts allowed after the first.
    :param max_wait: the longest wait before a retry.
    """
    attempt = 1
    while True:
        try:
            answer = upstream.send(method, path, query=query, headers=headers, body=body, stream=stream)
        except UpstreamError as exc:
            safe = exc.never_sent or (idempotent and isinstance(exc, UpstreamUnavailable))
            if not safe or attempt > attempts:
                raise
            wait = backoff(attempt, _BACKOFF_BASE, max_wait)
            log.info("retrying %s %s in %.2f s after: %s", method, path, wait, exc.message)
        else:
            if not idempotent or answer.status_code not in RETRY_STATUSES or attempt > attempts:
                return answer, attempt
            asked = retry_after(answer.headers)
            if asked is not None and asked > max_wait:
                return answer, attempt  # the client should wait that long itself
            wait = asked if asked is not None else backoff(attempt, _BACKOFF_BASE, max_wait)
            answer.close()
            log.info("retrying %s %s in %.2f s after HTTP %d", method, path, wait, answer.status_code)
        time.sleep(wait)
        attempt += 1
