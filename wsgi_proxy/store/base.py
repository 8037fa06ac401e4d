"""The state store's interface and value types, shared by every backend.

The store holds what several gateway processes (and hosts) must agree on: which upstream holds a
response, how many requests a key made in the current window, and which streams a key has open.
Every backend is safe to call from many threads and processes at once, and raises only
:class:`StoreError`.
"""

from __future__ import annotations

import abc
import math
import typing as t
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "RateDecision",
    "ResponseRecord",
    "Store",
    "StoreError",
    "check_positive",
    "fixed_window",
    "rate_decision",
    "redact_url",
]


class StoreError(RuntimeError):
    """The store could not be opened or could not answer; the message names the store and what to do."""


@dataclass(frozen=True)
class ResponseRecord:
    """Where a stored response lives, and on whose behalf it was created."""

    response_id: str
    upstream: str
    """The name of the upstream that holds the response."""
    team: str | None
    key_name: str | None
    created_at: float
    """Unix time."""
    background: bool


@dataclass(frozen=True)
class RateDecision:
    """The outcome of counting one request against a rate limit."""

    allowed: bool
    retry_after: float
    """Seconds until a request would be allowed again; 0 when this one was."""
    remaining: int
    """Requests still allowed in the current window."""


class Store(abc.ABC):
    """The gateway's shared state: response locators, rate-limit windows and stream slots.

    ``now`` arguments are unix times that default to :func:`time.time`; hosts sharing a store
    should keep their clocks in sync (NTP), since windows and leases are computed from them.
    """

    @abc.abstractmethod
    def put_response(self, record: ResponseRecord, ttl_s: float) -> None:
        """Store ``record`` under its ``response_id``, replacing any earlier one, for ``ttl_s`` seconds."""

    @abc.abstractmethod
    def get_response(self, response_id: str) -> ResponseRecord | None:
        """The record stored for ``response_id``, or None if there is none or it expired."""

    @abc.abstractmethod
    def delete_response(self, response_id: str) -> None:
        """Forget ``response_id`` (nothing happens if it is unknown)."""

    @abc.abstractmethod
    def hit_rate(
        self, key: str, limit: int, window_s: float = 60.0, now: float | None = None
    ) -> RateDecision:
        """Count one request against ``key`` in a fixed window and say whether it is allowed.

        Windows are ``[i * window_s, (i + 1) * window_s)``; a request is allowed while the window's
        count, this request included, is at most ``limit``. Refused requests are counted too.
        """

    @abc.abstractmethod
    def acquire_slot(self, key: str, limit: int, lease: str, ttl_s: float, now: float | None = None) -> bool:
        """Take one of ``limit`` concurrent slots of ``key`` for ``lease``, for ``ttl_s`` seconds.

        Returns False when ``limit`` other live leases hold the slots. Acquiring a lease that is
        already held refreshes it and returns True. A lease not refreshed within ``ttl_s`` expires,
        so the slots of a crashed worker free themselves.
        """

    @abc.abstractmethod
    def refresh_slot(self, key: str, lease: str, ttl_s: float, now: float | None = None) -> None:
        """Extend a live ``lease`` to ``ttl_s`` seconds from now (an expired or unknown lease stays gone)."""

    @abc.abstractmethod
    def release_slot(self, key: str, lease: str) -> None:
        """Give back the slot held by ``lease`` (nothing happens if it is not held)."""

    @abc.abstractmethod
    def purge_expired(self, now: float | None = None) -> int:
        """Remove entries that expired by ``now`` and return how many were removed."""

    @abc.abstractmethod
    def ping(self) -> bool:
        """True if the store answers; a cheap readiness check that never raises."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the store's connections; the store must not be used afterwards."""

    def __enter__(self) -> t.Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_positive(name: str, value: float) -> None:
    """Reject a TTL or window that is not a positive finite number (a programming error)."""
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive number of seconds, not {value!r}.")


def fixed_window(now: float, window_s: float) -> tuple[int, float]:
    """The index of the window that holds ``now``, and the unix time at which that window ends."""
    index = math.floor(now / window_s)
    return index, (index + 1) * window_s


def rate_decision(count: int, limit: int, now: float, window_s: float) -> RateDecision:
    """The decision for the ``count``-th request of the ``window_s`` window that holds ``now``."""
    if count <= limit:
        return RateDecision(allowed=True, retry_after=0.0, remaining=limit - count)
    _, window_end = fixed_window(now, window_s)
    # Float rounding can put the computed end a hair outside (now, now + window_s]; keep it inside.
    return RateDecision(allowed=False, retry_after=min(max(window_end - now, 1e-6), window_s), remaining=0)


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, fit for error messages and logs."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<an unparsable URL>"
    if not password:
        return url
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username or ''}:***@{host}"
    return urlunsplit(parts._replace(netloc=netloc))
