"""Hostile clients on raw sockets, for the tests and the fault suite: they hold a server's resources
the way careless or malicious clients do, and stop when told."""

from __future__ import annotations

import contextlib
import socket
import threading
import typing as t

__all__ = ["Dribblers", "IdleClosers"]

_HEAD = b"POST /v1/responses HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"


class Dribblers:
    """``count`` sockets to ``root`` that send their headers a byte every half second
    (``kind="headers"``), or whole headers announcing a body that never comes (``kind="body"``).

    Use it as a context manager: the sockets connect on entry and are closed on exit.
    """

    def __init__(self, root: str, kind: t.Literal["headers", "body"], count: int) -> None:
        host, port = root.removeprefix("http://").rsplit(":", 1)
        self._address = (host, int(port))
        self._kind = kind
        self._count = count
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dribblers", daemon=True)
        self._sockets: list[socket.socket] = []

    def __enter__(self) -> Dribblers:
        self._sockets = [socket.create_connection(self._address, timeout=5) for _ in range(self._count)]
        if self._kind == "body":
            for sock in self._sockets:
                sock.sendall(_HEAD + b"Content-Length: 1000\r\n\r\n{")  # and nothing more, ever
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in self._sockets:
            sock.close()

    def _run(self) -> None:
        sent = 0
        while not self._stop.is_set():
            if self._kind == "headers":
                byte = _HEAD[sent % len(_HEAD) : sent % len(_HEAD) + 1]
                for sock in self._sockets:
                    with contextlib.suppress(OSError):
                        sock.send(byte)
                sent += 1
            self._stop.wait(0.5)


class IdleClosers:
    """``count`` sockets to ``root`` that ask for a page with ``Connection: close`` and then neither
    read the answer nor close: what made gunicorn 26 linger on its event loop. A context manager."""

    def __init__(self, root: str, count: int) -> None:
        host, port = root.removeprefix("http://").rsplit(":", 1)
        self._address = (host, int(port))
        self._count = count
        self._sockets: list[socket.socket] = []

    def __enter__(self) -> IdleClosers:
        for _ in range(self._count):
            sock = socket.create_connection(self._address, timeout=10)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
            self._sockets.append(sock)
        return self

    def __exit__(self, *exc: object) -> None:
        for sock in self._sockets:
            sock.close()
