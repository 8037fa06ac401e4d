"""The store of a gateway that shares nothing: it remembers no response, counts no usage.

A gateway configured by its variables alone (one upstream, one team) and no
``WSGI_PROXY_STORE_URL`` uses it, so that the tenancy code asks a store in every mode and never
checks whether it has one. Limits never reach it: such a gateway has none.
"""

from __future__ import annotations

import typing as t

from .base import (
    USAGE_TTL_S,
    KeyRecord,
    RateDecision,
    ResponseRecord,
    Spend,
    Store,
    StoreError,
    UsageEntry,
    UsageRow,
)

__all__ = ["NullStore"]


class NullStore(Store):
    """Forgets everything at once; every request and slot is allowed."""

    def put_response(self, record: ResponseRecord, ttl_s: float) -> None:
        pass

    def get_response(self, response_id: str) -> ResponseRecord | None:
        return None

    def delete_response(self, response_id: str) -> None:
        pass

    def pin(self, key: str, upstream: str, ttl_s: float) -> None:
        pass

    def pinned(self, key: str) -> str | None:
        return None

    def hit_rate(
        self, key: str, limit: int, window_s: float = 60.0, now: float | None = None
    ) -> RateDecision:
        return RateDecision(allowed=True, retry_after=0.0, remaining=limit)

    def acquire_slot(self, key: str, limit: int, lease: str, ttl_s: float, now: float | None = None) -> bool:
        return True

    def refresh_slot(self, key: str, lease: str, ttl_s: float, now: float | None = None) -> None:
        pass

    def release_slot(self, key: str, lease: str) -> None:
        pass

    def record_usage(self, entry: UsageEntry, *, at: float | None = None, ttl_s: float = USAGE_TTL_S) -> bool:
        return False

    def spend(self, counters: t.Sequence[str], now: float | None = None) -> dict[str, Spend]:
        return {counter: Spend() for counter in counters}

    def mark(self, key: str, ttl_s: float) -> bool:
        return True

    def marked(self, key: str) -> bool:
        return False

    def put_key(self, record: KeyRecord) -> None:
        raise StoreError(
            "A gateway without a store keeps no client keys: name one with WSGI_PROXY_STORE_URL."
        )

    def get_key(self, digest: str) -> KeyRecord | None:
        return None

    def list_keys(self) -> list[KeyRecord]:
        return []

    def add_audit(self, line: t.Mapping[str, t.Any]) -> None:
        pass

    def audit_log(self) -> list[dict[str, t.Any]]:
        return []

    def usage_totals(self, *, since: str | None = None, until: str | None = None) -> list[UsageRow]:
        return []

    def purge_expired(self, now: float | None = None) -> int:
        return 0

    def ping(self) -> bool:
        return True  # nothing to write: nothing can fail

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return "NullStore()"
