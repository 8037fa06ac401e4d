"""The fault and attack suite of issue 10: what the gateway does when things go wrong, in figures.

    python benchmarks/faults.py            # every scenario, writes benchmarks/results/faults-<date>.json
    python benchmarks/faults.py --quick    # shorter scenarios, for CI (nothing written)

Each scenario runs the proxy under gunicorn (gunicorn.conf.py, two workers) in front of the
simulator on loopback, and reports what a client, the store and the worker saw:

- silent_upstream: a stream whose upstream goes silent for two minutes after three events, with
  keep-alives every second and a 3 s read timeout: how long until the client's stream ends, and how.
- store_outage: creates from 8 threads for a while, with Redis frozen (SIGSTOP) for 10 s in the
  middle: creates answered 200 / 503 / otherwise, and of the 200s how many have no locator and how
  many were not counted in the usage afterwards.
- lost_records: a response whose locator the store lost (FLUSHALL, as a Redis restart without
  persistence does), tried by another team and by its owner on every lifecycle route.
- idle_closers: 100 sockets that send ``Connection: close`` and never read: the slowest of five
  health checks meanwhile.
- slow_clients: 300 sockets sending their headers a byte every half second, then 300 whose body
  never arrives, against 2 x 64 threads, direct and through nginx (the README's configuration):
  the slowest of three health checks meanwhile.
- dense_body: a body of tiny JSON items of 1, 8 and 60 MiB: the answer, and the worker's RSS growth.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import typing as t
from pathlib import Path

import redis
import requests
from harness import UPSTREAM_KEY, process_status, save_result, worker_pid

from wsgi_proxy.store import open_store
from wsgi_proxy.tools.hostile import Dribblers, IdleClosers
from wsgi_proxy.tools.launch import ServerProcess, free_port, gunicorn_argv, nginx_server

REPO = Path(__file__).resolve().parents[1]
KEYS = {"RED_KEY": "sk-faults-red-key-0001", "BLUE_KEY": "sk-faults-blue-key-0002"}
CONFIG = """
store_url = "{store}"

[[upstreams]]
name = "sim"
url = "{upstream}"
api_key_env = "FAULTS_UPSTREAM_KEY"
read_timeout = {read_timeout}

[teams.red]
[teams.blue]

[[keys]]
name = "red"
team = "red"
key_env = "RED_KEY"

