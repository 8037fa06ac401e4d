"""Stream slots as leases that live while their stream does.

A stream under a ``max_streams`` limit holds a slot in the shared store for ``ttl`` seconds.
:class:`LeaseKeeper` is one thread per worker process that refreshes every slot its streams still
hold, every third of ``ttl``, so a stream may live for hours and still count, while the slots of a
worker that died without releasing them (``kill -9``, an OOM kill) expire within ``ttl`` seconds.
The refresh happens off the request path: a slow or failing store delays it, never a stream.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from ..store import Store, StoreError

__all__ = ["LeaseKeeper"]

log = logging.getLogger("wsgi_proxy.leases")


class LeaseKeeper:
    """Keeps the stream slots of this process alive; re-created lazily after a fork.

    :param store: where the slots are.
    :param ttl: seconds a slot lives without a refresh.
    """

    def __init__(self, store: Store, ttl: float) -> None:
        self.store = store
        self.ttl = ttl
        self._lock = threading.Lock()
        self._held: set[tuple[str, str]] = set()
        self._pid = 0

    def hold(self, key: str, lease: str) -> None:
        """Refresh ``lease`` of ``key`` until :meth:`drop` is called."""
        with self._lock:
            self._ensure_started()
            self._held.add((key, lease))

    def drop(self, key: str, lease: str) -> None:
        with self._lock:
            self._held.discard((key, lease))

    def held(self) -> int:
        """How many slots this process keeps alive now."""
        with self._lock:
            return len(self._held) if self._pid == os.getpid() else 0

    def _ensure_started(self) -> None:
        pid = os.getpid()
        if self._pid == pid:
            return
        # A forked child inherits a copy of the parent's set but not its thread: start afresh.
        self._pid = pid
        self._held = set()
        threading.Thread(target=self._run, name="wsgi-proxy-leases", daemon=True).start()

    def refresh(self, now: float | None = None) -> None:
        """Refresh every held slot once, from ``now`` (the thread does this every third of ``ttl``)."""
        with self._lock:
            held = list(self._held)
        for key, lease in held:
            try:
                self.store.refresh_slot(key, lease, self.ttl, now=now)
            except StoreError as exc:
                log.warning("could not refresh a stream slot (it expires in %.0f s): %s", self.ttl, exc)
                return  # the store is down: the next round tries them all again

    def _run(self) -> None:
        while True:
            time.sleep(self.ttl / 3)
            self.refresh()
