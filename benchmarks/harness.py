"""The benchmarks' test bed: the simulator and the proxy, each in its own process, on loopback."""

from __future__ import annotations

import json
import os
import sys
import time
import typing as t
from dataclasses import dataclass
from pathlib import Path

from wsgi_proxy.tools.launch import ServerProcess, free_port, gunicorn_argv

REPO = Path(__file__).resolve().parents[1]
UPSTREAM_KEY = "sk-bench-upstream"
CLIENT_KEY = "sk-bench-client-key"


@dataclass
class Bed:
    """A running simulator and proxy; ``direct`` and ``proxied`` are base URLs ending in ``/v1``."""

    simulator: ServerProcess
    proxy: ServerProcess
    direct: str
    proxied: str
    proxy_port: int

    def stop(self) -> None:
        self.proxy.stop()
        self.simulator.stop()


def start_bed(
    tmp: Path,
    *,
    threads: int,
    extra: t.Sequence[str] = (),
    delay_ms: float = 20.0,
    log_level: str = "warning",
    env: t.Mapping[str, str] | None = None,
    shared_writer: bool = False,
) -> Bed:
    """Start the simulator (``wsgi-proxy simulate``, its background streams written by one thread
    with ``shared_writer``) and one gunicorn worker of the proxy in front of it."""
    sim_port, proxy_port = free_port(), free_port()
    simulate = [sys.executable, "-m", "wsgi_proxy", "simulate", "--port", str(sim_port)]
    if shared_writer:
        simulate.append("--shared-writer")
    simulator = ServerProcess(
        [*simulate, "--api-key", UPSTREAM_KEY, "--delay-ms", str(delay_ms)],
        ready_url=f"http://127.0.0.1:{sim_port}/health",
        cwd=tmp,
        log_path=tmp / "simulator.log",
    ).start()
    direct = f"http://127.0.0.1:{sim_port}/v1"
    single = {"WSGI_PROXY_UPSTREAM_URL": direct, "WSGI_PROXY_UPSTREAM_API_KEY": UPSTREAM_KEY}
    try:
        proxy = start_proxy(
            tmp,
            proxy_port,
            {**single, "WSGI_PROXY_API_KEYS": CLIENT_KEY, **(env or {})},
            threads=threads,
            extra=extra,
            log_level=log_level,
        )
    except BaseException:
        simulator.stop()
        raise
    return Bed(simulator, proxy, direct, f"http://127.0.0.1:{proxy_port}/v1", proxy_port)


def start_floor(
    tmp: Path, upstream: str, *, threads: int = 64, workers: int = 1, extra: t.Sequence[str] = ()
) -> tuple[ServerProcess, str]:
    """The floor forwarder (``floor_app.py``) under the same gunicorn.conf.py (one worker unless
    told), in front of ``upstream``; returns it and its base URL (ending in ``/v1``)."""
    port = free_port()
    env = {
        "WSGI_PROXY_WORKERS": str(workers),
        "FLOOR_UPSTREAM_URL": upstream,
        "FLOOR_UPSTREAM_KEY": UPSTREAM_KEY,
        # gunicorn.conf.py checks the proxy's settings before any worker starts: give it valid ones.
        "WSGI_PROXY_UPSTREAM_URL": upstream,
        "WSGI_PROXY_UPSTREAM_API_KEY": UPSTREAM_KEY,
        "WSGI_PROXY_API_KEYS": CLIENT_KEY,
    }
    chdir = ["--chdir", str(REPO / "benchmarks"), *extra]
    floor = start_proxy(tmp, port, env, threads=threads, extra=chdir, app="floor_app:app")
    return floor, f"http://127.0.0.1:{port}/v1"


def start_proxy(
    tmp: Path,
    port: int,
    env: t.Mapping[str, str],
    *,
    threads: int = 64,
    extra: t.Sequence[str] = (),
    log_level: str = "warning",
    app: str | None = None,
) -> ServerProcess:
    """One gunicorn worker of the proxy (or of ``app``) on ``port``, configured by ``env``."""
    return ServerProcess(
        gunicorn_argv(f"127.0.0.1:{port}", app=app, config=REPO / "gunicorn.conf.py", extra=extra),
        ready_url=f"http://127.0.0.1:{port}/healthz",
        env={
            "WSGI_PROXY_WORKERS": "1",
            "WSGI_PROXY_THREADS": str(threads),
            # gunicorn's own access log off, as deployed by default: even into /dev/null it formats
            # a line per request (~0.25 ms of CPU here); the proxy's JSON lines stay on.
            "WSGI_PROXY_ACCESS_LOG": "",
            "WSGI_PROXY_LOG_LEVEL": log_level,
            **env,
        },
        cwd=tmp,
        log_path=tmp / f"proxy-{port}.log",
    ).start()


def worker_pid(master: int) -> int:
    """The PID of the only worker of a gunicorn master."""
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def process_status(pid: int) -> dict[str, int]:
    """A process's resident memory (KiB) and thread count, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "Threads"):
            fields[name] = int(value.split()[0])
    return {"rss_kb": fields["VmRSS"], "threads": fields["Threads"]}


def cpu_seconds(pid: int) -> float:
    """The CPU time (user plus system) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def save_result(name: str, result: t.Mapping[str, t.Any]) -> Path:
    """Write a benchmark's result to ``benchmarks/results/<name>-<date>.json`` and say where."""
    out = REPO / "benchmarks" / "results" / f"{name}-{time.strftime('%Y-%m-%d')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {out.relative_to(REPO)}")
    return out


def per_call_us(operation: t.Callable[[int], object], calls: int, *, warmup: int = 0) -> float:
    """Microseconds per call of ``operation(i)`` over ``calls`` calls, after ``warmup`` untimed ones."""
    for i in range(warmup):
        operation(i)
    start = time.perf_counter()
    for i in range(calls):
        operation(i)
    return (time.perf_counter() - start) / calls * 1e6