[[keys]]
name = "blue"
team = "blue"
key_env = "BLUE_KEY"
"""


class Gateway:
    """The simulator, a Redis server and the proxy (two workers) on free loopback ports."""

    def __init__(
        self, tmp: Path, env: t.Mapping[str, str] | None = None, workers: int = 2, read_timeout: float = 600
    ) -> None:
        sim_port, redis_port, port = free_port(), free_port(), free_port()
        self.simulator = ServerProcess(
            [
                sys.executable,
                "-m",
                "wsgi_proxy",
                "simulate",
                "--port",
                str(sim_port),
                "--api-key",
                UPSTREAM_KEY,
            ],
            ready_url=f"http://127.0.0.1:{sim_port}/health",
            cwd=tmp,
            log_path=tmp / "simulator.log",
        ).start()
        redis_server = shutil.which("redis-server") or "redis-server"
        self.redis = subprocess.Popen(
            [
                redis_server,
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.store_url = f"redis://127.0.0.1:{redis_port}/0"
        _wait_for_port(redis_port)
        config = tmp / "gateway.toml"
        upstream = f"http://127.0.0.1:{sim_port}/v1"
        config.write_text(CONFIG.format(store=self.store_url, upstream=upstream, read_timeout=read_timeout))
        self.proxy = ServerProcess(
            gunicorn_argv(f"127.0.0.1:{port}", config=REPO / "gunicorn.conf.py"),
            ready_url=f"http://127.0.0.1:{port}/healthz",
            env={
                "WSGI_PROXY_CONFIG": str(config),
                "FAULTS_UPSTREAM_KEY": UPSTREAM_KEY,
                "WSGI_PROXY_WORKERS": str(workers),
                "WSGI_PROXY_THREADS": "64",
                "WSGI_PROXY_LOG_LEVEL": "warning",
                **KEYS,
                **(env or {}),
            },
            cwd=tmp,
            log_path=tmp / "proxy.log",
        ).start()
        self.root = f"http://127.0.0.1:{port}"
        self.base = self.root + "/v1"

    def auth(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEYS[key]}", "Content-Type": "application/json"}

    def stop(self) -> None:
        self.proxy.stop()
        self.simulator.stop()
        self.redis.send_signal(signal.SIGCONT)
        self.redis.terminate()
        self.redis.wait(10)


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def silent_upstream(tmp: Path, quick: bool) -> dict[str, t.Any]:
    gateway = Gateway(tmp, {"WSGI_PROXY_KEEPALIVE_INTERVAL": "1"}, read_timeout=3)
    try:
        body = {
            "model": "m",
            "input": "x",
            "stream": True,
            "metadata": {"sim_gap_at": "3", "sim_gap_s": "120"},
        }
        started = time.monotonic()
        ending = "clean end"
        with requests.post(
            gateway.base + "/responses", json=body, headers=gateway.auth("RED_KEY"), stream=True
        ) as r:
            try:
                while r.raw.read1(65536):
                    pass
            except Exception as exc:  # the abort: no terminating chunk
                ending = f"aborted ({type(exc).__name__})"
        return {
            "stream_ended_after_s": round(time.monotonic() - started, 1),
            "ending": ending,
            "read_timeout_s": 3,
        }
    finally:
        gateway.stop()


def store_outage(tmp: Path, quick: bool) -> dict[str, t.Any]:
    gateway = Gateway(tmp)
    outage_s, before_s, after_s = (4.0, 2.0, 3.0) if quick else (10.0, 5.0, 8.0)
    created: list[str] = []
    statuses: dict[str, int] = {}
    lock = threading.Lock()
    stop = time.monotonic() + before_s + outage_s + after_s
    body = json.dumps({"model": "m", "input": "x", "metadata": {"sim_words": "3", "sim_delay_ms": "0"}})

    def client() -> None:
        session = requests.Session()
        while time.monotonic() < stop:
            try:
                answer = session.post(
                    gateway.base + "/responses", data=body, headers=gateway.auth("RED_KEY"), timeout=30
                )
                status = str(answer.status_code)
            except requests.RequestException as exc:
                status, answer = type(exc).__name__, None
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if answer is not None and answer.status_code == 200:
                    created.append(answer.json()["id"])

    threads = [threading.Thread(target=client) for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(before_s)
        gateway.redis.send_signal(signal.SIGSTOP)  # frozen: connections hang, then time out
        time.sleep(outage_s)
        gateway.redis.send_signal(signal.SIGCONT)
        for thread in threads:
            thread.join()
        time.sleep(2.0)  # the workers' queues of unwritten records flush every half second
        with open_store(gateway.store_url) as store:
            missing = [rid for rid in created if store.get_response(rid) is None]
            counted = sum(row.responses for row in store.usage_totals())
        return {
            "outage_s": outage_s,
            "answers": dict(sorted(statuses.items())),
            "created": len(created),
            "records_lost": len(missing),
            "responses_not_counted": len(created) - counted,
        }
    finally:
        gateway.stop()


LIFECYCLE = [
    ("GET", "/responses/{id}"),
    ("GET", "/responses/{id}/input_items"),
    ("POST", "/responses/{id}/cancel"),
    ("DELETE", "/responses/{id}"),
]


def lost_records(tmp: Path, quick: bool) -> dict[str, t.Any]:
    gateway = Gateway(tmp)
    try:
        answer = requests.post(
            gateway.base + "/responses",
            json={"model": "m", "input": "mine"},
            headers=gateway.auth("RED_KEY"),
            timeout=10,
        )
        response_id = answer.json()["id"]
        flushed = redis.Redis.from_url(gateway.store_url)
        flushed.flushall()  # what a restart of a Redis without persistence leaves
        flushed.close()
        results: dict[str, dict[str, int]] = {"other_team": {}, "owner": {}}
        for who, key in (("other_team", "BLUE_KEY"), ("owner", "RED_KEY")):
            for method, path in LIFECYCLE:
                status = requests.request(
                    method, gateway.base + path.format(id=response_id), headers=gateway.auth(key), timeout=10
                ).status_code
                results[who][str(status)] = results[who].get(str(status), 0) + 1
        chained = requests.post(
            gateway.base + "/responses",
            json={"model": "m", "input": "theirs", "previous_response_id": response_id},
            headers=gateway.auth("BLUE_KEY"),
            timeout=10,
        ).status_code
        results["other_team"][str(chained)] = results["other_team"].get(str(chained), 0) + 1
        return {"attempts_per_team": len(LIFECYCLE) + 1, "answers": results}
    finally:
        gateway.stop()


def idle_closers(tmp: Path, quick: bool) -> dict[str, t.Any]:
    gateway = Gateway(tmp)
    try:
        with IdleClosers(gateway.root, 100):
            time.sleep(0.5)
            slowest = _slowest_health(gateway.root, tries=5, limit=300)
        return {"idle_sockets": 100, "slowest_health_check_s": slowest}
    finally:
        gateway.stop()


def _slowest_health(root: str, tries: int = 3, limit: float = 20.0) -> float | str:
    slowest = 0.0
    for _ in range(tries):
        started = time.monotonic()
        try:
            requests.get(root + "/healthz", timeout=limit)
        except requests.RequestException:
            return f"no answer within {limit:g} s"
        slowest = max(slowest, time.monotonic() - started)
    return round(slowest, 3)


def slow_clients(tmp: Path, quick: bool) -> dict[str, t.Any]:
    """Slow-header and slow-body clients, more than the gateway's threads, direct and through nginx."""
    gateway = Gateway(tmp)  # 2 workers x 64 threads
    count = 300
    nginx = None
    if shutil.which("nginx") or os.path.exists("/usr/sbin/nginx"):
        port = free_port()
        nginx = nginx_server(port, int(gateway.root.rsplit(":", 1)[1]), tmp).start()
    results: dict[str, t.Any] = {"slow_clients": count, "threads": 128}
    try:
        for kind in ("headers", "body"):
            for front, root in (("direct", gateway.root), ("nginx", nginx and f"http://127.0.0.1:{port}")):
                if not root:
                    results[f"{kind}_{front}"] = "nginx not installed"
                    continue
                with Dribblers(root, kind, count):
                    time.sleep(2.0)
                    results[f"{kind}_{front}_slowest_health_s"] = _slowest_health(
                        root, limit=5 if quick else 20
                    )
                time.sleep(1.0)
        return results
    finally:
        if nginx is not None:
            nginx.stop()
        gateway.stop()


