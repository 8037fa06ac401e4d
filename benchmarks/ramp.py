"""Thousands of background streams opened at a steady rate: the first byte of each, and memory.

    python benchmarks/ramp.py --streams 10000 --rate 1000   # writes benchmarks/results/ramp-<date>.json
    python benchmarks/ramp.py --quick                        # 500 streams, for CI (nothing written)

The simulator (its own process, its streams written by one thread so that it holds them all) and
the proxy with the default two workers (threads sized to the
streams), as deployed. One client thread opens background streams on raw sockets at ``rate`` per
second, first straight to the simulator and then through the proxy, and one selector reads them
all: each stream's first byte is timed from its request. Then every client leaves at once, and the
run times how long the upstream takes to see its streams closed. Reported for both: first bytes
within 30 s and 60 s, their p50/p99, the workers' RSS per open stream and threads, the seconds to
free the upstream streams, and whether gunicorn killed a worker (``WORKER TIMEOUT``).
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

import requests
from harness import CLIENT_KEY, UPSTREAM_KEY, process_status, save_result, start_bed

BODY = json.dumps(
    {
        "model": "gpt-4o-mini",
        "input": "hold",
        "background": True,
        "stream": True,
        "metadata": {"sim_delay_ms": "4000", "sim_words": "1000"},
    }
).encode()


def _request(port: int, key: str, prefix: str) -> bytes:
    return (
        f"POST {prefix}/responses HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY


def _workers(master: int) -> list[int]:
    return [int(pid) for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split()]


def _open_streams(sim_url: str) -> int | None:
    """The simulator's open streams, or None when it does not answer (it is overloaded)."""
    try:
        return int(requests.get(sim_url + "/_sim/streams", timeout=30).json()["open"])
    except requests.RequestException:
        return None


def ramp(
    port: int,
    key: str,
    prefix: str,
    streams: int,
    rate: float,
    sim_url: str,
    during: t.Callable[[], object] = lambda: None,
) -> dict[str, t.Any]:
    """Open ``streams`` at ``rate`` per second, wait for their first bytes, note ``during()`` with
    them all open, then leave."""
    request = _request(port, key, prefix)
    selector = selectors.DefaultSelector()
    opened: dict[int, float] = {}
    first: dict[int, float] = {}
    sockets: list[socket.socket] = []
    failed = 0
    started = time.monotonic()
    deadline = started + streams / rate + 60.0

    def pump(timeout: float) -> None:
        for key_, _ in selector.select(timeout):
            sock = t.cast(socket.socket, key_.fileobj)
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            fd = sock.fileno()
            if data and fd not in first:
                first[fd] = time.monotonic() - opened[fd]
            if not data:
                selector.unregister(sock)

    for n in range(streams):
        due = started + n / rate
        while (now := time.monotonic()) < due:
            pump(min(0.01, due - now))
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(request)
        except OSError:
            failed += 1
            continue
        sock.setblocking(False)
        opened[sock.fileno()] = time.monotonic()
        selector.register(sock, selectors.EVENT_READ)
        sockets.append(sock)
    while len(first) < len(sockets) and time.monotonic() < deadline:
        pump(0.2)
    latencies = sorted(first.values())
    upstream_open = _open_streams(sim_url)
    noted = during()
    left = time.monotonic()
    for sock in sockets:
        sock.close()
    freed_after = None
    while time.monotonic() - left < 60:
        still = _open_streams(sim_url)
        if still is not None and still <= max(1, streams // 100):
            freed_after = round(time.monotonic() - left, 2)
            break
        time.sleep(0.1)

    def pct(q: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3) if latencies else None

    return {
        "streams": streams,
        "connect_failures": failed,
        "first_byte_within_30s": sum(1 for v in latencies if v <= 30),
        "first_byte_within_60s": sum(1 for v in latencies if v <= 60),
        "first_byte_p50_s": pct(0.5),
        "first_byte_p99_s": pct(0.99),
        "upstream_streams_open_before_leaving": upstream_open,
        "seconds_until_upstream_streams_closed": freed_after,
        "during": noted,
    }


def run(streams: int, rate: float) -> dict[str, t.Any]:
    with tempfile.TemporaryDirectory(prefix="wsgi-proxy-ramp-") as scratch:
        tmp = Path(scratch)
        threads = streams // 2 + 500
        bed = start_bed(
            tmp,
            threads=threads,
            extra=["--backlog", "8192"],
            env={"WSGI_PROXY_WORKERS": "2"},
            shared_writer=True,
        )
        sim_url = bed.direct.removesuffix("/v1")
        try:
            direct = ramp(int(sim_url.rsplit(":", 1)[1]), UPSTREAM_KEY, "/v1", streams, rate, sim_url)
            time.sleep(3.0)
            workers = _workers(bed.proxy.pid)
            before = sum(process_status(pid)["rss_kb"] for pid in workers)

            def workers_now() -> list[dict[str, int]]:
                return [process_status(pid) for pid in _workers(bed.proxy.pid)]

            proxied = ramp(bed.proxy_port, CLIENT_KEY, "/v1", streams, rate, sim_url, workers_now)
            killed = "WORKER TIMEOUT" in bed.proxy.log()
            now = workers_now()
        finally:
            bed.stop()
    open_rss = sum(w["rss_kb"] for w in proxied["during"])
    return {
        "streams": streams,
        "rate_per_s": rate,
        "rss_per_open_stream_kb": round((open_rss - before) / streams, 1),
        "direct": direct,
        "proxied": proxied,
        "workers_rss_kb_before": before,
        "workers_after": now,
        "worker_killed_by_timeout": killed,
        "machine": {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")},
    }


def bench(quick: bool) -> dict[str, t.Any]:
    """The run ``--quick`` (500 streams at 500/s) or the default one (10,000 at 1,000/s) does."""
    return run(500, 500.0) if quick else run(10000, 1000.0)


def main(argv: t.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=10000)
    parser.add_argument("--rate", type=float, default=1000.0, help="streams opened per second")
    parser.add_argument("--quick", action="store_true", help="500 streams, nothing written (CI)")
    args = parser.parse_args(argv)
    result = bench(True) if args.quick else run(args.streams, args.rate)
    print(json.dumps(result, indent=2))
    if not args.quick:
        save_result("ramp", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
