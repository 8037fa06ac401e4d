"""Every benchmark in one go on this machine: the numbers the README publishes, and a chart of them.

    python benchmarks/run.py            # full run (several minutes), writes benchmarks/results/latest/
    python benchmarks/run.py --quick    # about a minute, writes to a fresh temporary directory

Runs, one after the other (nothing else heavy should run meanwhile): overhead.py (latency per
non-stream call, also through floor_app.py's minimal forwarder; per-event delay; one stream's
events/s), locator.py (the cost of the config-file gateway's store), observation.py (the cost of
metrics, log lines and per-event notes), capacity.py (1,000 concurrent streams on one worker, 100
in quick mode: RSS per stream), soak.py (streams cut upstream and resumed, clients that leave)
restart.py (SIGHUP during open streams), faults.py (silent upstreams, a Redis outage, lost
records, idle sockets, dense bodies), wsmode.py (WebSocket mode: the delay added per frame,
sessions per worker), uploads.py (files up and down, against direct) and ramp.py (thousands of
background streams opened at a steady rate: first bytes, memory), each in the mode its own script
runs with (``--quick`` or not).

When LiteLLM is installed (it is not a dependency of this project), its proxy (``litellm --config``)
is started in front of the same simulator, and the same non-stream calls and one streamed create are
measured direct, through wsgi-proxy and through LiteLLM, in turns, and ramp.py opens background
streams through it too (``litellm_proxy.py``); otherwise the summary says it was not measured. Any
failure there is written down and skipped.

Written to the output directory:

- ``summary.json``: every result (with the raw latency samples, in milliseconds) and the machine;
- ``summary.md``: a table per benchmark and the targets, each met or missed;
- ``latency.png``: the distributions of the non-stream call latency and the per-event delay;
- ``capacity.png``: the capacity curve of ``ramp.py`` (streams open against first byte and RSS).

The chart needs matplotlib: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import typing as t
from datetime import UTC, datetime
from pathlib import Path

import capacity
import faults
import litellm_proxy
import locator
import observation
import overhead
import ramp
import requests
import restart
import soak
import uploads
import wsmode
from harness import CLIENT_KEY, REPO, UPSTREAM_KEY, Bed

from wsgi_proxy.wire.sse import EventSplitter, parse_event

LATEST = REPO / "benchmarks" / "results" / "latest"
PACKAGES = ("flask", "gunicorn", "requests", "urllib3", "pydantic", "prometheus_client", "openai")

Result = dict[str, t.Any]


# ---------------------------------------------------------------------------------------- machine


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _redis_server_version() -> str | None:
    if not shutil.which("redis-server"):
        return None
    try:
        done = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    words = [w for w in done.stdout.split() if w.startswith("v=")]
    return words[0].removeprefix("v=") if words else done.stdout.strip() or None


def machine() -> Result:
    """What the numbers were measured on: CPU, cores, RAM, kernel, Python, package versions, date."""
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name":
                cpu_model = value.strip()
                break
    ram_gib: float | None = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 1024**2, 1)
                break
    commit = _git("rev-parse", "HEAD")
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "ram_gib": ram_gib,
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in ("wsgi-proxy", *PACKAGES, "matplotlib", "litellm")},
        "redis_server": _redis_server_version(),
        "git_commit": commit or None,
        "git_uncommitted_changes": bool(_git("status", "--porcelain")) if commit else None,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------- LiteLLM


def _session(key: str) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.headers.update({"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    return session


def stream_rates(targets: t.Mapping[str, tuple[str, str]], events: int, rounds: int = 3) -> Result:
    """Events/s of one streamed create of ``events`` deltas, best of ``rounds``, for each target.

    A streamed create rather than overhead.py's stored replay, since that is what every proxy can
    relay: the simulator generates the events as fast as it can (``sim_delay_ms=0``) while they are
    read, so the direct figure is lower than overhead.py's.
    """
    body = {
        "model": "gpt-4o-mini",
        "input": "bench",
        "stream": True,
        "metadata": {"sim_words": str(events), "sim_delay_ms": "0"},
    }
    sessions = {name: (_session(key), base) for name, (key, base) in targets.items()}
    best: dict[str, float] = {}
    received: dict[str, int] = {}
    for _ in range(rounds):
        for name, (session, base) in sessions.items():
            start = time.perf_counter()
            count = 0
            with session.post(base + "/responses", json=body, stream=True, timeout=300) as answer:
                if answer.status_code != 200:
                    raise RuntimeError(f"{name}: streamed create answered {answer.status_code}")
                splitter = EventSplitter()
                while chunk := answer.raw.read1(65536):
                    count += len(splitter.feed(chunk))
            best[name] = max(best.get(name, 0.0), count / (time.perf_counter() - start))
            received[name] = count
    return {"deltas_asked": events, "events_received": received, "events_per_s": best}


def _events_of(answer: requests.Response) -> list[bytes]:
    splitter = EventSplitter()
    events: list[bytes] = []
    while chunk := answer.raw.read1(65536):
        events += splitter.feed(chunk)
    return events


def resume_check(targets: t.Mapping[str, tuple[str, str]], after: int = 5) -> Result:
    """The path the product exists for, through each target: a background stream, then
    ``GET /responses/{id}?stream=true&starting_after=N``. What came back, per target."""
    body = {
        "model": "gpt-4o-mini",
        "input": "bench",
        "background": True,
        "stream": True,
        "metadata": {"sim_words": "20", "sim_delay_ms": "5"},
    }
    found: Result = {}
    for name, (key, base) in targets.items():
        session = _session(key)
        with session.post(base + "/responses", json=body, stream=True, timeout=60) as created:
            first = _events_of(created)
        response_id = next(
            (
                json.loads(event.split(b"data:", 1)[1])["response"]["id"]
                for event in first
                if parse_event(event).type == "response.created"
            ),
            None,
        )
        if response_id is None:
            found[name] = {"error": f"no response.created among {len(first)} events"}
            continue
        query = {"stream": "true", "starting_after": str(after)}
        with session.get(f"{base}/responses/{response_id}", params=query, stream=True, timeout=60) as answer:
            content_type = answer.headers.get("Content-Type", "")
            events = _events_of(answer) if content_type.startswith("text/event-stream") else []
        infos = [parse_event(event) for event in events]
        numbers = [i.sequence_number for i in infos if i.sequence_number is not None]
        found[name] = {
            "status": answer.status_code,
            "content_type": content_type.split(";")[0],
            "events": len(numbers),
            "first_sequence_number": numbers[0] if numbers else None,
            "ends_with": next((i.type for i in reversed(infos) if i.type), None),
            "exactly_the_events_after": bool(numbers)
            and numbers == list(range(after + 1, after + 1 + len(numbers))),
        }
    return {"starting_after": after, "results": found}


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())[:600]


def litellm_side_by_side(bed: Bed, tmp: Path, sizes: overhead.Sizes) -> Result:
    """LiteLLM's proxy in front of ``bed``'s simulator: the same calls direct, via wsgi-proxy and via it.

    Never raises: whatever goes wrong is returned as ``{"measured": False, "reason": ...}``.
    """
    command, version = litellm_proxy.command()
    if command is None:
        return {"measured": False, "reason": version}
    try:
        server, litellm_url = litellm_proxy.start(command, tmp, bed.direct, UPSTREAM_KEY)
    except Exception as exc:  # a comparison must never sink the run
        return {
            "measured": False,
            "version": version,
            "reason": f"litellm proxy did not start: {_tail(str(exc))}",
        }
    try:
        targets = {
            "direct": (UPSTREAM_KEY, bed.direct),
            "wsgi-proxy": (CLIENT_KEY, bed.proxied),
            "litellm": (litellm_proxy.LITELLM_KEY, litellm_url),
        }
        samples = overhead.latency_samples(targets, sizes[0])
        rates = stream_rates(targets, sizes[2])
        resume = resume_check(targets)
        concurrency = {"clients": overhead.CLIENTS, **overhead.concurrent_rates(targets)}
    except Exception as exc:
        server.stop()
        reason = f"measurement failed: {type(exc).__name__}: {exc}"[:600]
        return {"measured": False, "version": version, "reason": reason, "log_tail": _tail(server.log())}
    server.stop()
    latency = {
        name: {"p50_ms": overhead._pct(values, 0.5), "p99_ms": overhead._pct(values, 0.99)}
        for name, values in samples.items()
    }
    counts = set(rates["events_received"].values())
    return {
        "measured": True,
        "version": version,
        "calls": sizes[0],
        "latency": latency,
        "stream": rates,
        "resume": resume,
        "concurrency": concurrency,
        "note": "" if len(counts) == 1 else "the targets received different numbers of events (see stream)",
        "samples": samples,
    }


# ------------------------------------------------------------------------------------------ chart


def _cdf(values: t.Sequence[float]) -> tuple[list[float], list[float]]:
    ordered = sorted(values)
    return ordered, [(i + 1) / len(ordered) for i in range(len(ordered))]


def _plot_cdfs(axes: t.Any, series: t.Sequence[tuple[str, list[float], str]], title: str) -> None:
    right = 0.0
    for label, values, color in series:
        xs, ys = _cdf(values)
        p50, p99 = overhead._pct(values, 0.5), overhead._pct(values, 0.99)
        axes.step(xs, ys, where="post", color=color, label=f"{label}: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
        right = max(right, overhead._pct(values, 0.995))
    axes.set_xlim(0, right * 1.1)
    axes.set_ylim(0, 1.01)
    axes.set_xlabel("latency of one non-stream create (ms, client-side)")
    axes.set_ylabel("fraction of calls at or below")
    axes.set_title(title)
    axes.grid(alpha=0.3)


def draw_chart(overhead_result: Result, litellm: Result | None, info: Result, path: Path) -> None:
    """The CDF of non-stream call latency (direct, proxy) and the per-event delay's histogram.

    With LiteLLM measured, a third panel: the CDFs of its side-by-side run (direct, wsgi-proxy and
    LiteLLM in turns), kept apart since that run is not the one of the first panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = overhead_result["samples"]
    side = bool(litellm and litellm.get("measured"))
    figure, panels = plt.subplots(
        1, 3 if side else 2, figsize=(19 if side else 13, 6), constrained_layout=True, squeeze=False
    )
    calls, events = panels[0][0], panels[0][1]
    _plot_cdfs(
        calls,
        [
            ("direct to the simulator", samples["direct"], "tab:blue"),
            ("through a minimal Flask + requests forwarder", samples["floor"], "tab:gray"),
            ("through wsgi-proxy", samples["proxy"], "tab:orange"),
        ],
        f"Non-stream calls: CDF, {len(samples['direct'])} sequential calls each (tail > p99.5 cut)",
    )
    added = overhead_result["latency"]["added_p50_ms"]
    calls.legend(
        loc="upper center",
        bbox_to_anchor=(0.5, -0.13),
        fontsize=9,
        title=f"added by wsgi-proxy at p50: +{added:.2f} ms (target: at most 1 ms)",
        title_fontsize=9,
    )
    if litellm and side:
        third = panels[0][2]
        runs = litellm["samples"]
        _plot_cdfs(
            third,
            [
                ("direct", runs["direct"], "tab:blue"),
                ("through wsgi-proxy", runs["wsgi-proxy"], "tab:orange"),
                (f"through LiteLLM {litellm['version']}", runs["litellm"], "tab:green"),
            ],
            f"Side by side with LiteLLM: CDF, {len(runs['direct'])} calls each, in turns",
        )
        third.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=9)

    delays = samples["event_delay"]
    p50, p99 = overhead._pct(delays, 0.5), overhead._pct(delays, 0.99)
    events.hist(delays, bins=40, color="tab:orange", alpha=0.8, label=f"{len(delays)} live events")
    events.axvline(p50, color="black", linestyle="--", label=f"p50 {p50:.2f} ms")
    events.axvline(p99, color="black", linestyle=":", label=f"p99 {p99:.2f} ms")
    events.axvline(1.0, color="tab:red", linewidth=2, label="target: p99 at most 1 ms")
    events.set_xlabel("added delay per event: arrival through the proxy - arrival direct (ms)")
    events.set_ylabel("events")
    events.set_title("Live stream: per-event delay added by the proxy")
    events.set_xlim(min(0.0, min(delays)) - 0.05, max(1.2, max(delays) * 1.05))
    events.grid(alpha=0.3)
    events.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=2, fontsize=9)
    figure.suptitle(
        f"wsgi-proxy overhead, {info['cpu_model']}, {info['cores']} cores, Python {info['python']},"
        f" {info['date'][:10]}"
    )
    figure.savefig(path, dpi=110)
    plt.close(figure)


