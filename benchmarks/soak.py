"""Soak: many background streams cut 1-3 times each, plus many clients that leave mid-stream.

    python benchmarks/soak.py                    # 1,000 cut streams + 1,000 disconnects (minutes)
    python benchmarks/soak.py --quick            # 60 + 60, for CI (nothing written)

Every stream is a background streamed create whose upstream connection the simulator cuts every K
events (K drawn so that each stream is cut 1 to 3 times); the proxy must resume each transparently,
so the client sees every event exactly once. The disconnecting clients read a few events and close.
Reported: events delivered, lost and duplicated, streams that ended without their terminal event,
resumes done by the proxy, upstream streams still open 2 s after the last client left, and the
proxy worker's threads and RSS before and after.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import typing as t
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from harness import CLIENT_KEY, process_status, save_result, start_bed, worker_pid

from wsgi_proxy.wire.sse import EventSplitter, parse_event

WORDS = 24  # 24 deltas: a stream of 33 events, so cutting every 9, 12 or 17 events cuts it 3, 2 or 1 times
EVENTS = WORDS + 9  # created, queued, in_progress, item/part added, the deltas, 3 done events, completed


def _stream(base: str, cut_every: int, leave_after: int | None) -> dict[str, t.Any]:
    body = {
        "model": "gpt-4o-mini",
        "input": "soak",
        "background": True,
        "stream": True,
        "metadata": {"sim_words": str(WORDS), "sim_delay_ms": "20", "sim_cut_every": str(cut_every)},
    }
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    seen: list[int] = []
    terminal = False
    error = None
    try:
        with requests.post(
            base + "/responses", json=body, headers=headers, stream=True, timeout=60
        ) as answer:
            splitter = EventSplitter()
            while chunk := answer.raw.read1(65536):
                for event in splitter.feed(chunk):
                    info = parse_event(event)
                    if info.sequence_number is not None:
                        seen.append(info.sequence_number)
                    terminal = terminal or info.type == "response.completed"
                if leave_after is not None and len(seen) >= leave_after:
                    break
    except requests.RequestException as exc:
        error = type(exc).__name__
    return {"seen": seen, "terminal": terminal, "error": error, "left": leave_after is not None}


def run(streams: int, leavers: int, concurrency: int) -> dict[str, t.Any]:
    rng = random.Random(7)
    with tempfile.TemporaryDirectory(prefix="wsgi-proxy-soak-") as scratch:
        tmp = Path(scratch)
        bed = start_bed(tmp, threads=concurrency + 50, extra=["--backlog", "2048"], log_level="info")
        try:
            worker = worker_pid(bed.proxy.pid)
            before = process_status(worker)
            jobs: list[tuple[int, int | None]] = [(rng.choice((9, 12, 17)), None) for _ in range(streams)]
            jobs += [(rng.choice((9, 12, 17)), rng.randint(1, 12)) for _ in range(leavers)]
            rng.shuffle(jobs)
            start = time.monotonic()
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                results = list(pool.map(lambda job: _stream(bed.proxied, *job), jobs))
            elapsed = time.monotonic() - start
            time.sleep(2.0)
            open_upstream = requests.get(bed.direct.removesuffix("/v1") + "/_sim/streams", timeout=10).json()[
                "open"
            ]
            after = process_status(worker)
            resumes = bed.proxy.log().count("resumed upstream stream")
            aborted = bed.proxy.log().count("aborting the client connection")
        finally:
            bed.stop()
    full = [r for r in results if not r["left"]]
    delivered = sum(len(r["seen"]) for r in full)
    duplicated = sum(len(r["seen"]) - len(set(r["seen"])) for r in full)
    lost = sum(EVENTS - len(set(r["seen"])) for r in full)  # gaps and a missing tail alike
    incomplete = sum(1 for r in full if not r["terminal"])
    return {
        "streams": streams,
        "disconnecting_clients": leavers,
        "concurrency": concurrency,
        "seconds": round(elapsed, 1),
        "events_delivered": delivered,
        "events_lost": lost,
        "events_duplicated": duplicated,
        "streams_without_terminal_event": incomplete,
        "client_errors": sum(1 for r in full if r["error"]),
        "proxy_resumes": resumes,
        "proxy_aborts": aborted,
        "upstream_streams_open_2s_after": open_upstream,
        "worker_before": before,
        "worker_after": after,
    }


def bench(quick: bool) -> dict[str, t.Any]:
    """The run ``--quick`` (60 + 60 streams, 30 at a time) or the default one (1,000 + 1,000, 200) does."""
    return run(60, 60, 30) if quick else run(1000, 1000, 200)


def ok(result: t.Mapping[str, t.Any]) -> bool:
    """Every event delivered exactly once, every stream whole, no client error."""
    return not (
        result["events_lost"]
        or result["events_duplicated"]
        or result["client_errors"]
        or result["streams_without_terminal_event"]
    )


def main(argv: t.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--leavers", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="60 + 60 streams, nothing written (CI)")
    args = parser.parse_args(argv)
    result = bench(True) if args.quick else run(args.streams, args.leavers, args.concurrency)
    print(json.dumps(result, indent=2))
    if not args.quick:
        save_result("soak", result)
    return 0 if ok(result) else 1


if __name__ == "__main__":
    sys.exit(main())
