"""File upload and download throughput through the gateway against the direct simulator.

    python benchmarks/uploads.py            # 200 MB, writes benchmarks/results/uploads-<date>.json
    python benchmarks/uploads.py --quick    # 20 MB, for CI (nothing written)

One multipart body is written to disk once and sent from there, turn about, straight to the
simulator and through one proxy worker (``WSGI_PROXY_ENDPOINTS=files``); then each uploaded file is
downloaded. Reported: MB/s of each, the proxied share of direct, and the worker's RSS before and at
its highest (sampled every 20 ms) while it relays.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import typing as t
from pathlib import Path

import requests
from harness import CLIENT_KEY, UPSTREAM_KEY, process_status, save_result, start_bed, worker_pid

BOUNDARY = "wsgi-proxy-bench-boundary"
ROUNDS = 3


def _multipart(path: Path, megabytes: int) -> int:
    """Write an upload's whole body to ``path``; its size."""
    with path.open("wb") as out:
        out.write(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="bench.jsonl"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        for _ in range(megabytes):
            out.write(os.urandom(1024 * 1024))
        out.write(f"\r\n--{BOUNDARY}--\r\n".encode())
    return path.stat().st_size


def _upload(base: str, key: str, body: Path) -> tuple[str, float]:
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Length": str(body.stat().st_size),
    }
    with body.open("rb") as data:
        started = time.perf_counter()
        answer = requests.post(base + "/files", data=data, headers=headers, timeout=300)
        seconds = time.perf_counter() - started
    answer.raise_for_status()
    return str(answer.json()["id"]), seconds


def _download(base: str, key: str, file_id: str) -> tuple[int, float]:
    started = time.perf_counter()
    size = 0
    headers = {"Authorization": f"Bearer {key}"}
    with requests.get(f"{base}/files/{file_id}/content", headers=headers, stream=True, timeout=300) as answer:
        answer.raise_for_status()
        while block := answer.raw.read(1024 * 1024):
            size += len(block)
    return size, time.perf_counter() - started


class _Peak(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = process_status(pid)["rss_kb"]
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, process_status(self.pid)["rss_kb"])


def run(megabytes: int) -> dict[str, t.Any]:
    with tempfile.TemporaryDirectory(prefix="wsgi-proxy-uploads-") as scratch:
        tmp = Path(scratch)
        body = tmp / "upload.multipart"
        size = _multipart(body, megabytes)
        env = {"WSGI_PROXY_ENDPOINTS": "files", "WSGI_PROXY_MAX_UPLOAD_BYTES": str(size + 1)}
        bed = start_bed(tmp, threads=16, delay_ms=0, env=env)
        try:
            worker = worker_pid(bed.proxy.pid)
            before = process_status(worker)["rss_kb"]
            peak = _Peak(worker)
            peak.start()
            seconds: dict[str, list[float]] = {
                "upload direct": [],
                "upload proxied": [],
                "download direct": [],
                "download proxied": [],
            }
            for n in range(ROUNDS):
                order = [("direct", bed.direct, UPSTREAM_KEY), ("proxied", bed.proxied, CLIENT_KEY)]
                for name, base, key in order if n % 2 else reversed(order):
                    file_id, took = _upload(base, key, body)
                    seconds[f"upload {name}"].append(took)
                    received, took = _download(base, key, file_id)
                    assert received == megabytes * 1024 * 1024, received
                    seconds[f"download {name}"].append(took)
            peak.stop.set()
            peak.join()
        finally:
            bed.stop()
    rates = {name: round(megabytes / statistics.median(values), 1) for name, values in seconds.items()}
    return {
        "megabytes": megabytes,
        "rounds": ROUNDS,
        "mb_per_s": rates,
        "upload_share_of_direct": round(rates["upload proxied"] / rates["upload direct"], 3),
        "download_share_of_direct": round(rates["download proxied"] / rates["download direct"], 3),
        "worker_rss_kb_before": before,
        "worker_rss_kb_peak": peak.peak,
        "machine": {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")},
    }


def bench(quick: bool) -> dict[str, t.Any]:
    """The run ``--quick`` (20 MB) or the default one (200 MB) does."""
    return run(20 if quick else 200)


def main(argv: t.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a short run that writes nothing (CI)")
    args = parser.parse_args(argv)
    result = bench(args.quick)
    print(json.dumps(result, indent=2))
    if not args.quick:
        save_result("uploads", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
