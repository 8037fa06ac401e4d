"""Records the store could not take, kept by the worker until it can.

When a create's answer is on its way to the client and the store fails to record where the
response lives (or what it used), the record is not dropped: :class:`PendingWrites` keeps it in
this worker, retries it every half second until the store takes it, and answers this worker's
lookups of it meanwhile. New creates are refused while the store is failing (see
:meth:`Tenant.admit_create`), so only the requests already on their way when the store failed end
up here, and the queue is bounded: past ``limit`` records creates are refused too.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import typing as t

from ..store import ResponseRecord, Store, StoreError

__all__ = ["PendingWrites"]

log = logging.getLogger("wsgi_proxy.pending")

#: Seconds between attempts to write what is pending.
RETRY_INTERVAL = 0.5


class PendingWrites:
    """One worker's queue of records waiting for the store; re-created lazily after a fork.

    :param store: where the records go.
    :param limit: the most records kept; :attr:`full` is true from there on.
    """

    def __init__(self, store: Store, limit: int = 100_000) -> None:
        self.store = store
        self.limit = limit
        self._lock = threading.Lock()
        # (the response id a put is for, or None for a usage write; the write)
        self._queue: collections.deque[tuple[str | None, t.Callable[[Store], object]]] = collections.deque()
        self._responses: dict[str, ResponseRecord] = {}
        self._pid = 0

    @property
    def full(self) -> bool:
        return len(self) >= self.limit

    def __len__(self) -> int:
        with self._lock:
            return len(self._queue) if self._pid == os.getpid() else 0

    def put_response(self, record: ResponseRecord, ttl_s: float) -> None:
        """Keep ``record`` until the store takes it; :meth:`response` answers for it meanwhile."""
        with self._lock:
            self._ensure_started()
            self._responses[record.response_id] = record
            self._queue.append((record.response_id, lambda store: store.put_response(record, ttl_s)))

    def record_usage(self, write: t.Callable[[Store], object]) -> None:
        """Keep a usage write (``write(store)``) until the store takes it."""
        with self._lock:
            self._ensure_started()
            self._queue.append((None, write))

    def response(self, response_id: str) -> ResponseRecord | None:
        """The record of ``response_id`` if it is still waiting for the store."""
        with self._lock:
            return self._responses.get(response_id) if self._pid == os.getpid() else None

    def flush(self) -> int:
        """Write what is pending, in order, until the store fails; return how many are left."""
        while True:
            with self._lock:
                if not self._queue or self._pid != os.getpid():
                    return 0
                response_id, write = self._queue[0]
            try:
                write(self.store)
            except StoreError:
                return len(self)
            with self._lock:
                self._queue.popleft()
                if response_id is not None:
                    self._responses.pop(response_id, None)
                left = len(self._queue)
            if not left:
                log.info("every record kept while the store was failing is now written")

    def _ensure_started(self) -> None:
        pid = os.getpid()
        if self._pid == pid:
            return
        # A forked child inherits a copy of the parent's queue but not its thread: start afresh.
        self._pid = pid
        self._queue.clear()
        self._responses.clear()
        threading.Thread(target=self._run, name="wsgi-proxy-pending", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(RETRY_INTERVAL)
            self.flush()