def draw_capacity(ramp_result: Result, path: Path) -> None:
    """The capacity curve of ``ramp.py``: streams opened against the first-byte p50 of the streams
    opened just before, and against the workers' RSS, for each target with workers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency, memory) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    for kind, style in (("sse", "-"), ("websocket", "--")):
        for name, m in ramp_result.get(kind, {}).items():
            curve = m.get("curve")
            if not curve:
                continue
            label = f"{name}, {'SSE streams' if kind == 'sse' else 'idle WebSocket sessions'}"
            opened = [p["opened"] for p in curve]
            firsts = [p["first_byte_p50_s"] or 0.0 for p in curve]
            latency.plot(opened, firsts, style, marker=".", label=label)
            memory.plot(opened, [p["rss_mb"] for p in curve], style, marker=".", label=label)
    rate = ramp_result["rate_per_s"]
    latency.set_title(f"First byte (p50 of each step) while streams are opened at {rate:,.0f}/s")
    latency.set_xlabel("streams open")
    latency.set_ylabel("seconds")
    memory.set_title("Both workers' RSS")
    memory.set_xlabel("streams open")
    memory.set_ylabel("MiB")
    for axes in (latency, memory):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=9)
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------------------------- targets


def targets(benchmarks: t.Mapping[str, Result], quick: bool) -> list[Result]:
    """The published targets, each with its measured value and met (True), missed (False) or None."""
    rows: list[Result] = []
    over = benchmarks.get("overhead", {})
    if "latency" in over:
        lat = over["latency"]
        share = lat["added_p50_ms"] / lat["direct_p50_ms"]
        measured = f"+{lat['added_p50_ms']:.2f} ms on {lat['direct_p50_ms']:.2f} ms: {share:.0%}"
        if "floor_added_p50_ms" in lat:
            measured += f" (the floor forwarder: +{lat['floor_added_p50_ms']:.2f} ms)"
        rows.append(
            _target("added latency per non-stream call, p50", "<= 50% of direct", measured, share <= 0.5)
        )
        delay = over["event_delay"]["added_p99_ms"]
        rows.append(_target("per-event delay added, p99", "<= 0.5 ms", f"+{delay:.2f} ms", delay <= 0.5))
        thr = over["throughput"]
        rates = f"{thr['proxy_events_per_s']:,.0f} vs {thr['direct_events_per_s']:,.0f} events/s"
        measured = f"{thr['ratio']:.0%} ({rates})"
        rows.append(
            _target("one stream's events/s, share of direct", ">= 90%", measured, thr["ratio"] >= 0.9)
        )
        creates = over["concurrency"]["creates_per_s"]
        ratio = creates["proxy"] / creates["direct"]
        measured = f"{ratio:.0%} ({creates['proxy']:,.0f} vs {creates['direct']:,.0f}/s"
        measured += (
            f"; the floor forwarder {creates['floor'] / creates['direct']:.0%})"
            if "floor" in creates
            else ")"
        )
        rows.append(_target("creates/s with 32 clients, share of direct", ">= 80%", measured, ratio >= 0.8))
    else:
        for name, goal in (
            ("added latency per non-stream call, p50", "<= 50% of direct"),
            ("per-event delay added, p99", "<= 0.5 ms"),
            ("one stream's events/s, share of direct", ">= 90%"),
            ("creates/s with 32 clients, share of direct", ">= 80%"),
        ):
            rows.append(_target(name, goal, "overhead benchmark failed", None))
    rows += _ramp_targets(benchmarks.get("ramp", {}), quick)
    cap = benchmarks.get("capacity", {})
    goal = ">= 1,000 streams"
    if "streams" not in cap:
        rows.append(_target("concurrent streams, one worker", goal, "capacity benchmark failed", None))
    else:
        live = f"{cap['streams_receiving_events']:,} of {cap['streams']:,} open, receiving events"
        if quick:
            rows.append(_target("concurrent streams, one worker", goal, f"{live} (quick mode)", None))
        else:
            met = cap["streams"] >= 1000 and cap["streams_receiving_events"] == cap["streams"]
            rows.append(_target("concurrent streams, one worker", goal, live, met))
    ws = benchmarks.get("websocket", {})
    if "frame_delay" in ws:
        added = ws["frame_delay"]["added_p99_ms"]
        rows.append(
            _target("WebSocket delay added per frame, p99", "<= 1 ms", f"+{added:.2f} ms", added <= 1)
        )
    else:
        rows.append(
            _target("WebSocket delay added per frame, p99", "<= 1 ms", "websocket benchmark failed", None)
        )
    return rows


def _ramp_targets(r: Result, quick: bool) -> list[Result]:
    """Issue 14's goals for thousands of streams, from ``ramp.py``'s proxy phases."""
    found = []
    for kind, what in (("sse", "background streams"), ("websocket", "idle WebSocket sessions")):
        m = r.get(kind, {}).get("proxy")
        if m is None:
            found.append(_target(f"10,000 {what}, two workers", "all served", "ramp benchmark failed", None))
            continue
        streams = r["streams"]
        scale = f"{streams:,} {what}" + (" (quick mode)" if quick else "")
        checks = [
            (
                "first byte within 30 s",
                "all",
                f"{m['first_byte_within_30s']:,}",
                m["first_byte_within_30s"] == streams,
            ),
            (
                "RSS per stream",
                "<= 60 KB",
                f"{m['rss_per_open_stream_kb']} KB",
                m["rss_per_open_stream_kb"] <= 60,
            ),
            (
                "upstream freed after the clients left",
                "<= 2 s",
                f"{m['seconds_until_upstream_closed']} s",
                m["seconds_until_upstream_closed"] is not None and m["seconds_until_upstream_closed"] <= 2,
            ),
            (
                "workers killed by the heartbeat",
                "none",
                str(m["worker_killed_by_timeout"]),
                not m["worker_killed_by_timeout"],
            ),
        ]
        if m.get("event_delay_p99_ms") is not None:
            delay = m["event_delay_p99_ms"]
            checks.insert(1, ("event delay, p99", "<= 50 ms", f"{delay} ms", delay <= 50))
        for name, goal, measured, met in checks:
            found.append(_target(f"{scale}: {name}", goal, measured, None if quick else met))
    return found


def _target(name: str, goal: str, measured: str, met: bool | None) -> Result:
    status = "not measured" if met is None else "met" if met else "missed"
    return {"target": name, "goal": goal, "measured": measured, "met": met, "status": status}


# --------------------------------------------------------------------------------------- markdown


def _table(header: t.Sequence[str], rows: t.Iterable[t.Sequence[t.Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _mib(kb: int) -> str:
    return f"{kb / 1024:.1f} MiB"


def _md_overhead(r: Result) -> list[str]:
    lat, ev, thr = r["latency"], r["event_delay"], r["throughput"]
    return _table(
        ("measure", "direct", "through wsgi-proxy", "added / ratio"),
        [
            (
                f"non-stream create, p50 ({len(r['samples']['direct'])} calls)",
                f"{lat['direct_p50_ms']:.2f} ms",
                f"{lat['proxy_p50_ms']:.2f} ms",
                f"+{lat['added_p50_ms']:.2f} ms",
            ),
            (
                "non-stream create, p99",
                f"{lat['direct_p99_ms']:.2f} ms",
                f"{lat['proxy_p99_ms']:.2f} ms",
                f"+{lat['added_p99_ms']:.2f} ms",
            ),
            (
                "non-stream create, p50 / p99, through a minimal Flask + requests forwarder"
                " (`floor_app.py`: the stack alone)",
                "",
                f"{lat['floor_p50_ms']:.2f} / {lat['floor_p99_ms']:.2f} ms",
                f"+{lat['floor_added_p50_ms']:.2f} / +{lat['floor_added_p99_ms']:.2f} ms",
            ),
            (
                f"per-event delay of a live stream, p50 / p99 ({ev['events']} events)",
                "",
                "",
                f"+{ev['added_p50_ms']:.2f} / +{ev['added_p99_ms']:.2f} ms",
            ),
            (
                f"one stream's events/s ({thr['events']:,}-event stored replay)",
                f"{thr['direct_events_per_s']:,.0f}",
                f"{thr['proxy_events_per_s']:,.0f}",
                f"{thr['ratio']:.2f}x",
            ),
            *_concurrency_rows(r["concurrency"], "proxy"),
        ],
    )


def _concurrency_rows(rates: Result, proxy: str) -> list[tuple[str, ...]]:
    """Creates/s and stream events/s with concurrent clients: direct, the proxy (with the floor
    forwarder's figure when measured) and the share of direct."""
    rows: list[tuple[str, ...]] = []
    for name, label in (
        ("creates_per_s", "non-stream creates/s"),
        ("stream_events_per_s", "streams, events/s"),
    ):
        found = rates[name]
        floor = f" (floor {found['floor']:,.0f})" if "floor" in found else ""
        rows.append(
            (
                f"{rates['clients']} concurrent clients, {label}",
                f"{found['direct']:,.0f}",
                f"{found[proxy]:,.0f}{floor}",
                f"{found[proxy] / found['direct']:.2f}x",
            )
        )
    return rows


def _md_litellm(r: Result) -> list[str]:
    if not r.get("measured"):
        return [
            f"LiteLLM: {r['reason'].removeprefix('litellm: ')}"
            if r.get("reason")
            else "LiteLLM: not measured"
        ]
    lat, stream, rates = r["latency"], r["stream"], r["concurrency"]
    names = ("direct", "wsgi-proxy", "litellm")
    lines = [
        f"LiteLLM {r['version']} (`litellm --config`, 1 worker) in front of the same simulator, measured in"
        " turns with direct calls and wsgi-proxy:",
        "",
    ]
    lines += _table(
        ("measure", "direct", "through wsgi-proxy", "through LiteLLM"),
        [
            (f"non-stream create, p50 ({r['calls']} calls)", *(f"{lat[n]['p50_ms']:.2f} ms" for n in names)),
            ("non-stream create, p99", *(f"{lat[n]['p99_ms']:.2f} ms" for n in names)),
            (
                f"one streamed create, events/s ({stream['deltas_asked']:,} deltas)",
                *(f"{stream['events_per_s'][n]:,.0f}" for n in names),
            ),
            ("events received", *(f"{stream['events_received'][n]:,}" for n in names)),
            *(
                (label, *(f"{rates[name][n]:,.0f}" for n in names))
                for name, label in (
                    ("creates_per_s", f"{rates['clients']} concurrent clients, non-stream creates/s"),
                    ("stream_events_per_s", f"{rates['clients']} concurrent streams, events/s"),
                )
            ),
        ],
    )
    if r.get("note"):
        lines += ["", f"Note: {r['note']}."]
    resume = r.get("resume")
    if resume:
        after = resume["starting_after"]
        lines += [
            "",
            f"Background stream resumed with `GET /responses/{{id}}?stream=true&starting_after={after}`:",
            "",
        ]
        rows = []
        for name in names:
            got = resume["results"].get(name, {})
            if "error" in got:
                rows.append((name, got["error"], "", "", ""))
                continue
            rows.append(
                (
                    name,
                    f"{got['status']} {got['content_type']}",
                    f"{got['events']} (first: {got['first_sequence_number']})",
                    got["ends_with"] or "",
                    "yes" if got["exactly_the_events_after"] else "**no**",
                )
            )
        lines += _table(
            ("target", "answer", "events", "last event", f"exactly the events after {after}"), rows
        )
    return lines


def _md_capacity(r: Result) -> list[str]:
    before, during, after = r["worker_before"], r["worker_with_streams_open"], r["worker_after_close"]
    return _table(
        (
            "open streams",
            "receiving events",
            "seconds to open",
            "worker RSS before → with streams open → after close",
            "RSS per open stream",
            "worker threads (open)",
        ),
        [
            (
                f"{r['streams']:,}",
                f"{r['streams_receiving_events']:,}",
                r["seconds_to_open"],
                f"{_mib(before['rss_kb'])} → {_mib(during['rss_kb'])} → {_mib(after['rss_kb'])}",
                f"{r['rss_per_stream_kb']} KB",
                f"{during['threads']:,}",
            )
        ],
    )


def _md_websocket(r: Result) -> list[str]:
    d, s = r["frame_delay"], r["sessions"]
    lines = _table(
        ("one-way delay per frame", "p50", "p99"),
        [
            ("direct to the simulator", f"{d['direct_p50_ms']:.3f} ms", f"{d['direct_p99_ms']:.3f} ms"),
            ("through the proxy", f"{d['proxied_p50_ms']:.3f} ms", f"{d['proxied_p99_ms']:.3f} ms"),
            ("added by the proxy", f"+{d['added_p50_ms']:.3f} ms", f"+{d['added_p99_ms']:.3f} ms"),
        ],
    )
    before, after = s["worker_before"], s["worker_after_close"]
    lines += [""] + _table(
        (
            "sessions, one worker",
            "receiving frames",
            "worker RSS (before: " + _mib(before["rss_kb"]) + ")",
            "RSS per session",
            "worker threads",
        ),
        [
            (
                f"{s['idle']['sessions']:,} idle",
                f"{s['idle']['sessions_receiving']:,}",
                _mib(s["idle"]["rss_kb"]),
                f"{s['rss_per_idle_session_kb']} KB",
                f"{s['idle']['threads']:,}",
            ),
            (
                f"{s['active']['sessions']:,} active",
                f"{s['active']['sessions_receiving']:,}",
                _mib(s["active"]["rss_kb"]),
                f"{s['rss_per_active_session_kb']} KB",
                f"{s['active']['threads']:,}",
            ),
        ],
    )
    return lines + ["", f"After they closed: {_mib(after['rss_kb'])}, {after['threads']:,} threads."]


def _md_uploads(r: Result) -> list[str]:
    rates = r["mb_per_s"]
    lines = _table(
        (f"{r['megabytes']} MB, median of {r['rounds']}", "direct", "through the proxy", "share of direct"),
        [
            (
                "upload",
                f"{rates['upload direct']} MB/s",
                f"{rates['upload proxied']} MB/s",
                f"{r['upload_share_of_direct']:.0%}",
            ),
            (
                "download",
                f"{rates['download direct']} MB/s",
                f"{rates['download proxied']} MB/s",
                f"{r['download_share_of_direct']:.0%}",
            ),
        ],
    )
    before, peak = r["worker_rss_kb_before"], r["worker_rss_kb_peak"]
    return lines + ["", f"Worker RSS: {_mib(before)} before, {_mib(peak)} at its highest while relaying."]


def _md_ramp(r: Result) -> list[str]:
    def cell(m: Result, key: str, unit: str = "") -> str:
        value = m.get(key)
        return "" if value is None else f"{value:,}{unit}" if isinstance(value, int) else f"{value}{unit}"

    lines = [
        f"{r['streams']:,} streams opened at {r['rate_per_s']:,.0f}/s and held, one event every"
        f" {r['event_every_s']:g} s each; two workers, threads sized to the streams.",
        "",
    ]
    for kind, title in (("sse", "Background SSE streams"), ("websocket", "Idle WebSocket sessions")):
        found = r.get(kind)
        if not found:
            continue
        rows = []
        for name, m in found.items():
            given = m.get("streams", r["streams"]), m.get("rate_per_s", r["rate_per_s"])
            if given != (r["streams"], r["rate_per_s"]):  # LiteLLM's, smaller
                name = f"{name} ({given[0]:,} at {given[1]:,.0f}/s)"
            rows.append(
                (
                    name,
                    f"{m['first_byte_within_30s']:,} / {m['first_byte_within_60s']:,}",
                    f"{m['first_byte_p50_s']} / {m['first_byte_p99_s']} s",
                    f"{cell(m, 'event_delay_p50_ms')} / {cell(m, 'event_delay_p99_ms')}"
                    if kind == "sse"
                    else "",
                    cell(m, "rss_per_open_stream_kb", " KB"),
                    cell(m, "workers_cpu_ms_per_stream", " ms"),
                    cell(m, "seconds_until_upstream_closed", " s"),
                    {True: "**yes**", False: "no"}.get(m.get("worker_killed_by_timeout"), "")
                    + "".join(f" ({stage})" for stage in m.get("worker_killed_while", [])),
                    cell(m, "machine_steal_pct", "%"),
                )
            )
        lines += [f"**{title}**", ""]
        lines += _table(
            (
                "",
                "first byte within 30 s / 60 s",
                "first byte p50 / p99",
                "event delay p50 / p99 (ms, all open)",
                "RSS per stream",
                "workers' CPU per stream",
                "upstream freed after the clients left",
                "worker killed (while)",
                "CPU stolen from the machine",
            ),
            rows,
        )
        lines += [""]
    return lines


def _md_soak(r: Result) -> list[str]:
    delivered = r["events_delivered"]
    expected = r["streams"] * soak.EVENTS
    lines = [
        f"{r['streams']:,} background streams of {soak.EVENTS} events, each cut upstream 1 to 3 times, plus"
        f" {r['disconnecting_clients']:,} clients that leave after a few events;"
        f" {r['concurrency']} at a time, {r['seconds']} s.",
        "",
    ]
    lines += _table(
        (
            "events delivered",
            "lost",
            "duplicated",
            "streams without terminal event",
            "proxy resumes",
            "client errors",
            "upstream streams open 2 s after",
            "worker RSS / threads before → after",
        ),
        [
            (
                f"{delivered:,} of {expected:,}",
                r["events_lost"],
                r["events_duplicated"],
                r["streams_without_terminal_event"],
                f"{r['proxy_resumes']:,}",
                r["client_errors"],
                r["upstream_streams_open_2s_after"],
                f"{_mib(r['worker_before']['rss_kb'])} / {r['worker_before']['threads']} →"
                f" {_mib(r['worker_after']['rss_kb'])} / {r['worker_after']['threads']}",
            )
        ],
    )
    return lines


def _md_restart(r: Result) -> list[str]:
    def row(kind: str, g: Result) -> tuple[t.Any, ...]:
        cut = g["cut_after_sighup_s_median"]
        resumed = g["resume_to_next_event_s_median"]
        errors = {e: g["errors"].count(e) for e in sorted(set(g["errors"]))}
        return (
            kind,
            g["streams"],
            g["completed_whole"],
            g["cut_by_restart"],
            "" if cut is None else f"{cut} s",
            "" if resumed is None else f"{resumed * 1000:.0f} ms",
            ", ".join(f"{n} {e}" for e, n in errors.items()) or "none",
        )

    lines = [f"SIGHUP to gunicorn during open streams, `graceful_timeout` {r['graceful_timeout']} s.", ""]
    lines += _table(
        (
            "streams",
            "count",
            "completed whole",
            "cut by the restart",
            "cut after SIGHUP (median)",
            "resume → next event (median)",
            "client errors",
        ),
        [
            row("background (resumed by the client)", r["background"]),
            row("foreground (cannot be resumed)", r["foreground"]),
        ],
    )
    return lines


def _md_locator(r: Result) -> list[str]:
    gateways = []
    stores = []
    contended = []
    for name, m in r["results"].items():
        if name.startswith("store contended"):
            contended.append(
                (
                    name.removeprefix("store contended, "),
                    f"{m['counts_per_s']}",
                    f"{m['p50_ms']} / {m['p99_ms']} ms",
                    f"{m['failed']}",
                )
            )
        elif name.startswith("store operations"):
            stores.append(
                (
                    name.removeprefix("store operations, "),
                    f"{m['put_response_us']} µs",
                    f"{m['get_response_us']} µs",
                    f"{m['hit_rate_us']} µs",
                    f"{m['spend_us']} µs",
                    f"{m['record_usage_us']} / {m['record_usage_charged_us']} µs",
                )
            )
        else:
            gateways.append(
                (
                    name,
                    f"{m['create_p50_ms']:.2f} / {m['create_p99_ms']:.2f} ms",
                    f"{m['retrieve_p50_ms']:.2f} / {m['retrieve_p99_ms']:.2f} ms",
                    f"+{m['added_create_p50_ms']:.2f} / +{m['added_retrieve_p50_ms']:.2f} ms",
                )
            )
    lines = _table(
        ("gateway", "create p50 / p99", "retrieve p50 / p99", "added per create / retrieve (p50)"), gateways
    )
    lines += [""]
    lines += _table(
        (
            "store",
            "record a response",
            "look one up",
            "count a request",
            "read two budgets' spend",
            "count usage (without / with two budgets)",
        ),
        stores,
    )
    lines += [
        "",
        "Under contention: 32 threads of one worker each count a request, then wait 5 ms,"
        " beside 8 threads that hold the GIL 2 ms in every 4.",
        "",
    ]
    lines += _table(("store", "counts/s", "wait p50 / p99", "failed"), contended)
    lines += [
        "",
        f"Budget checks add {r['budget_checks_added_create_p50_ms']:+.2f} ms to a create (p50, SQLite).",
    ]
    return lines


def _md_observation(r: Result) -> list[str]:
    return _table(
        ("what", "when", "cost"),
        [
            (
                "metrics: request counter and latency histogram (multiprocess files)",
                "per request",
                f"{r['per_request_metrics_us']} µs",
            ),
            ("JSON log line: format and write", "per request", f"{r['per_request_log_line_us']} µs"),
            (
                "OpenTelemetry spans (request and attempt) when traces are on; off: one None check per fact",
                "per request",
                f"{r.get('per_request_traced_us', '-')} µs",
            ),
            (
                "metrics: events and bytes counters",
                "per write to a stream's client",
                f"{r['per_write_metrics_us']} µs",
            ),
            (
                f"event observation: type and sequence number ({r['event_bytes']}-byte delta event)",
                "per event",
                f"{r['per_event_observation_us']} µs",
            ),
            (
                "the whole relay: split, observe, count and yield, no I/O",
                "per event",
                f"{r.get('per_event_relay_us', '-')} µs",
            ),
            (
                f"disconnect watchdog, {r.get('watched_streams', 0):,} streams watched,"
                " clients leaving one by one",
                "per client that leaves",
                f"{r.get('per_departure_watchdog_us', '-')} µs",
            ),
        ],
    ) + ["", f"Timed in one process over {r['calls']:,} calls each, on the code the workers run."]


def _md_faults(r: Result) -> list[str]:
    silent, outage, lost, slow = r["silent_upstream"], r["store_outage"], r["lost_records"], r["slow_clients"]
    rows = [
        (
            "upstream silent after 3 events, keep-alives every 1 s, read timeout 3 s",
            f"the client's stream {silent['ending']} after {silent['stream_ended_after_s']} s",
        ),
        (
            f"Redis frozen {outage['outage_s']:g} s under 8 clients of creates",
            f"answers {outage['answers']}; of {outage['created']} created, {outage['records_lost']} without"
            f" a locator, {outage['responses_not_counted']} not counted",
        ),
        ("a locator lost (FLUSHALL), tried by another team and the owner", f"{lost['answers']}"),
        (
            "100 sockets asking Connection: close and never reading",
            f"slowest health check {r['idle_closers']['slowest_health_check_s']} s",
        ),
        (
            f"{slow['slow_clients']} slow-header / slow-body clients, {slow['threads']} threads:"
            " slowest health check direct / through nginx",
            " / ".join(
                str(slow.get(f"{kind}_{front}_slowest_health_s", slow.get(f"{kind}_{front}")))
                for kind in ("headers", "body")
                for front in ("direct", "nginx")
            ),
        ),
        (
            "bodies of tiny JSON items",
            "; ".join(
                f"{b['body_mib']} MiB: {b['status']}, worker RSS +{b['worker_rss_growth_mib']} MiB"
                for b in r["dense_body"]["bodies"]
            ),
        ),
    ]
    return _table(("fault", "what happened"), rows)


SECTIONS: dict[str, tuple[str, t.Callable[[Result], list[str]]]] = {
    "overhead": ("Overhead against the direct simulator (`overhead.py`)", _md_overhead),
    "litellm": ("Side by side with LiteLLM", _md_litellm),
    "locator": ("Multi-tenancy cost: locator, ownership check, rate counter (`locator.py`)", _md_locator),
    "observation": (
        "Observation cost: metrics, log line, per-event notes (`observation.py`)",
        _md_observation,
    ),
    "capacity": ("Concurrent streams on one worker (`capacity.py`)", _md_capacity),
    "soak": ("Soak: cut streams resumed, clients that leave (`soak.py`)", _md_soak),
    "restart": ("Restart: SIGHUP during open streams (`restart.py`)", _md_restart),
    "faults": ("Faults and attacks (`faults.py`)", _md_faults),
    "websocket": ("WebSocket mode: delay per frame, sessions per worker (`wsmode.py`)", _md_websocket),
    "uploads": ("Files: upload and download throughput (`uploads.py`)", _md_uploads),
    "ramp": ("Thousands of streams and sessions opened at a steady rate, two workers (`ramp.py`)", _md_ramp),
}


def markdown(summary: Result) -> str:
    info = summary["machine"]
    packages = ", ".join(f"{name} {v}" for name, v in info["packages"].items() if v)
    commit = info["git_commit"] or "unknown"
    if info.get("git_uncommitted_changes"):
        commit += " (with uncommitted changes)"
    lines = [
        f"# Benchmarks: `{summary['command']}`",
        "",
        f"{summary['mode'].capitalize()} run of {info['date']}, {summary['seconds']:.0f} s in all."
        " Client, proxy and simulator share this machine, on loopback.",
        "",
        f"- Machine: {info['cpu_model']}, {info['cores']} cores, {info['ram_gib']} GiB RAM,"
        f" Linux {info['kernel']}",
        f"- Python {info['python']}; {packages}; redis-server {info['redis_server'] or 'not installed'}",
        f"- Commit: {commit}",
        "",
        "## Targets",
        "",
    ]
    lines += _table(
        ("target", "goal", "measured", "status"),
        [(r["target"], r["goal"], r["measured"], r["status"]) for r in summary["targets"]],
    )
    lines += ["", "![latency distributions](latency.png)" if summary.get("chart") else "", ""]
    for key, (title, render) in SECTIONS.items():
        result = summary["benchmarks"].get(key)
        if result is None:
            continue
        lines += [f"## {title}", ""]
        if "error" in result:
            lines += [f"**Failed** after {result.get('seconds', 0):.0f} s: `{result['error']}`"]
        else:
            lines += render(result)
            if key == "ramp" and summary.get("chart"):
                lines += ["", "![capacity curve](capacity.png)"]
            if "seconds" in result:
                lines += ["", f"({result['seconds']:.0f} s)"]
        lines += [""]
    return "\n".join(line for i, line in enumerate(lines) if line or (i and lines[i - 1])) + "\n"


# ------------------------------------------------------------------------------------------- main


def _round_samples(value: t.Any) -> t.Any:
    if isinstance(value, dict):
        return {k: _round_samples(v) for k, v in value.items()}
    if isinstance(value, list):
        return [round(v, 4) if isinstance(v, float) else v for v in value]
    return value


def _timed(name: str, step: t.Callable[[], Result], log: t.TextIO) -> Result:
    print(f"-- {name} ...", file=log, flush=True)
    start = time.monotonic()
    try:
        result = step()
    except Exception as exc:  # one broken benchmark must not hide the others
        traceback.print_exc(file=log)
        message = str(exc).strip().splitlines()
        result = {"error": f"{type(exc).__name__}: {message[-1] if message else ''}"[:600]}
    result["seconds"] = round(time.monotonic() - start, 1)
    status = "failed" if "error" in result else "done"
    print(f"-- {name} {status} in {result['seconds']} s", file=log, flush=True)
    return result


def run(quick: bool, out: Path, log: t.TextIO = sys.stderr) -> tuple[Result, bool]:
    """Run every benchmark, write summary.json, summary.md and latency.png to ``out``.

    Returns the summary and whether everything ran and every correctness check passed (missed
    performance targets do not count as failures).
    """
    started = time.monotonic()
    info = machine()
    benchmarks: Result = {}
    overhead_result = _timed("overhead", lambda: overhead.bench(quick, alongside=litellm_side_by_side), log)
    litellm = overhead_result.pop("alongside", None)
    benchmarks["overhead"] = overhead_result
    benchmarks["litellm"] = litellm or {"measured": False, "reason": "not run: the overhead benchmark failed"}
    steps: list[tuple[str, t.Callable[[bool], Result]]] = [
        ("locator", locator.bench),
        ("observation", observation.bench),
        ("capacity", capacity.bench),
        ("soak", soak.bench),
        ("restart", restart.bench),
        ("faults", faults.bench),
        ("websocket", wsmode.bench),
        ("uploads", uploads.bench),
        ("ramp", ramp.bench),
    ]
    for name, bench in steps:
        time.sleep(1.0)  # let the previous benchmark's processes go
        benchmarks[name] = _timed(name, functools.partial(bench, quick), log)
    checks = {
        "soak: every event exactly once, every stream whole": "error" not in benchmarks["soak"]
        and soak.ok(benchmarks["soak"]),
        "restart: every background stream whole across the SIGHUP": "error" not in benchmarks["restart"]
        and restart.ok(benchmarks["restart"]),
        "faults: streams cut, no record lost or uncounted, lost ids refused": "error"
        not in benchmarks["faults"]
        and faults.ok(benchmarks["faults"]),
    }
    summary: Result = {
        "command": "python benchmarks/run.py" + (" --quick" if quick else ""),
        "mode": "quick" if quick else "full",
        "machine": info,
        "seconds": 0.0,
        "targets": targets(benchmarks, quick),
        "checks": checks,
        "benchmarks": _round_samples(benchmarks),
        "chart": None,
    }
    out.mkdir(parents=True, exist_ok=True)
    chart_ok = True
    if "samples" in overhead_result:
        try:
            draw_chart(overhead_result, litellm, info, out / "latency.png")
            summary["chart"] = "latency.png"
            if "error" not in benchmarks["ramp"]:
                draw_capacity(benchmarks["ramp"], out / "capacity.png")
        except Exception:
            traceback.print_exc(file=log)
            chart_ok = False
    summary["seconds"] = round(time.monotonic() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    ok = chart_ok and all(checks.values()) and not any("error" in r for r in benchmarks.values())
    return summary, ok


def main(argv: t.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="the benchmarks' short modes, written to a temporary directory"
    )
    parser.add_argument("--out", type=Path, help="write here instead (default: benchmarks/results/latest)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("matplotlib") is None:
        print("the chart needs matplotlib: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    out = args.out or (Path(tempfile.mkdtemp(prefix="wsgi-proxy-run-")) if args.quick else LATEST)
    summary, ok = run(args.quick, out)
    print((out / "summary.md").read_text())
    charts = ", ".join(str(out / name) for name in ("latency.png", "capacity.png") if (out / name).exists())
    print(f"written: {out / 'summary.json'}, {out / 'summary.md'}, {charts}")
    print(
        f"{summary['seconds']:.0f} s in all; {'all ran and passed' if ok else 'SOMETHING FAILED (see above)'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
