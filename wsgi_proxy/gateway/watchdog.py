"""One thread per worker process that watches the client side of every open stream.

A WSGI server only notices a gone client when a write fails, and a silent upstream (reasoning
models think for minutes) means no writes: the worker thread would sit in ``recv`` with an upstream
connection open. The watchdog notices, and ends such streams at once:

- **gone clients**: ``epoll`` on the client sockets (``EPOLLRDHUP``: the peer closed its side,
  which a streaming client does only when it leaves). The upstream connection of the body the
  relay is reading (:meth:`Watch.attach`) is shut down, so the upstream learns at once and the
  relay's blocked read returns and frees its thread.
  A WebSocket session polls its client itself and sees it leave first: its watch is for the
  worker's shutdown only (``departures=False``).
- **stalled clients**: a client that stops reading blocks the relay's write forever. A write that
  has not finished after ``send_timeout`` seconds gets both ends shut down.
- **worker shutdown** (SIGTERM, SIGHUP, ``max_requests``): once :func:`drain_when`'s predicate turns
  true, resumable (background) streams are ended at once so their clients resume on another
  worker; the others get until shortly before gunicorn's ``graceful_timeout``. Either way they end
  while the worker can still log and clean up, never by a SIGKILL.

On systems without ``epoll`` the watchdog is inactive and a gone client is noticed at the next write.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
import typing as t

from ..wire.relay import UpstreamBody

__all__ = ["DisconnectWatchdog", "NoWatch", "StopReason", "Watch", "drain_when", "peer_closed", "stopping"]

log = logging.getLogger("wsgi_proxy.watchdog")

_EPOLL = getattr(select, "epoll", None)
# Edge-triggered: an event is a hint to check once, never a condition that keeps firing.
_GONE_EVENTS = (
    getattr(select, "EPOLLRDHUP", 0x2000)
    | getattr(select, "EPOLLHUP", 0x10)
    | getattr(select, "EPOLLERR", 0x8)
    | getattr(select, "EPOLLET", 1 << 31)
)
_SCAN_INTERVAL = 0.5
#: How long before gunicorn's graceful_timeout a non-resumable stream is ended on shutdown.
_DRAIN_MARGIN = 2.0

StopReason = t.Literal["client_gone", "send_timeout", "shutdown"]

_drain_check: t.Callable[[], bool] | None = None
_drain_grace = 30.0


def drain_when(check: t.Callable[[], bool], grace: float) -> None:
    """Make this process's watchdogs end open streams once ``check()`` is true (worker stopping).

    ``gunicorn.conf.py`` calls this from ``post_worker_init`` with ``lambda: not worker.alive``
    and the configured ``graceful_timeout``.
    """
    global _drain_check, _drain_grace
    _drain_check, _drain_grace = check, grace


def stopping() -> bool:
    """Whether this worker is stopping (as :func:`drain_when`'s predicate says)."""
    return _drain_check is not None and _drain_check()


def peer_closed(sock: socket.socket) -> bool:
    """Whether the peer of ``sock`` has closed (or reset) the connection, checked without blocking.

    An epoll event is only a hint: it may belong to an earlier socket that had the same file
    descriptor, so the socket itself is asked. A peer that sent bytes and then closed its side
    reads as alive here; it is noticed at the next write instead.
    """
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


class Watch:
    """The watchdog's view of one open stream; also the relay's handle on it."""

    __slots__ = (
        "departures",
        "fd",
        "number",
        "reason",
        "resumable",
        "_body",
        "_client",
        "_on_stop",
        "_stopped",
        "_watchdog",
        "_writing_since",
    )

    def __init__(
        self,
        watchdog: DisconnectWatchdog,
        client: socket.socket,
        fd: int,
        on_stop: t.Callable[[], None] | None,
        number: int,
        departures: bool,
    ) -> None:
        self.departures = departures  # whether epoll watches for the client leaving
        self.fd = fd
        self.number = number  # the watchdog's count of watches when this one began
        self.reason: StopReason | None = None
        self.resumable = False
        self._body: UpstreamBody | None = None
        self._client = client
        self._on_stop = on_stop
        # Made by the first sleep (a resume's backoff): most streams never sleep, and an Event is
        # ~1 KB and six objects for the cycle collector, kept for the stream's life.
        self._stopped: threading.Event | None = None
        self._watchdog = watchdog
        self._writing_since: float | None = None

    def stop_reason(self) -> StopReason | None:
        return self.reason

    def writing(self, active: bool) -> None:
        """The relay is handing bytes to the server (True) or got control back (False)."""
        self._writing_since = time.monotonic() if active else None

    def set_resumable(self, resumable: bool) -> None:
        self.resumable = resumable

    def sleep(self, seconds: float) -> bool:
        """Wait ``seconds``; True if the stream was stopped meanwhile."""
        stopped = self._stopped
        if stopped is None:
            stopped = self._stopped = threading.Event()
        # Read after the Event is in place: a stop that came first is seen here, a later one sets it.
        if self.reason is not None:
            return True
        return stopped.wait(seconds)

    def cancel(self) -> None:
        """Stop watching (the stream ended); safe to call more than once."""
        self._watchdog._unregister(self)

    def attach(self, body: UpstreamBody) -> None:
        """The body a relay reads from now on (the first, then each resumed one): what a stop
        without ``on_stop`` shuts down."""
        self._body = body

    def _stop(self, reason: StopReason, *, close_client: bool = False) -> None:
        if self.reason is not None:
            return
        self.reason = reason
        if self._stopped is not None:
            self._stopped.set()
        if close_client:
            with contextlib.suppress(OSError):
                self._client.shutdown(socket.SHUT_RDWR)
        try:
            if self._on_stop is not None:
                self._on_stop()
            elif self._body is not None:
                self._body.shutdown()
        except Exception:  # a failing callback must not stop the watchdog thread
            log.exception("stopping a stream failed")


class NoWatch:
    """Stands in for a :class:`Watch` where nothing is watched."""

    resumable = False

    def stop_reason(self) -> StopReason | None:
        return None

    def writing(self, active: bool) -> None:
        pass

    def set_resumable(self, resumable: bool) -> None:
        pass

    def sleep(self, seconds: float) -> bool:
        time.sleep(seconds)
        return False

    def cancel(self) -> None:
        pass

    def attach(self, body: UpstreamBody) -> None:
        pass


class DisconnectWatchdog:
    """A per-process watcher of client sockets; re-created lazily after a fork.

    :param send_timeout: seconds a single write to a client may take before the stream is ended.
    """

    def __init__(self, send_timeout: float = 60.0) -> None:
        self.send_timeout = send_timeout
        self._lock = threading.RLock()  # a relay finished by the garbage collector may unregister
        self._pid = 0
        self._epoll: t.Any = None
        self._watches: dict[int, Watch] = {}
        self._registered = 0
        self._drain_started: float | None = None

    def watch(
        self,
        sock: socket.socket | None,
        on_stop: t.Callable[[], None] | None = None,
        *,
        departures: bool = True,
    ) -> Watch | None:
        """Watch the client behind ``sock``; ``on_stop`` (from the watchdog thread) ends the stream,
        and without it the body last attached (:meth:`Watch.attach`) is shut down.

        :param departures: False for a caller that polls ``sock`` itself and so sees its client
            leave first (a WebSocket session): the watch then only stops it when the worker stops.
            epoll is not told of the socket, which saves every departure a wake-up of the watchdog
            and a shutdown, each a GIL hand-off among thousands of threads.
        """
        if _EPOLL is None or sock is None:
            return None
        try:
            fd = sock.fileno()
        except OSError:
            return None
        if fd < 0:
            return None
        with self._lock:
            self._ensure_started()
            self._registered += 1
            watch = Watch(self, sock, fd, on_stop, self._registered, departures)
            try:
                if departures:
                    try:
                        self._epoll.register(fd, _GONE_EVENTS)
                    except FileExistsError:  # a gone client's descriptor, left registered (see _run)
                        self._epoll.modify(fd, _GONE_EVENTS)
            except OSError:
                return None
            self._watches[fd] = watch
        return watch

    def _ensure_started(self) -> None:
        pid = os.getpid()
        if self._pid == pid:
            return
        # A forked child inherits a copy of the parent's state but not its thread: start afresh.
        self._pid = pid
        self._epoll = _EPOLL() if _EPOLL is not None else None
        self._watches = {}
        self._registered = 0
        self._drain_started = None
        thread = threading.Thread(
            target=self._run, args=(self._epoll,), name="wsgi-proxy-watchdog", daemon=True
        )
        thread.start()

    def _unregister(self, watch: Watch) -> None:
        with self._lock:
            if self._watches.get(watch.fd) is watch:
                del self._watches[watch.fd]
                if watch.departures:
                    with contextlib.suppress(OSError, ValueError):
                        self._epoll.unregister(watch.fd)

    def _run(self, epoll: t.Any) -> None:
        next_scan = time.monotonic() + _SCAN_INTERVAL
        while True:
            before = self._registered
            try:
                ready = epoll.poll(max(0.0, next_scan - time.monotonic()))
            except InterruptedError:
                continue
            except (OSError, ValueError):
                return
            gone = []
            with self._lock:
                for fd, _events in ready:
                    watch = self._watches.get(fd)
                    if watch is None or not watch.departures:  # a gone client's registration, left
                        continue
                    # A watch that began while epoll waited may have taken the descriptor of a
                    # socket that closed meanwhile, and the event may be that socket's: only then
                    # is the socket itself asked. Otherwise the event is this client's, and nothing
                    # more is asked of the kernel: each call lets go of the GIL, which the watchdog
                    # must then win back from thousands of threads while thousands of clients leave.
                    if watch.number > before and not peer_closed(watch._client):
                        continue
                    # Left registered: the descriptor leaves epoll when the server closes it.
                    del self._watches[fd]
                    gone.append(watch)
            for watch in gone:
                watch._stop("client_gone")
            # On a clock, not after every wake-up: when thousands of clients leave one by one, a scan
            # of every watch per departure made the leaving quadratic.
            now = time.monotonic()
            if now >= next_scan:
                next_scan = now + _SCAN_INTERVAL
                with self._lock:
                    watches = list(self._watches.values())
                self._scan(watches, now)

    def _scan(self, watches: list[Watch], now: float) -> None:
        for watch in watches:
            since = watch._writing_since
            if since is not None and now - since > self.send_timeout:
                log.warning(
                    "a client has not taken a write for %.0f s (send timeout); closing its stream",
                    now - since,
                )
                watch._stop("send_timeout", close_client=True)
        if _drain_check is None or not _drain_check():
            return
        if self._drain_started is None:
            self._drain_started = now
            log.info("worker stopping: ending %d open streams so their clients can resume", len(watches))
        deadline = self._drain_started + max(0.0, _drain_grace - _DRAIN_MARGIN)
        for watch in watches:
            if watch.resumable or now >= deadline:
                watch._stop("shutdown")
