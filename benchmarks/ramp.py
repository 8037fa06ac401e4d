"""Thousands of streams opened at a steady rate and held: first bytes, events on time, memory, CPU.

    python benchmarks/ramp.py                                # 10,000 SSE streams and 10,000 idle
                                                             # WebSocket sessions at 250/s
    python benchmarks/ramp.py --streams 5000 --rate 1000     # another size or rate
    python benchmarks/ramp.py --quick                        # 500 of each at 250/s, for CI

The simulator (its own process; its background streams written by one thread, so that it holds them
all) and, in front of it with the default two workers and threads sized to the streams, the proxy
and the floor forwarder (``floor_app.py``: Flask and requests with nothing else), as deployed (the
proxy with its SQLite store, which records where each response lives, as a config file has it); and
LiteLLM's proxy when it is installed (``litellm_proxy.py``), given at most :data:`LITELLM_MOST`
streams and rate (what its create rate allows). One client thread opens background streams
on raw sockets at ``rate`` per second, to each target in turn, and one selector reads them all. The
simulator stamps every event with the time it sent it (``sim_stamp``, a clock all processes share),
so that each event's delay is its arrival minus its stamp; each stream sends one event every
``EVENT_EVERY_S`` seconds. Then every client leaves at once, and the run times how long the
upstream takes to see its streams closed. Then the same with idle WebSocket sessions (the upgrade
answered, then nothing), for the targets that speak the mode.

Reported per target: first bytes (the 101 for a session) within 30 s and 60 s and their p50/p99,
the event delay's p50/p99, the workers' RSS per open stream (against their RSS before the phase)
and threads, the CPU milliseconds per stream of the workers and of the simulator over the phase,
the seconds to free the upstream's streams, and whether gunicorn killed a worker
(``WORKER TIMEOUT``) in this phase and while it was opening, holding or leaving; and what else the
machine did (its load before the phase, the share of its CPU the hypervisor stole, and the CPU
seconds spent outside the bench's processes), so that a starved machine is not taken for a slow
target. Each phase starts on new workers. The default rate is one this 2-core
machine sustains for the three processes together: at 1,000/s even the floor forwarder's first
bytes fall behind (see the README's sizing).
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import datetime
import json
import os
import re
import selectors
import signal
import socket
import sys
import tempfile
import time
import typing as t
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import litellm_proxy
import requests
from harness import (
    CLIENT_KEY,
    UPSTREAM_KEY,
    cpu_seconds,
    process_status,
    save_result,
    start_bed,
    start_floor,
)

from wsgi_proxy.tools.launch import ServerProcess

EVENT_EVERY_S = 4.0
BODY = json.dumps(
    {
        "model": "gpt-4o-mini",
        "input": "hold",
        "background": True,
        "stream": True,
        "metadata": {"sim_delay_ms": str(int(EVENT_EVERY_S * 1000)), "sim_words": "1000", "sim_stamp": "1"},
    }
).encode()
KINDS = ("sse", "websocket")
#: How long a phase waits for the upstream to see its clients gone. The simulator alone has taken
#: 146 s and 206 s to let go of 10,000 WebSocket sessions that left at once (a thread each, all
#: woken together) on slow days; stopped after 60 s, it was still too busy to answer and sank the run.
FREED_WAIT_S = 300.0
_STAMP = re.compile(rb'"sim_sent_at":\s*([0-9.]+)')  # also where a proxy re-serialised the event
_PING = 0x89


@dataclass
class Target:
    """Where one phase's clients connect, and the processes whose memory and CPU it costs."""

    name: str
    port: int
    key: str
    processes: t.Callable[[], list[int]] = list
    server: ServerProcess | None = None
    websockets: bool = True
    most: tuple[int, float] | None = None
    """The most streams this target is given, and the fastest rate (None: the run's)."""


@dataclass(frozen=True)
class Upstream:
    """The simulator: its URL (without ``/v1``) and its process."""

    url: str
    pid: int


@dataclass
class _Client:
    """One open stream or session as the client sees it."""

    sock: socket.socket
    opened: float
    first: float | None = None
    status: str = ""
    """The status code of the answer (``"?"``: not HTTP)."""
    head: bytes = b""
    upgraded: bool = False
    frames: bytearray = field(default_factory=bytearray)


def _stream_request(port: int, key: str) -> bytes:
    return (
        f"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY


def _upgrade_request(port: int, key: str) -> bytes:
    nonce = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /v1/responses HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: {nonce}\r\n\r\n"
    ).encode()


