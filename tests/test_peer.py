"""One end of a relayed WebSocket connection over a real socket pair: messages whole whatever their
size, nothing read on a spurious wake-up, no half-close after the peer's own end, and a close that
never waits on a peer that stopped reading."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.protocol import OPEN
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from wsgi_proxy.wire.websocket import Peer


@pytest.fixture
def pair() -> Iterator[tuple[Peer, socket.socket]]:
    """The proxy's end as a Peer (a server), and the raw socket of the client's end."""
    ours, theirs = socket.socketpair()
    theirs.settimeout(5)
    yield Peer(ours, ServerProtocol(state=OPEN, max_size=None), send_timeout=5), theirs
    ours.close()
    theirs.close()


def _client_reads(sock: socket.socket, protocol: ClientProtocol, wanted: int) -> list[bytes]:
    """What the client's end received: the payloads of ``wanted`` data frames."""
    payloads: list[bytes] = []
    while len(payloads) < wanted:
        protocol.receive_data(sock.recv(65536))
        payloads += [bytes(event.data) for event in protocol.events_received()]
    return payloads


@pytest.mark.parametrize("size", [0, 1, 65536, 8 * 1024 * 1024], ids=["empty", "byte", "a-read", "8-MiB"])
def test_a_message_arrives_whole_whether_the_socket_takes_it_at_once_or_not(
    pair: tuple[Peer, socket.socket], size: int
) -> None:
    peer, theirs = pair
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    received: list[bytes] = []
    client = ClientProtocol(parse_uri("ws://proxy/"), state=OPEN, max_size=None)
    reader = threading.Thread(target=lambda: received.extend(_client_reads(theirs, client, 1)))
    reader.start()  # 8 MiB overflows the socket's buffer: the first write takes part, the timed rest
    peer.send((Opcode.BINARY, payload))
    reader.join(10)
    assert received == [payload]


def test_a_spurious_wake_up_reads_nothing_and_keeps_the_connection(pair: tuple[Peer, socket.socket]) -> None:
    peer, _theirs = pair
    assert peer.receive() == []
    assert peer.open and not peer.ended


def test_the_peers_own_end_ends_the_connection_without_a_half_close(pair: tuple[Peer, socket.socket]) -> None:
    peer, theirs = pair
    theirs.shutdown(socket.SHUT_WR)  # the client leaves without a close frame
    assert peer.receive() == []
    assert peer.ended and peer.close_code is None
    theirs.settimeout(0.3)
    with pytest.raises(TimeoutError):  # no FIN before the socket's close: the close says it once
        theirs.recv(1)


def test_a_close_at_once_costs_no_wait_on_a_peer_that_stopped_reading(
    pair: tuple[Peer, socket.socket],
) -> None:
    peer, _theirs = pair
    peer.sock.settimeout(0.2)
    with pytest.raises(TimeoutError):  # fill both buffers: the client's end reads nothing
        while True:
            peer.sock.sendall(b"\0" * 65536)
    peer.sock.settimeout(5)  # what a timed close would wait for
    started = time.monotonic()
    peer.close_at_once(1000)
    assert time.monotonic() - started < 0.5
    assert not peer.open


def test_a_close_at_once_reaches_a_peer_that_reads(pair: tuple[Peer, socket.socket]) -> None:
    peer, theirs = pair
    peer.close_at_once(1001)
    client = ClientProtocol(parse_uri("ws://proxy/"), state=OPEN, max_size=None)
    client.receive_data(theirs.recv(65536))
    assert client.close_rcvd is not None and client.close_rcvd.code == 1001
