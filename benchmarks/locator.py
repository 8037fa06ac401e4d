"""The cost of multi-tenancy per request: the locator, ownership check, rate counter and session pin.

    python benchmarks/locator.py           # writes benchmarks/results/locator-<date>.json
    python benchmarks/locator.py --quick   # a few seconds, for CI (nothing written)

Three proxies in front of one simulator, in one run: the single-upstream shorthand (no store), a
config-file gateway with its store in SQLite, and the same with Redis (when redis-server is
installed), a SQLite gateway whose model has two routes, its creates carrying a
``prompt_cache_key`` (each looks the session's pin up and writes it again), and a SQLite gateway
whose team has token and cost budgets (each create reads the spend, each answer adds to it). Each
create records where the response lives and counts the key's rate; each retrieve looks it up and
checks its owner.
Reported: p50/p99 of create and retrieve through each, and the added cost against the shorthand;
what each store operation costs alone, and how long a rate count waits in a busy worker.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import typing as t
from pathlib import Path

import requests
from harness import CLIENT_KEY, UPSTREAM_KEY, per_call_us, save_result, start_bed, start_proxy

from wsgi_proxy.store import StoreError
from wsgi_proxy.tools.launch import free_port

CONFIG = """
store_url = "{store}"
[[upstreams]]
name = "main"
url = "{direct}"
api_key_env = "BENCH_UPSTREAM_KEY"
{models}[teams.bench]
rpm = 1000000
{budgets}[[keys]]
name = "bench"
team = "bench"
key_env = "BENCH_CLIENT_KEY"
"""


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


#: A second upstream (the same simulator) and a model routed to both: session pins apply.
TWO_ROUTES = """[[upstreams]]
name = "again"
url = "{direct}"
api_key_env = "BENCH_UPSTREAM_KEY"
[[models]]
name = "gpt-4o-mini"
routes = [{{ upstream = "main" }}, {{ upstream = "again" }}]
"""
PINNED = "config file, sqlite store, two routes and a prompt_cache_key"

#: Budgets that never run out: each create reads the team's spend and each answer adds to it.
BUDGETS = "tpm = 1000000000\ntokens_per_day = 1000000000000\nusd_per_month = 1000000.0\n"
BUDGETED = "config file, sqlite store, three team budgets"


def _measure(base: str, calls: int, session_key: str | None = None) -> dict[str, float]:
    session = requests.Session()
    session.trust_env = False
    session.headers["Authorization"] = f"Bearer {CLIENT_KEY}"
    body: dict[str, t.Any] = {"model": "gpt-4o-mini", "input": "hi", "metadata": {"sim_words": "2"}}
    if session_key is not None:
        body["prompt_cache_key"] = session_key
    create: list[float] = []
    retrieve: list[float] = []
    for i in range(calls + 20):
        start = time.perf_counter()
        answer = session.post(base + "/responses", json=body, timeout=10)
        middle = time.perf_counter()
        assert answer.status_code == 200, answer.text
        assert session.get(f"{base}/responses/{answer.json()['id']}", timeout=10).status_code == 200
        end = time.perf_counter()
        if i >= 20:
            create.append((middle - start) * 1000)
            retrieve.append((end - middle) * 1000)
    return {
        "create_p50_ms": _pct(create, 0.5),
        "create_p99_ms": _pct(create, 0.99),
        "retrieve_p50_ms": _pct(retrieve, 0.5),
        "retrieve_p99_ms": _pct(retrieve, 0.99),
    }


def _store_costs(url: str, calls: int) -> dict[str, float]:
    """Microseconds per store operation a request adds, timed in this process."""
    from wsgi_proxy.store import ResponseRecord, open_store

    store = open_store(url)
    timings = {}
    try:
        for name, operation in (
            (
                "put_response_us",
                lambda i: store.put_response(
                    ResponseRecord(f"resp_{i}", "main", "bench", "bench", time.time(), False), 3600
                ),
            ),
            ("get_response_us", lambda i: store.get_response(f"resp_{i}")),
            ("hit_rate_us", lambda i: store.hit_rate("rpm:bench", 10**9)),
            ("pin_us", lambda i: store.pin(f"pin:{i % 100}", "main", 3600)),
            ("pinned_us", lambda i: store.pinned(f"pin:{i % 100}")),
            ("spend_us", lambda i: store.spend(["team:bench", "key:bench"])),
            ("record_usage_us", lambda i: store.record_usage(_entry(f"plain_{i}", ()))),
            ("record_usage_charged_us", lambda i: store.record_usage(_entry(f"charged_{i}", CHARGES))),
        ):
            timings[name] = round(per_call_us(operation, calls), 1)
    finally:
        store.close()
    return timings


def _contended(url: str, seconds: float) -> dict[str, float]:
    """Requests counted against one rate limit by 32 threads of a busy worker: beside 8 threads
    that hold the GIL 2 ms in every 4 (a worker's other requests), each counts one, then waits
    5 ms (its upstream). What a count waits for there is the GIL, and whatever lock its store
    holds across the waits."""
    from wsgi_proxy.store import open_store

    store = open_store(url)
    stop = threading.Event()
    waits: list[float] = []
    failures: list[str] = []

    def busy() -> None:
        while not stop.is_set():
            until = time.perf_counter() + 0.002
            while time.perf_counter() < until:
                pass
            time.sleep(0.002)

    def count() -> None:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                store.hit_rate("rpm:contended", 10**9)
            except StoreError as exc:
                failures.append(str(exc))
            waits.append(time.perf_counter() - start)  # list.append is atomic
            time.sleep(0.005)

    threads = [threading.Thread(target=busy) for _ in range(8)] + [
        threading.Thread(target=count) for _ in range(32)
    ]
    try:
        for thread in threads:
            thread.start()
        time.sleep(seconds)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        store.close()
    return {
        "counts_per_s": round(len(waits) / seconds, 1),
        "p50_ms": round(_pct(waits, 0.5) * 1000, 1),
        "p99_ms": round(_pct(waits, 0.99) * 1000, 1),
        "failed": len(failures),
    }


CHARGES = ("team:bench", "key:bench")


def _entry(response_id: str, charges: tuple[str, ...]) -> t.Any:
    from wsgi_proxy.store import UsageEntry
    from wsgi_proxy.wire.usage import Usage

    usage = Usage(input_tokens=12, cached_input_tokens=4, output_tokens=40, total_tokens=52)
    return UsageEntry(response_id, "bench", "bench", "gpt-4o-mini", "main", "default", usage, 25_200, charges)


def run(calls: int) -> dict[str, t.Any]:
    results: dict[str, t.Any] = {}
    with tempfile.TemporaryDirectory(prefix="wsgi-proxy-locator-") as scratch:
        tmp = Path(scratch)
        bed = start_bed(tmp, threads=64, delay_ms=0)
        servers = []
        redis_process = None
        try:
            stores = {"sqlite": f"sqlite:///{tmp / 'state.db'}"}
            if shutil.which("redis-server"):
                redis_port = free_port()
                redis_process = subprocess.Popen(
                    ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(0.5)
                stores["redis"] = f"redis://127.0.0.1:{redis_port}/0"
            gateways = {"shorthand (no store)": bed.proxied}
            variants = [(f"config file, {name} store", url, "", "") for name, url in stores.items()]
            two_routes = TWO_ROUTES.format(direct=bed.direct)
            variants.append((PINNED, f"sqlite:///{tmp / 'pinned.db'}", two_routes, ""))
            variants.append((BUDGETED, f"sqlite:///{tmp / 'budgeted.db'}", "", BUDGETS))
            for label, url, models, budgets in variants:
                path = tmp / f"{len(gateways)}.toml"
                path.write_text(CONFIG.format(store=url, direct=bed.direct, models=models, budgets=budgets))
                port = free_port()
                env = {
                    "WSGI_PROXY_CONFIG": str(path),
                    "BENCH_UPSTREAM_KEY": UPSTREAM_KEY,
                    "BENCH_CLIENT_KEY": CLIENT_KEY,
                }
                servers.append(start_proxy(tmp, port, env))
                gateways[label] = f"http://127.0.0.1:{port}/v1"
            for name, url in stores.items():
                results[f"store operations, {name}"] = _store_costs(url, calls * 2)
                results[f"store contended, {name}"] = _contended(url, max(calls / 200, 0.5))
            for _ in range(2):  # interleave rounds so that machine noise hits every proxy alike
                for name, base in gateways.items():
                    measured = _measure(base, calls // 2, "bench-session" if name == PINNED else None)
                    previous = results.get(name)
                    results[name] = (
                        measured
                        if previous is None
                        else {k: round((previous[k] + v) / 2, 3) for k, v in measured.items()}
                    )
        finally:
            for server in servers:
                server.stop()
            if redis_process is not None:
                redis_process.terminate()
                redis_process.wait(10)
            bed.stop()
    base = results["shorthand (no store)"]
    for measured in (m for name, m in results.items() if not name.startswith("store ")):
        measured["added_create_p50_ms"] = round(measured["create_p50_ms"] - base["create_p50_ms"], 3)
        measured["added_retrieve_p50_ms"] = round(measured["retrieve_p50_ms"] - base["retrieve_p50_ms"], 3)
    budgets = round(
        results[BUDGETED]["create_p50_ms"] - results["config file, sqlite store"]["create_p50_ms"], 3
    )
    return {
        "calls": calls,
        "date": time.strftime("%Y-%m-%d"),
        "results": results,
        "budget_checks_added_create_p50_ms": budgets,
    }


def bench(quick: bool) -> dict[str, t.Any]:
    """The run ``--quick`` (60 calls) or the default one (1,000 calls per gateway) does."""
    return run(60 if quick else 1000)


def main(argv: t.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a short run that writes nothing (CI)")
    args = parser.parse_args(argv)
    result = bench(args.quick)
    print("| proxy | create p50 / p99 | retrieve p50 / p99 | added per create / retrieve (p50) |")
    print("|---|---|---|---|")
    for name, m in result["results"].items():
        if name.startswith("store operations"):
            print(
                f"| {name} | " + ", ".join(f"{k.removesuffix('_us')} {v} µs" for k, v in m.items()) + " | | |"
            )
            continue
        if name.startswith("store contended"):
            print(
                f"| {name}: 32 threads count a request each 5 ms, 8 others hold the GIL half the time |"
                f" {m['counts_per_s']} counts/s | wait p50 {m['p50_ms']} / p99 {m['p99_ms']} ms |"
                f" {m['failed']} failed |"
            )
            continue
        print(
            f"| {name} | {m['create_p50_ms']} / {m['create_p99_ms']} ms | {m['retrieve_p50_ms']} /"
            f" {m['retrieve_p99_ms']} ms | +{m['added_create_p50_ms']} / +{m['added_retrieve_p50_ms']} ms |"
        )
    print(f"budget checks add {result['budget_checks_added_create_p50_ms']} ms to a create (p50, SQLite)")
    if not args.quick:
        save_result("locator", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
