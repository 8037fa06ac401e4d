"""The disconnect watchdog against real loopback sockets."""

from __future__ import annotations

import socket
import threading
import time
import typing as t

import pytest

from wsgi_proxy.gateway import watchdog as watchdog_module
from wsgi_proxy.gateway.watchdog import DisconnectWatchdog, drain_when, peer_closed


@pytest.fixture
def pair() -> t.Iterator[tuple[socket.socket, socket.socket]]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    yield server, client
    server.close()
    client.close()


def test_peer_closed_false_while_the_peer_is_connected(pair: tuple[socket.socket, socket.socket]) -> None:
    server, _client = pair
    assert not peer_closed(server)


def test_peer_closed_true_after_the_peer_closes(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.close()
    time.sleep(0.05)
    assert peer_closed(server)


def test_peer_closed_leaves_pending_bytes_unread(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.sendall(b"GET / HTTP/1.1\r\n")
    time.sleep(0.05)
    assert not peer_closed(server)
    assert server.recv(100) == b"GET / HTTP/1.1\r\n"


def test_watchdog_stops_a_stream_when_its_client_leaves(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    stopped = threading.Event()
    watch = DisconnectWatchdog().watch(server, stopped.set)
    assert watch is not None
    client.close()
    assert stopped.wait(2.0)
    assert watch.stop_reason() == "client_gone"


def test_a_sleep_ends_when_the_client_leaves(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    watch = DisconnectWatchdog().watch(server, None)
    assert watch is not None
    threading.Timer(0.2, client.close).start()
    started = time.monotonic()
    assert watch.sleep(10.0)  # a resume's backoff, cut short
    assert time.monotonic() - started < 5.0
    started = time.monotonic()
    assert watch.sleep(10.0)  # and any sleep after the stop returns at once
    assert time.monotonic() - started < 1.0


def test_a_sleep_after_a_stop_returns_at_once(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    watch = DisconnectWatchdog().watch(server, None)
    assert watch is not None
    client.close()
    deadline = time.monotonic() + 5.0
    while watch.stop_reason() is None:  # stopped before any sleep made its event
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = time.monotonic()
    assert watch.sleep(10.0)
    assert time.monotonic() - started < 1.0


def test_a_sleep_without_a_stop_lasts_its_time(pair: tuple[socket.socket, socket.socket]) -> None:
    server, _client = pair
    watch = DisconnectWatchdog().watch(server, None)
    assert watch is not None
    started = time.monotonic()
    assert not watch.sleep(0.3)
    assert time.monotonic() - started >= 0.3
    watch.cancel()


class _Body:
    """A relay's body as a watch sees it: its shutdowns."""

    def __init__(self) -> None:
        self.shutdowns = 0
        self.shut = threading.Event()

    def shutdown(self) -> None:
        self.shutdowns += 1
        self.shut.set()


def test_a_watch_without_on_stop_shuts_down_the_body_attached_last(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A relay attaches each body it reads (the first, then each resumed one): a client leaving
    ends the one being read, not the first (closed already)."""
    server, client = pair
    watch = DisconnectWatchdog().watch(server)
    assert watch is not None
    first, resumed = _Body(), _Body()
    watch.attach(t.cast(t.Any, first))
    watch.attach(t.cast(t.Any, resumed))
    client.close()
    assert resumed.shut.wait(2.0)
    assert watch.stop_reason() == "client_gone"
    assert (first.shutdowns, resumed.shutdowns) == (0, 1)


def test_a_departure_costs_the_watchdog_no_question_to_the_socket(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[socket.socket] = []

    def counted(sock: socket.socket) -> bool:
        asked.append(sock)
        return peer_closed(sock)

    monkeypatch.setattr(watchdog_module, "peer_closed", counted)
    server, client = pair
    watchdog = DisconnectWatchdog()
    stopped = threading.Event()
    other, its_peer = socket.socketpair()
    with other, its_peer:
        assert watchdog.watch(other, lambda: None) is not None  # starts the thread
        time.sleep(0.7)  # a wait of epoll that began before the next watch ends
        watch = watchdog.watch(server, stopped.set)
        assert watch is not None
        time.sleep(0.7)  # and one that began after it
        client.close()
        assert stopped.wait(2.0)
    assert watch.stop_reason() == "client_gone"
    assert asked == []  # only a watch younger than the wait asks whether its event is its own


def _watched_until_gone(pair: tuple[socket.socket, socket.socket]) -> DisconnectWatchdog:
    """A watchdog that watched the server side of ``pair`` until its client left, which leaves the
    descriptor registered until it is closed."""
    server, client = pair
    watchdog = DisconnectWatchdog()
    stopped = threading.Event()
    assert watchdog.watch(server, stopped.set) is not None
    client.close()
    assert stopped.wait(2.0)
    return watchdog


def test_a_gone_clients_descriptor_can_be_watched_again(pair: tuple[socket.socket, socket.socket]) -> None:
    watchdog = _watched_until_gone(pair)
    assert watchdog.watch(pair[0], lambda: None) is not None


def test_a_watch_without_departures_is_stopped_only_by_the_worker_stopping(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, client = pair
    monkeypatch.setattr(watchdog_module, "_drain_check", None)  # restored after the test
    monkeypatch.setattr(watchdog_module, "_drain_grace", 30.0)
    worker_stopping = threading.Event()
    drain_when(worker_stopping.is_set, 30.0)
    stopped = threading.Event()
    watch = DisconnectWatchdog().watch(server, stopped.set, departures=False)
    assert watch is not None
    watch.set_resumable(True)
    client.close()
    assert not stopped.wait(1.0)  # its caller polls the socket and sees the client leave itself
    assert watch.stop_reason() is None
    worker_stopping.set()
    assert stopped.wait(2.0)
    assert watch.stop_reason() == "shutdown"


def test_a_watch_without_departures_ignores_what_a_gone_clients_registration_reports(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server = pair[0]
    watchdog = _watched_until_gone(pair)
    stopped = threading.Event()
    watch = watchdog.watch(server, stopped.set, departures=False)
    assert watch is not None
    time.sleep(0.7)  # a wait of epoll that began after the watch
    server.shutdown(socket.SHUT_RDWR)  # a new event on the old registration
    assert not stopped.wait(1.0)
    assert watch.stop_reason() is None


def test_watchdog_ignores_a_live_client_and_honours_cancel(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    stopped = threading.Event()
    watch = DisconnectWatchdog().watch(server, stopped.set)
    assert watch is not None
    client.sendall(b"pipelined bytes")
    assert not stopped.wait(0.7)
    watch.cancel()
    client.close()
    assert not stopped.wait(0.7)
    assert watch.stop_reason() is None


def test_watchdog_ends_a_write_that_exceeds_the_send_timeout(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, _client = pair
    stopped = threading.Event()
    watch = DisconnectWatchdog(send_timeout=0.3).watch(server, stopped.set)
    assert watch is not None
    watch.writing(True)  # and the client never reads
    assert stopped.wait(3.0)
    assert watch.stop_reason() == "send_timeout"
    with pytest.raises(OSError):
        for _ in range(100):
            server.sendall(b"x" * 65536)  # the client side was shut down
