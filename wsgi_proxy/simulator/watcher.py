"""Noticing clients that closed their connection while the simulator has nothing to send them.

An SSE connection that waits for the next event (a slow job, an injected gap) must still notice a
client that left. Polling every socket from its own thread costs ten wake-ups a second per stream;
:class:`ClientWatcher` instead waits for all of them in one thread with a selector, and only a socket
that becomes readable is looked at: at end of file (or on an error) its client is gone.
"""

from __future__ import annotations

import contextlib
import logging
import select
import selectors
import socket
import threading
import typing as t

__all__ = ["ClientWatcher", "Watch", "peer_closed"]

logger = logging.getLogger(__name__)


def peer_closed(sock: socket.socket) -> bool:
    """Tell whether the client closed its side, without consuming anything it sent."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLPRI)
        if not poller.poll(0):
            return False
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True


class Watch:
    """One watched connection: :attr:`gone` turns true, and ``wake`` is called, once its client left."""

    def __init__(self, sock: socket.socket, wake: t.Callable[[], None]) -> None:
        self.sock = sock
        self.wake = wake
        self.gone = False
        self.active = True


class ClientWatcher:
    """Watches connections for their clients leaving, from one thread for all of them.

    A readable socket whose client sent data instead (a pipelined request, say) can't show its end of
    file until that data is read, so it is only checked with :func:`peer_closed` every
    :attr:`poll_interval` seconds, like a socket the selector refused.
    """

    poll_interval = 0.1
    idle_interval = 0.25
    """The longest select; a selector that is not epoll or kqueue sees new sockets only after it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._selector: selectors.BaseSelector | None = None
        self._pending: set[Watch] = set()
        self._closed = False

    def watch(self, sock: socket.socket, wake: t.Callable[[], None]) -> Watch:
        """Start watching ``sock``; ``wake`` is called from the watcher thread when its client left."""
        watch = Watch(sock, wake)
        with self._lock:
            if self._closed:
                watch.gone = True
                return watch
            if self._selector is None:
                self._selector = selectors.DefaultSelector()
                threading.Thread(
                    target=self._run, args=(self._selector,), name="sim-watcher", daemon=True
                ).start()
            try:
                self._selector.register(sock, selectors.EVENT_READ, watch)
            except (KeyError, OSError, ValueError):
                self._pending.add(watch)
        return watch

    def unwatch(self, watch: Watch) -> None:
        with self._lock:
            if not watch.active:
                return
            watch.active = False
            self._pending.discard(watch)
            if self._selector is not None and not self._closed:
                self._forget(self._selector, watch)

    def close(self) -> None:
        """Stop watching; every connection still watched counts as gone."""
        with self._lock:
            self._closed = True
            watches = [key.data for key in self._selector.get_map().values()] if self._selector else []
            watches += self._pending
            self._pending.clear()
        for watch in watches:
            self._leave(watch)

    def _run(self, selector: selectors.BaseSelector) -> None:
        try:
            while not self._closed:
                timeout = self.poll_interval if self._pending else self.idle_interval
                for key, _ in selector.select(timeout):
                    self._readable(t.cast(Watch, key.data))
                self._poll_pending()
        except Exception:
            logger.exception("the simulator's client watcher failed")
            self.close()
        finally:
            with self._lock:
                selector.close()

    def _readable(self, watch: Watch) -> None:
        try:
            gone = watch.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return
        except (OSError, ValueError):
            gone = True
        with self._lock:
            if not watch.active or self._selector is None or self._closed:
                return
            self._forget(self._selector, watch)
            if not gone:
                # Data waits to be read: no end of file can show until then, so poll it now and then.
                self._pending.add(watch)
                return
        self._leave(watch)

    def _poll_pending(self) -> None:
        with self._lock:
            pending = list(self._pending)
        for watch in pending:
            if peer_closed(watch.sock):
                with self._lock:
                    if not watch.active:
                        continue
                    self._pending.discard(watch)
                self._leave(watch)

    @staticmethod
    def _forget(selector: selectors.BaseSelector, watch: Watch) -> None:
        with contextlib.suppress(KeyError, OSError, ValueError):
            selector.unregister(watch.sock)

    def _leave(self, watch: Watch) -> None:
        watch.gone = True
        watch.wake()