def dense_body(tmp: Path, quick: bool) -> dict[str, t.Any]:
    gateway = Gateway(tmp, workers=1)
    try:
        worker = worker_pid(gateway.proxy.pid)
        results = []
        for mib in (1, 8) if quick else (1, 8, 60):
            body = b'{"model":"m","input":[' + b"{}," * (mib * 2**20 // 3) + b"{}]}"
            before = process_status(worker)["rss_kb"]
            status = requests.post(
                gateway.base + "/responses", data=body, headers=gateway.auth("RED_KEY"), timeout=120
            )
            after = process_status(worker)["rss_kb"]
            results.append(
                {
                    "body_mib": mib,
                    "status": status.status_code,
                    "worker_rss_growth_mib": round((after - before) / 1024, 1),
                }
            )
        return {"bodies": results}
    finally:
        gateway.stop()


SCENARIOS: dict[str, t.Callable[[Path, bool], dict[str, t.Any]]] = {
    "silent_upstream": silent_upstream,
    "store_outage": store_outage,
    "lost_records": lost_records,
    "idle_closers": idle_closers,
    "slow_clients": slow_clients,
    "dense_body": dense_body,
}


def ok(result: t.Mapping[str, t.Any]) -> bool:
    """Whether every fault failed closed: streams cut, no record lost or uncounted, lost ids refused."""
    outage, lost = result["store_outage"], result["lost_records"]["answers"]
    return (
        result["silent_upstream"]["ending"].startswith("aborted")
        and outage["records_lost"] == 0
        and outage["responses_not_counted"] == 0
        and set(lost["other_team"]) == set(lost["owner"]) == {"404"}
        and all(body["status"] == 413 for body in result["dense_body"]["bodies"] if body["body_mib"] >= 8)
    )


def bench(quick: bool) -> dict[str, t.Any]:
    results = {}
    for name, scenario in SCENARIOS.items():
        with tempfile.TemporaryDirectory(prefix=f"wsgi-proxy-{name}-") as tmp:
            results[name] = scenario(Path(tmp), quick)
    return results


def main(argv: t.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="shorter scenarios that write nothing (CI)")
    args = parser.parse_args(argv)
    result = bench(args.quick)
    print(json.dumps(result, indent=2))
    if not args.quick:
        save_result("faults", result)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
