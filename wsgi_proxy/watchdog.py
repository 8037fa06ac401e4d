"""Notice clients that leave while the upstream is silent.

A WSGI server only notices a gone client when a write fails, and a silent upstream (reasoning
models think for minutes) means no writes: the worker thread would sit in ``recv`` with an upstream
connection open. One thread per worker process watches the client sockets of open streams with
``epoll`` (``EPOLLRDHUP``: the peer closed) and, when one goes, calls that stream's callback, which
shuts the upstream socket down so the blocked read returns at once. On systems without ``epoll``
the watchdog is inactive and a gone client is noticed at the next write.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import typing as t

__all__ = ["DisconnectWatchdog", "Watch"]

log = logging.getLogger("wsgi_proxy.watchdog")

_EPOLL = getattr(select, "epoll", None)
_GONE_EVENTS = (
    getattr(select, "EPOLLRDHUP", 0x2000)
    | getattr(select, "EPOLLHUP", 0x10)
    | getattr(select, "EPOLLERR", 0x8)
)


class Watch:
    """One watched client socket. ``gone`` turns true when the client has left."""

    __slots__ = ("fd", "gone", "_on_gone", "_watchdog")

    def __init__(self, watchdog: DisconnectWatchdog, fd: int, on_gone: t.Callable[[], None]) -> None:
        self.fd = fd
        self.gone = False
        self._on_gone = on_gone
        self._watchdog = watchdog

    def is_gone(self) -> bool:
        return self.gone

    def cancel(self) -> None:
        """Stop watching (the stream ended); safe to call more than once."""
        self._watchdog._unregister(self)

    def _fire(self) -> None:
        self.gone = True
        try:
            self._on_gone()
        except Exception:  # a failing callback must not stop the watchdog thread
            log.exception("disconnect callback failed")


class DisconnectWatchdog:
    """A per-process watcher of client sockets; re-created lazily after a fork."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = 0
        self._epoll: t.Any = None
        self._watches: dict[int, Watch] = {}

    @property
    def available(self) -> bool:
        return _EPOLL is not None

    def watch(self, sock: socket.socket | None, on_gone: t.Callable[[], None]) -> Watch | None:
        """Call ``on_gone`` (from the watchdog thread) when the client behind ``sock`` hangs up."""
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
            watch = Watch(self, fd, on_gone)
            try:
                self._epoll.register(fd, _GONE_EVENTS)
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
        thread = threading.Thread(
            target=self._run, args=(self._epoll,), name="wsgi-proxy-watchdog", daemon=True
        )
        thread.start()

    def _unregister(self, watch: Watch) -> None:
        with self._lock:
            if self._watches.get(watch.fd) is watch:
                del self._watches[watch.fd]
                with contextlib.suppress(OSError, ValueError):
                    self._epoll.unregister(watch.fd)

    def _run(self, epoll: t.Any) -> None:
        while True:
            try:
                ready = epoll.poll(1.0)
            except InterruptedError:
                continue
            except (OSError, ValueError):
                return
            for fd, _events in ready:
                with self._lock:
                    watch = self._watches.pop(fd, None)
                    if watch is not None:
                        with contextlib.suppress(OSError, ValueError):
                            epoll.unregister(fd)
                if watch is not None:
                    watch._fire()
