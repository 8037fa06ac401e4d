"""WebSocket mode: the delay the proxy adds to each frame, and the sessions one worker holds.

    python benchmarks/wsmode.py            # full run, writes benchmarks/results/websocket-<date>.json
    python benchmarks/wsmode.py --quick    # a few seconds, for CI (nothing written)

The simulator (its own process) and one proxy worker (gthread), as in the other benchmarks.

- **Added delay per frame.** Responses are created on a connection straight to the simulator and on
  one through the proxy, turn about; the simulator stamps every frame with ``time.monotonic()`` as
  it sends it (``sim_stamp``), a clock every process of the machine shares, so each frame's one-way
  delay is its arrival minus its stamp. Reported: p50/p99 of the delays direct and proxied, and of
  the difference (what the proxy adds).
- **Sessions per worker.** N client connections held open on raw sockets from one thread, each after
  one warm-up create (so each holds its upstream socket too): idle, then the same number with a
  response running on each (a frame every 500 ms). The worker's RSS and threads before, with the
  sessions open, and after they closed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import selectors
import socket
import statistics
import sys
import tempfile
import time
import typing as t
from pathlib import Path

from harness import CLIENT_KEY, UPSTREAM_KEY, process_status, save_result, start_bed, worker_pid
from websockets.frames import Frame, Opcode
from websockets.sync.client import ClientConnection, connect
from websockets.sync.connection import Connection

# (turns for the delay, frames per turn, sessions held)
QUICK = (10, 20, 100)
FULL = (60, 50, 1000)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _open(base: str, key: str) -> ClientConnection:
    url = base.replace("http://", "ws://") + "/responses"
    return connect(
        url, additional_headers={"Authorization": f"Bearer {key}"}, max_size=None, compression=None
    )


def _turn(ws: Connection, words: int) -> list[float]:
    """One create; the one-way delay of each frame, in milliseconds."""
    metadata = {"sim_stamp": "1", "sim_words": str(words), "sim_delay_ms": "5"}
    ws.send(
        json.dumps({"type": "response.create", "model": "gpt-4o-mini", "input": "x", "metadata": metadata})
    )
    delays = []
    while True:
        data = ws.recv(timeout=30, decode=False)
        now = time.monotonic()
        frame = json.loads(data)
        delays.append((now - frame["sim_sent_at"]) * 1000)
        if frame["type"] in ("response.completed", "error"):
            return delays


def bench_frame_delay(direct: str, proxied: str, turns: int, words: int) -> dict[str, t.Any]:
    samples: dict[str, list[float]] = {"direct": [], "proxied": []}
    with _open(direct, UPSTREAM_KEY) as straight, _open(proxied, CLIENT_KEY) as through:
        _turn(straight, 3), _turn(through, 3)  # warm both paths
        for n in range(turns):
            order = [("direct", straight), ("proxied", through)]
            for name, ws in order if n % 2 else reversed(order):
                samples[name] += _turn(ws, words)
    p50 = {name: _pct(values, 0.5) for name, values in samples.items()}
    p99 = {name: _pct(values, 0.99) for name, values in samples.items()}
    return {
        "frames": {name: len(values) for name, values in samples.items()},
        "direct_p50_ms": p50["direct"],
        "direct_p99_ms": p99["direct"],
        "proxied_p50_ms": p50["proxied"],
        "proxied_p99_ms": p99["proxied"],
        "added_p50_ms": p50["proxied"] - p50["direct"],
        "added_p99_ms": p99["proxied"] - p99["direct"],
        "added_mean_ms": statistics.fmean(samples["proxied"]) - statistics.fmean(samples["direct"]),
        "samples": samples,
    }


def _handshake(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /v1/responses HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {CLIENT_KEY}\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("the proxy closed a connection during the handshake")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"the proxy refused a session: {head[:80]!r}")
    return sock


def _send(sock: socket.socket, payload: dict[str, t.Any]) -> None:
    sock.sendall(Frame(Opcode.TEXT, json.dumps(payload).encode()).serialize(mask=True, extensions=[]))


def hold_sessions(port: int, worker: int, count: int, *, active: bool) -> dict[str, t.Any]:
    """Open ``count`` sessions (each with a warm-up, so its upstream socket is open); with ``active``
    a slow response runs on each. Returns the worker's status with them open."""
    sockets = []
    selector = selectors.DefaultSelector()
    received = 0
    started = time.monotonic()
    for _ in range(count):
        sock = _handshake(port)
        _send(sock, {"type": "response.create", "model": "gpt-4o-mini", "input": "x", "generate": False})
        if active:
            metadata = {"sim_delay_ms": "500", "sim_words": "1000"}
            _send(
                sock, {"type": "response.create", "model": "gpt-4o-mini", "input": "x", "metadata": metadata}
            )
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        sockets.append(sock)
    opened = time.monotonic() - started
    deadline = time.monotonic() + 4.0
    live: set[int] = set()
    while time.monotonic() < deadline:
        for key, _ in selector.select(0.2):
            sock = t.cast(socket.socket, key.fileobj)
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            received += len(data)
            live.add(sock.fileno())
    status = process_status(worker)
    for sock in sockets:
        selector.unregister(sock)
        sock.close()
    return {"sessions": count, "sessions_receiving": len(live), "seconds_to_open": round(opened, 2), **status}


def bench_sessions(bed_port: int, worker: int, count: int) -> dict[str, t.Any]:
    before = process_status(worker)
    idle = hold_sessions(bed_port, worker, count, active=False)
    time.sleep(2.0)
    active = hold_sessions(bed_port, worker, count, active=True)
    time.sleep(3.0)
    after = process_status(worker)
    return {
        "worker_before": before,
        "idle": idle,
        "active": active,
        "worker_after_close": after,
        "rss_per_idle_session_kb": round((idle["rss_kb"] - before["rss_kb"]) / count, 1),
        "rss_per_active_session_kb": round((active["rss_kb"] - before["rss_kb"]) / count, 1),
    }


def bench(quick: bool) -> dict[str, t.Any]:
    turns, words, sessions = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="wsgi-proxy-ws-") as scratch:
        bed = start_bed(Path(scratch), threads=sessions + 50, extra=["--backlog", "4096"])
        try:
            delay = bench_frame_delay(bed.direct, bed.proxied, turns, words)
            held = bench_sessions(bed.proxy_port, worker_pid(bed.proxy.pid), sessions)
        finally:
            bed.stop()
    return {
        "frame_delay": delay,
        "sessions": held,
        "machine": {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")},
    }


def main(argv: t.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a few seconds, nothing written")
    args = parser.parse_args(argv)
    result = bench(args.quick)
    shown = {**result, "frame_delay": {k: v for k, v in result["frame_delay"].items() if k != "samples"}}
    print(json.dumps(shown, indent=2))
    if not args.quick:
        save_result("websocket", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
