"""Client keys kept in the store (``wsgi-proxy keys``): looked up by digest, trusted for a moment.

A worker asks the store about a key it does not hold in its configuration, and trusts the answer
for ``WSGI_PROXY_KEY_CACHE_TTL`` seconds, so that a key revoked or rotated out on one host is
refused by every worker of every host within that time, at one store read per key and worker per
period. Expiry is checked on every request against the record, so an expired secret is refused at
once. A key whose team the configuration no longer has is refused, never guessed at.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import typing as t

from pydantic import ValidationError

from ..config.file import KeyLimits, TeamEntry
from ..config.gateway import Identity, identity_of
from ..errors import StoreUnavailable
from ..store import KeyRecord, Store, StoreError

__all__ = ["StoredKeys"]

log = logging.getLogger("wsgi_proxy.keys")

#: The most keys a worker remembers answers about (unknown ones included); the oldest go first.
CACHE_LIMIT = 10_000


@functools.lru_cache(maxsize=CACHE_LIMIT)
def _read_limits(text: str) -> KeyLimits:
    """A stored key's limits (frozen), validated once per worker and text: each thread that validates
    a pydantic model keeps 8 KB more of its stack resident for its life (``docs/design.md``), and
    every answer the store gives is read again once its trust runs out."""
    return KeyLimits.model_validate_json(text)


class StoredKeys:
    """The keys of the store, as one worker sees them.

    :param store: where the keys are.
    :param teams: the configuration's teams (a stored key's team must be one of them).
    :param ttl: seconds an answer of the store is trusted.
    :param file_keys: the names of the configuration file's keys, which no stored key may take.
    """

    def __init__(
        self, store: Store, teams: t.Mapping[str, TeamEntry], ttl: float, file_keys: t.Collection[str] = ()
    ) -> None:
        self._store = store
        self._teams = teams
        self._ttl = ttl
        self._file_keys = frozenset(file_keys)
        self._lock = threading.Lock()
        self._cache: dict[bytes, tuple[float, KeyRecord | None, Identity | None]] = {}

    def identity(self, digest: bytes) -> Identity | None:
        """The identity of the key with SHA-256 ``digest`` while it is usable, else None.

        :raises StoreUnavailable: when the store cannot say (a key it cannot check is not accepted).
        """
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(digest)
        if cached is None or now - cached[0] >= self._ttl:
            try:
                record = self._store.get_key(digest.hex())
            except StoreError as exc:
                log.error("could not look a client key up in the store: %s", exc)
                raise StoreUnavailable() from None
            cached = (now, record, self._identity_of(record))
            with self._lock:
                if len(self._cache) >= CACHE_LIMIT:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[digest] = cached
        _, record, identity = cached
        if record is None or not record.usable(time.time()):
            return None
        return identity

    def _identity_of(self, record: KeyRecord | None) -> Identity | None:
        if record is None:
            return None
        if record.name in self._file_keys:
            log.error(
                "the stored key %r has the name of a key of the configuration file: refused", record.name
            )
            return None
        team = self._teams.get(record.team)
        if team is None:
            log.error(
                "the stored key %r is in team %r, which the configuration file does not define: refused",
                record.name,
                record.team,
            )
            return None
        try:
            limits = _read_limits(record.limits)
        except ValidationError:
            log.error("the stored key %r has limits this gateway cannot read: refused", record.name)
            return None
        return identity_of(record.name, record.team, team, limits)