def _pongs(frames: bytearray) -> bytes:
    """The masked pongs answering the pings at the start of ``frames`` (consumed); other frames
    (an idle session gets none) are dropped."""
    out = bytearray()
    while len(frames) >= 2:
        size = frames[1] & 0x7F
        if size >= 126 or len(frames) < 2 + size:
            break
        payload = bytes(frames[2 : 2 + size])
        if frames[0] == _PING:
            mask = os.urandom(4)
            out += bytes([0x8A, 0x80 | size]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        del frames[: 2 + size]
    return bytes(out)


def _port(url: str) -> int:
    port = urllib.parse.urlsplit(url).port
    assert port is not None, url
    return port


def _workers(master: int) -> list[int]:
    return [int(pid) for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split()]


def _upstream_open(upstream: Upstream, kind: str) -> int | None:
    """The simulator's open streams or WebSocket sessions, or None when it does not answer."""
    try:
        counts = requests.get(upstream.url + "/_sim/streams?closures=false", timeout=30).json()
    except requests.RequestException:
        return None
    return int(counts["open" if kind == "sse" else "websockets"])


def _errors(server: ServerProcess | None) -> dict[str, int]:
    """The ``error`` fields of the proxy's JSON log lines so far, counted (``client_gone`` aside:
    every stream of a phase ends so)."""
    found: collections.Counter[str] = collections.Counter()
    for line in server.log().splitlines() if server is not None else []:
        if line.startswith("{") and '"error"' in line:
            with contextlib.suppress(ValueError):
                error = json.loads(line).get("error")
                if error and error != "client_gone":
                    found[str(error)[:120]] += 1
    return dict(found)


def _statuses(pids: list[int]) -> list[dict[str, int]]:
    """The memory and threads of those of ``pids`` still running."""
    found = []
    for pid in pids:
        with contextlib.suppress(OSError):
            found.append(process_status(pid))
    return found


def _cpu(pids: list[int]) -> dict[int, float]:
    """The CPU seconds used so far by those of ``pids`` still running (a killed worker is missing)."""
    found = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            found[pid] = cpu_seconds(pid)
    return found


def _machine_ticks() -> tuple[int, int, int]:
    """The machine's CPU ticks so far (``/proc/stat``): busy, stolen by the hypervisor, and all."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = ticks
    return user + nice + system + irq + softirq, steal, sum(ticks)


def _killed_while(server: ServerProcess | None, stages: list[tuple[str, float]]) -> list[str]:
    """The stage of this phase (``stages``: each one's name and wall-clock start, in order) in which
    gunicorn logged each ``WORKER TIMEOUT``, to the second of its log's timestamps. The log is the
    server's whole life: a kill in an earlier phase is not this one's."""
    found = []
    for line in server.log().splitlines() if server is not None else []:
        if "WORKER TIMEOUT" in line and line.startswith("["):
            stamp = datetime.datetime.strptime(line[1:26], "%Y-%m-%d %H:%M:%S %z").timestamp()
            started = [name for name, start in stages if stamp >= int(start)]
            found += started[-1:]
    return found


def _curve(samples: list[tuple[int, int]], clients: list[_Client], step: int) -> list[dict[str, t.Any]]:
    """The capacity curve: at each sample, the streams opened, the workers' RSS, and the first-byte
    p50 of the ``step`` streams opened just before."""
    points = []
    for opened, rss in samples:
        firsts = sorted(c.first for c in clients[max(0, opened - step) : opened] if c.first is not None)
        points.append(
            {"opened": opened, "rss_mb": round(rss / 1024, 1), "first_byte_p50_s": _pct(firsts, 0.5)}
        )
    return points


def _pct(values: list[float], q: float) -> float | None:
    return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else None


def ramp(target: Target, kind: str, streams: int, rate: float, upstream: Upstream) -> dict[str, t.Any]:
    """Open ``streams`` streams (``kind`` "sse") or idle sessions ("websocket") to ``target`` at
    ``rate`` per second, keep them until every first byte came, then leave."""
    request = (_stream_request if kind == "sse" else _upgrade_request)(target.port, target.key)
    selector = selectors.DefaultSelector()
    clients: list[_Client] = []
    delays: list[float] = []  # while streams are being opened, until each has its first byte
    held: list[float] = []  # then: the steady state
    curve: list[tuple[int, int]] = []  # (streams opened, the workers' RSS then)
    failed = 0
    processes = target.processes()
    rss_before = sum(w["rss_kb"] for w in _statuses(processes))
    cpu_before = _cpu(processes + [upstream.pid])
    ticks_before, own_before, load_before = _machine_ticks(), time.process_time(), os.getloadavg()[0]
    stages = [("opening", time.time())]
    started = time.monotonic()
    deadline = started + streams / rate + 60.0
    settled = False

    def pump(timeout: float) -> None:
        for key_, _ in selector.select(timeout):
            client = t.cast(_Client, key_.data)
            try:
                data = client.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            now = time.monotonic()
            if not data:
                selector.unregister(client.sock)
                continue
            if client.first is None:
                client.first = now - client.opened
                client.status = data[9:12].decode(errors="replace") if data.startswith(b"HTTP/1.1 ") else "?"
            if kind == "sse":
                found = held if settled else delays
                found.extend((now - float(m.group(1))) * 1000 for m in _STAMP.finditer(data))
            elif not client.upgraded:
                client.head += data
                head, sep, rest = client.head.partition(b"\r\n\r\n")
                if sep:
                    client.upgraded = head.startswith(b"HTTP/1.1 101")
                    client.frames += rest
            else:
                client.frames += data
                if pong := _pongs(client.frames):
                    client.sock.sendall(pong)

    for n in range(streams):
        if processes and n % max(1, streams // 20) == 0:
            curve.append((n, sum(w["rss_kb"] for w in _statuses(processes))))
        due = started + n / rate
        while (now := time.monotonic()) < due:
            pump(min(0.01, due - now))
        try:
            sock = socket.create_connection(("127.0.0.1", target.port), timeout=10)
            sock.sendall(request)
        except OSError:
            failed += 1
            continue
        sock.setblocking(False)
        client = _Client(sock, time.monotonic())
        selector.register(sock, selectors.EVENT_READ, client)
        clients.append(client)
    while any(c.first is None for c in clients) and time.monotonic() < deadline:
        pump(0.2)
    settled = True
    stages.append(("holding", time.time()))
    if kind == "sse":  # every stream's next event, on time or late
        until = time.monotonic() + 2 * EVENT_EVERY_S + 1
        while time.monotonic() < until:
            pump(0.2)
    firsts = sorted(c.first for c in clients if c.first is not None)
    upstream_open = _upstream_open(upstream, kind)
    during = _statuses(processes)
    left = time.monotonic()
    stages.append(("leaving", time.time()))
    for client in clients:
        client.sock.close()
    freed_after = None
    while time.monotonic() - left < FREED_WAIT_S:
        still = _upstream_open(upstream, kind)
        if still is not None and still <= max(1, streams // 100):
            freed_after = round(time.monotonic() - left, 2)
            break
        time.sleep(0.1)
    cpu_after = _cpu(list(cpu_before))
    busy, steal, ticks = (now - then for now, then in zip(_machine_ticks(), ticks_before, strict=True))
    ours = sum(cpu - cpu_before[pid] for pid, cpu in cpu_after.items()) + time.process_time() - own_before
    used = {pid: round((cpu - cpu_before[pid]) / streams * 1000, 2) for pid, cpu in cpu_after.items()}
    delays.sort()
    held.sort()
    result: dict[str, t.Any] = {
        "streams": streams,
        "rate_per_s": rate,
        "connect_failures": failed,
        "answers": dict(collections.Counter(c.status for c in clients if c.first is not None)),
        "first_byte_within_30s": sum(1 for v in firsts if v <= 30),
        "first_byte_within_60s": sum(1 for v in firsts if v <= 60),
        "first_byte_p50_s": _pct(firsts, 0.5),
        "first_byte_p99_s": _pct(firsts, 0.99),
        "upstream_open_before_leaving": upstream_open,
        "seconds_until_upstream_closed": freed_after,
        "simulator_cpu_ms_per_stream": used.get(upstream.pid),
        # What else the machine did meanwhile: a busy or starved machine, not the target, may be
        # what a slow phase measured (a killed worker's CPU counts as the machine's here).
        "load_before": round(load_before, 2),
        "machine_steal_pct": round(100 * steal / max(1, ticks), 2),
        "cpu_outside_the_bench_s": round(busy / os.sysconf("SC_CLK_TCK") - ours, 1),
    }
    if kind == "sse":
        result |= {
            "events_while_opening": len(delays),
            "event_delay_while_opening_p50_ms": _pct(delays, 0.5),
            "event_delay_while_opening_p99_ms": _pct(delays, 0.99),
            "events_all_open": len(held),
            "event_delay_p50_ms": _pct(held, 0.5),
            "event_delay_p99_ms": _pct(held, 0.99),
        }
    else:
        result["upgraded"] = sum(1 for c in clients if c.upgraded)
    if processes:
        killed = _killed_while(target.server, stages)
        curve.append((streams, sum(w["rss_kb"] for w in during)))
        result["curve"] = _curve(curve, clients, max(1, streams // 20))
        result |= {
            "workers_cpu_ms_per_stream": round(sum(used.get(pid, 0.0) for pid in processes), 2),
            "workers_gone": sum(1 for pid in processes if pid not in used),
            "rss_per_open_stream_kb": round((sum(w["rss_kb"] for w in during) - rss_before) / streams, 1),
            "threads": sum(w["threads"] for w in during),
            "worker_killed_by_timeout": bool(killed),
            "worker_killed_while": killed,
            "errors_logged": _errors(target.server),
        }
    return result


def _settle(upstream: Upstream, target: Target) -> None:
    """End what a phase left running in the simulator (background responses go on without their
    clients) and forget its records, and give ``target`` new workers (SIGHUP), so that the next
    phase starts from the same state: no threads or memory left from this one. The simulator may
    still be seeing the phase's clients leave it (for minutes on a slow day), so it gets as long to
    answer as a departure is waited for."""
    requests.post(upstream.url + "/_sim/stop", timeout=FREED_WAIT_S)
    requests.post(upstream.url + "/_sim/reset", timeout=FREED_WAIT_S)
    if target.server is not None:
        old = set(target.processes())
        target.server.signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = set(target.processes())
            if len(now) == len(old) and not now & old:
                break
            time.sleep(0.2)
    time.sleep(3.0)


#: What LiteLLM's proxy is given (streams, per second), when it is installed: it answered ~100
#: creates/s with 32 clients here (``run.py``), so 10,000 at 250/s would overflow its listen queue
#: and stall the one thread that opens every stream in its connects.
LITELLM_MOST = (1000, 50.0)


def run(streams: int, rate: float, kinds: t.Sequence[str] = KINDS) -> dict[str, t.Any]:
    """Every target's SSE phase, then every target's WebSocket phase (of ``kinds``), one after the
    other; each phase's result is also printed to stderr as it ends. LiteLLM's proxy is a target
    too when ``litellm_proxy.command()`` finds it, with at most :data:`LITELLM_MOST`."""
    with tempfile.TemporaryDirectory(prefix="wsgi-proxy-ramp-") as scratch:
        tmp = Path(scratch)
        threads = streams // 2 + 500
        # The proxy as a config file deploys it: its store (SQLite) records every stream's locator.
        env = {"WSGI_PROXY_WORKERS": "2", "WSGI_PROXY_STORE_URL": f"sqlite:///{tmp / 'state.db'}"}
        backlog = ["--backlog", "8192"]
        bed = start_bed(tmp, threads=threads, extra=backlog, env=env, shared_writer=True)
        sim_url = bed.direct.removesuffix("/v1")
        upstream = Upstream(sim_url, bed.simulator.pid)
        floor, floor_url = start_floor(tmp, bed.direct, threads=threads, workers=2, extra=backlog)
        litellm, _version = litellm_proxy.command()
        rival = None
        if litellm is not None:
            try:
                rival, rival_url = litellm_proxy.start(litellm, tmp, bed.direct, UPSTREAM_KEY)
            except Exception as exc:  # a comparison must never sink the run
                print(f"litellm: did not start ({type(exc).__name__}); not measured", file=sys.stderr)
        targets = [
            Target("direct", _port(sim_url), UPSTREAM_KEY),
            Target(
                "floor",
                _port(floor_url),
                CLIENT_KEY,
                lambda: _workers(floor.pid),
                floor,
                websockets=False,
            ),
            Target("proxy", bed.proxy_port, CLIENT_KEY, lambda: _workers(bed.proxy.pid), bed.proxy),
        ]
        if rival is not None:
            pid = rival.pid
            targets.append(
                Target(
                    "litellm",
                    _port(rival_url),
                    litellm_proxy.LITELLM_KEY,
                    lambda: [pid, *_workers(pid)],
                    rival,
                    websockets=False,
                    most=LITELLM_MOST,
                )
            )
        phases: dict[str, dict[str, t.Any]] = {kind: {} for kind in kinds}
        try:
            for kind, found in phases.items():
                for target in targets:
                    if kind == "websocket" and not target.websockets:
                        continue
                    most, fastest = target.most or (streams, rate)
                    found[target.name] = ramp(target, kind, min(streams, most), min(rate, fastest), upstream)
                    print(kind, target.name, json.dumps(found[target.name]), file=sys.stderr, flush=True)
                    _settle(upstream, target)
        finally:
            if rival is not None:
                rival.stop()
            floor.stop()
            bed.stop()
    return {
        "streams": streams,
        "rate_per_s": rate,
        "event_every_s": EVENT_EVERY_S,
        **phases,
        "machine": {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")},
    }


def bench(quick: bool) -> dict[str, t.Any]:
    """The run ``--quick`` (500 at 250/s) or the default one (10,000 at 250/s) does."""
    return run(500, 250.0) if quick else run(10000, 250.0)


def main(argv: t.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=10000)
    parser.add_argument("--rate", type=float, default=250.0, help="streams opened per second")
    parser.add_argument("--kind", choices=KINDS, help="one kind of phase only (default: both)")
    parser.add_argument("--quick", action="store_true", help="500 of each, nothing written (CI)")
    args = parser.parse_args(argv)
    kinds = (args.kind,) if args.kind else KINDS
    result = bench(True) if args.quick else run(args.streams, args.rate, kinds)
    print(json.dumps(result, indent=2))
    if not args.quick:
        save_result("ramp", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
