"""Concurrent open streams held by one gunicorn worker, and the worker's memory per stream.

    python benchmarks/capacity.py --streams 1000     # writes benchmarks/results/capacity-<date>.json
    python benchmarks/capacity.py --quick            # 100 streams, writes nothing (CI)

One proxy worker (gthread, threads = streams + 50) in front of the simulator (its own process).
The client opens N background streams on raw sockets from one thread (so the client costs little),
keeps them open while events trickle (one every 500 ms), and samples the worker's RSS and thread
count before the streams, with all N open, and after they were closed.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import sys
import tempfile
import time
import typing as t
from pathlib import Path

from harness import CLIENT_KEY, process_status, save_result, start_bed, worker_pid


def _open_stream(port: int, body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    head = (
        f"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    sock.setblocking(False)
    return sock


def run(streams: int, hold: float) -> dict[str, t.Any]:
    with tempfile.TemporaryDirectory(prefix="wsgi-proxy-capacity-") as scratch:
        tmp = Path(scratch)
        bed = start_bed(tmp, threads=streams + 50, extra=["--backlog", "4096"])
        proxy_port = bed.proxy_port
        try:
            worker = worker_pid(bed.proxy.pid)
            time.sleep(0.5)
            before = process_status(worker)
            body = json.dumps(
                {
                    "model": "gpt-4o-mini",
                    "input": "hold",
                    "background": True,
                    "stream": True,
                    "metadata": {"sim_delay_ms": "500", "sim_words": "1000"},
                }
            ).encode()
            selector = selectors.DefaultSelector()
            received: dict[int, int] = {}
            start = time.monotonic()
            for _ in range(streams):
                sock = _open_stream(proxy_port, body)
                selector.register(sock, selectors.EVENT_READ)
                received[sock.fileno()] = 0
            opened = time.monotonic() - start

            def pump(seconds: float) -> None:
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    for key, _ in selector.select(0.2):
                        sock = t.cast(socket.socket, key.fileobj)
                        try:
                            data = sock.recv(65536)
                        except BlockingIOError:
                            continue
                        received[sock.fileno()] += len(data)

            pump(hold)
            live = sum(1 for n in received.values() if n > 0)
            during = process_status(worker)
            pump(1.0)
            for key in list(selector.get_map().values()):
                selector.unregister(key.fileobj)
                t.cast(socket.socket, key.fileobj).close()
            time.sleep(3.0)
            after = process_status(worker)
        finally:
            bed.stop()
    per_stream_kb = (during["rss_kb"] - before["rss_kb"]) / streams
    return {
        "streams": streams,
        "streams_receiving_events": live,
        "seconds_to_open": round(opened, 2),
        "worker_before": before,
        "worker_with_streams_open": during,
        "worker_after_close": after,
        "rss_per_stream_kb": round(per_stream_kb, 1),
        "machine": {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")},
    }


def bench(quick: bool) -> dict[str, t.Any]:
    """The run ``--quick`` (100 streams held 3 s) or the default one (1,000 streams held 8 s) does."""
    return run(100, 3.0) if quick else run(1000, 8.0)


def main(argv: t.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--hold", type=float, default=8.0, help="seconds to keep the streams open")
    parser.add_argument("--quick", action="store_true", help="100 streams, nothing written (CI)")
    args = parser.parse_args(argv)
    result = bench(True) if args.quick else run(args.streams, args.hold)
    print(json.dumps(result, indent=2))
    if not args.quick:
        save_result("capacity", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
