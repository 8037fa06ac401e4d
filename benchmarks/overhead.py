"""Overhead of the proxy against the direct upstream, measured in one run on this machine.

    python benchmarks/overhead.py            # full run, writes benchmarks/results/overhead-<date>.json
    python benchmarks/overhead.py --quick    # a few seconds, for CI (nothing written)

`bench(quick)` returns the same figures plus the raw samples (milliseconds) behind them, which
`benchmarks/run.py` charts.

The simulator runs as its own process (`wsgi-proxy simulate`) and the proxy under gunicorn with
the repository's gunicorn.conf.py (1 worker), with a SQLite store as a config file has it (each
create's locator and usage recorded); the client is this process, on loopback. Reported:

- added latency per non-streaming call: p50/p99 of (proxy - direct) over sequential creates;
- added delay per event: one live stream read directly and through the proxy at the same time,
  each event's arrival through the proxy minus its arrival direct;
- events/s of one stream: a stored replay of many events, direct vs through the proxy;
- with 32 concurrent clients: non-stream creates/s, and events/s of streamed creates, direct,
  through the proxy and through the floor forwarder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
import typing as t
from pathlib import Path

import requests
from harness import CLIENT_KEY, UPSTREAM_KEY, Bed, save_result, start_bed, start_floor

from wsgi_proxy.wire.sse import EventSplitter, parse_event

#: Concurrent clients of the throughput measure.
CLIENTS = 32
# (sequential non-stream calls, live events for the per-event delay, events of the replay)
QUICK_SIZES = (50, 50, 2000)
FULL_SIZES = (1000, 300, 50000)
Sizes = tuple[int, int, int]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _session(key: str) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.headers.update({"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    return session


def latency_samples(targets: t.Mapping[str, tuple[str, str]], calls: int) -> dict[str, list[float]]:
    """Milliseconds per sequential non-stream create, for each ``name: (key, base URL)`` of ``targets``.

    The targets take turns, in an order that rotates every call, so that machine noise hits each alike.
    """
    body = json.dumps({"model": "gpt-4o-mini", "input": "hi", "metadata": {"sim_words": "3"}})
    results: dict[str, list[float]] = {name: [] for name in targets}
    sessions = {name: (_session(key), base) for name, (key, base) in targets.items()}
    names = list(targets)
    for i in range(calls + 20):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            session, base = sessions[name]
            start = time.perf_counter()
            answer = session.post(base + "/responses", data=body, timeout=30)
            elapsed = time.perf_counter() - start
            assert answer.status_code == 200, f"{name}: {answer.status_code} {answer.text[:500]}"
            if i >= 20:  # warm-up excluded
                results[name].append(elapsed * 1000)
    return results


def bench_latency(direct: str, proxied: str, calls: int, floor: str | None = None) -> dict[str, t.Any]:
    """Sequential non-stream creates, direct and through the proxy (and through ``floor``, the
    minimal forwarder of floor_app.py, when given)."""
    targets = {"direct": (UPSTREAM_KEY, direct), "proxy": (CLIENT_KEY, proxied)}
    if floor is not None:
        targets["floor"] = (CLIENT_KEY, floor)
    results = latency_samples(targets, calls)
    d, p = results["direct"], results["proxy"]
    figures = {
        "direct_p50_ms": _pct(d, 0.5),
        "direct_p99_ms": _pct(d, 0.99),
        "proxy_p50_ms": _pct(p, 0.5),
        "proxy_p99_ms": _pct(p, 0.99),
        "added_p50_ms": _pct(p, 0.5) - _pct(d, 0.5),
        "added_p99_ms": _pct(p, 0.99) - _pct(d, 0.99),
        "samples": results,
    }
    if floor is not None:
        f = results["floor"]
        figures |= {
            "floor_p50_ms": _pct(f, 0.5),
            "floor_p99_ms": _pct(f, 0.99),
            "floor_added_p50_ms": _pct(f, 0.5) - _pct(d, 0.5),
            "floor_added_p99_ms": _pct(f, 0.99) - _pct(d, 0.99),
        }
    return figures


def _arrivals(session: requests.Session, url: str, out: dict[int, float], ready: threading.Barrier) -> None:
    with session.get(url, stream=True, timeout=60) as answer:
        ready.wait()
        splitter = EventSplitter()
        while chunk := answer.raw.read1(65536):
            now = time.perf_counter()
            for event in splitter.feed(chunk):
                seq = parse_event(event).sequence_number
                if seq is not None:
                    out[seq] = now


def _create_background_stream(direct: str, metadata: dict[str, str]) -> str:
    """Start a background streamed response directly upstream; return its id."""
    body = {
        "model": "gpt-4o-mini",
        "input": "bench",
        "background": True,
        "stream": True,
        "metadata": metadata,
    }
    with _session(UPSTREAM_KEY).post(direct + "/responses", json=body, stream=True, timeout=30) as first:
        splitter = EventSplitter()
        while chunk := first.raw.read1(65536):
            for event in splitter.feed(chunk):
                if parse_event(event).type == "response.created":
                    data = event.split(b"data:", 1)[1]
                    return str(json.loads(data)["response"]["id"])
    raise RuntimeError("the simulator sent no response.created event")


def bench_event_delay(direct: str, proxied: str, events: int) -> dict[str, t.Any]:
    response_id = _create_background_stream(direct, {"sim_words": str(events), "sim_delay_ms": "10"})
    path = f"/responses/{response_id}?stream=true"
    direct_at: dict[int, float] = {}
    proxy_at: dict[int, float] = {}
    ready = threading.Barrier(2)
    readers = [
        threading.Thread(target=_arrivals, args=(_session(UPSTREAM_KEY), direct + path, direct_at, ready)),
        threading.Thread(target=_arrivals, args=(_session(CLIENT_KEY), proxied + path, proxy_at, ready)),
    ]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    # Events replayed from the store before both readers were attached are not live: skip the first 5.
    delays = [(proxy_at[s] - direct_at[s]) * 1000 for s in sorted(direct_at) if s in proxy_at and s >= 5]
    assert len(direct_at) == len(proxy_at), (len(direct_at), len(proxy_at))
    return {
        "events": len(delays),
        "added_p50_ms": _pct(delays, 0.5),
        "added_p99_ms": _pct(delays, 0.99),
        "samples": delays,
    }


def _drain(session: requests.Session, url: str) -> tuple[int, float]:
    start = time.perf_counter()
    count = 0
    with session.get(url, stream=True, timeout=120) as answer:
        splitter = EventSplitter()
        while chunk := answer.raw.read1(65536):
            count += len(splitter.feed(chunk))
    return count, time.perf_counter() - start


def bench_throughput(direct: str, proxied: str, events: int) -> dict[str, float]:
    response_id = _create_background_stream(direct, {"sim_words": str(events), "sim_delay_ms": "0"})
    time.sleep(1.0 if events < 10000 else 3.0)  # let generation finish: the replay is then pure reading
    path = f"/responses/{response_id}?stream=true"
    best: dict[str, float] = {}
    for _ in range(3):
        for name, session, base in (
            ("direct", _session(UPSTREAM_KEY), direct),
            ("proxy", _session(CLIENT_KEY), proxied),
        ):
            count, seconds = _drain(session, base + path)
            best[name] = max(best.get(name, 0.0), count / seconds)
    return {
        "events": events,
        "direct_events_per_s": best["direct"],
        "proxy_events_per_s": best["proxy"],
        "ratio": best["proxy"] / best["direct"],
    }


def _load(session: requests.Session, url: str, stream: bool, until: float, counts: list[int]) -> None:
    """One client: creates, one after the other, until ``until``; counts calls or events."""
    metadata = {"sim_words": "100", "sim_delay_ms": "0"} if stream else {"sim_words": "3"}
    body = json.dumps({"model": "gpt-4o-mini", "input": "hi", "stream": stream, "metadata": metadata})
    while time.monotonic() < until:
        with session.post(url, data=body, stream=stream, timeout=60) as answer:
            if answer.status_code != 200:
                raise RuntimeError(f"a create answered {answer.status_code}")
            if not stream:
                counts.append(1)
                continue
            splitter = EventSplitter()
            events = 0
            while chunk := answer.raw.read1(65536):
                events += len(splitter.feed(chunk))
            counts.append(events)


def concurrent_rates(
    targets: t.Mapping[str, tuple[str, str]], clients: int = CLIENTS, seconds: float = 5.0
) -> dict[str, dict[str, float]]:
    """Non-stream creates/s and streamed events/s (100 deltas a stream) with ``clients`` concurrent
    clients (threads of this process, each with its own connection), each target in turn."""
    found: dict[str, dict[str, float]] = {"creates_per_s": {}, "stream_events_per_s": {}}
    for name, (key, base) in targets.items():
        for stream, measure_name in ((False, "creates_per_s"), (True, "stream_events_per_s")):
            counts: list[int] = []
            until = time.monotonic() + seconds
            threads = [
                threading.Thread(
                    target=_load, args=(_session(key), base + "/responses", stream, until, counts)
                )
                for _ in range(clients)
            ]
            start = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            found[measure_name][name] = round(sum(counts) / (time.monotonic() - start), 1)
    return found


def _machine() -> dict[str, t.Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }


def measure(direct: str, proxied: str, sizes: Sizes, floor: str | None = None) -> dict[str, t.Any]:
    """The three measures on a running simulator (``direct``) and proxy (``proxied``).

    The raw samples, in milliseconds, are moved to ``"samples"``: ``direct``, ``proxy`` and
    ``floor`` (one per non-stream call) and ``event_delay`` (one per live event).
    """
    latency = bench_latency(direct, proxied, sizes[0], floor)
    event_delay = bench_event_delay(direct, proxied, sizes[1])
    calls = latency.pop("samples")
    targets = {"direct": (UPSTREAM_KEY, direct), "proxy": (CLIENT_KEY, proxied)}
    if floor is not None:
        targets["floor"] = (CLIENT_KEY, floor)
    rates = concurrent_rates(targets, seconds=2.0 if sizes == QUICK_SIZES else 5.0)
    return {
        "machine": _machine(),
        "latency": latency,
        "event_delay": event_delay,
        "throughput": bench_throughput(direct, proxied, sizes[2]),
        "concurrency": {"clients": CLIENTS, **rates},
        "samples": {**calls, "event_delay": event_delay.pop("samples")},
    }


def bench(
    quick: bool, alongside: t.Callable[[Bed, Path, Sizes], dict[str, t.Any]] | None = None
) -> dict[str, t.Any]:
    """Start a simulator and a proxy, measure, stop them; return the results with their samples.

    ``alongside``, when given, is called on the same running simulator and proxy once the measures
    are done (``benchmarks/run.py`` puts other proxies side by side there); its answer is returned
    under ``"alongside"``.
    """
    sizes = QUICK_SIZES if quick else FULL_SIZES
    with tempfile.TemporaryDirectory(prefix="wsgi-proxy-bench-") as scratch:
        # Everything on, as a config file has it: a SQLite store records each create's locator and usage.
        store = {"WSGI_PROXY_STORE_URL": f"sqlite:///{Path(scratch) / 'state.db'}"}
        bed = start_bed(Path(scratch), threads=64, delay_ms=0, env=store)
        try:
            floor, floor_url = start_floor(Path(scratch), bed.direct)
            try:
                results = measure(bed.direct, bed.proxied, sizes, floor_url)
            finally:
                floor.stop()
            if alongside is not None:
                results["alongside"] = alongside(bed, Path(scratch), sizes)
        finally:
            bed.stop()
    return results


def main(argv: t.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a short run that writes nothing (CI)")
    args = parser.parse_args(argv)
    results = bench(args.quick)
    del results["samples"]  # the figures only: the samples are for run.py's chart
    lat, ev, thr = results["latency"], results["event_delay"], results["throughput"]
    print(f"machine: {results['machine']}")
    rows = [
        ("measure", "direct", "through proxy", "added / ratio"),
        ("---", "---", "---", "---"),
        (
            "non-stream call p50",
            f"{lat['direct_p50_ms']:.2f} ms",
            f"{lat['proxy_p50_ms']:.2f} ms",
            f"+{lat['added_p50_ms']:.2f} ms",
        ),
        (
            "non-stream call p99",
            f"{lat['direct_p99_ms']:.2f} ms",
            f"{lat['proxy_p99_ms']:.2f} ms",
            f"+{lat['added_p99_ms']:.2f} ms",
        ),
        (
            "non-stream call p50 / p99, minimal Flask + requests forwarder (floor_app.py)",
            "-",
            f"{lat['floor_p50_ms']:.2f} / {lat['floor_p99_ms']:.2f} ms",
            f"+{lat['floor_added_p50_ms']:.2f} / +{lat['floor_added_p99_ms']:.2f} ms",
        ),
        (
            f"per-event delay p50 / p99 ({ev['events']} live events)",
            "-",
            "-",
            f"+{ev['added_p50_ms']:.2f} / +{ev['added_p99_ms']:.2f} ms",
        ),
        (
            f"one stream, events/s ({thr['events']} events)",
            f"{thr['direct_events_per_s']:,.0f}",
            f"{thr['proxy_events_per_s']:,.0f}",
            f"{thr['ratio']:.2f}x",
        ),
    ]
    rates = results["concurrency"]
    for measure_name, label in (("creates_per_s", "creates/s"), ("stream_events_per_s", "stream events/s")):
        found = rates[measure_name]
        rows.append(
            (
                f"{rates['clients']} concurrent clients, {label}",
                f"{found['direct']:,.0f}",
                f"{found['proxy']:,.0f} (floor {found['floor']:,.0f})",
                f"{found['proxy'] / found['direct']:.2f}x",
            )
        )
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if not args.quick:
        save_result("overhead", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
