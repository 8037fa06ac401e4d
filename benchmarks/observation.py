"""The cost of watching the proxy: Prometheus metrics, the JSON log line, event-level observation.

    python benchmarks/observation.py           # writes benchmarks/results/observation-<date>.json
    python benchmarks/observation.py --quick   # a few seconds, for CI (nothing written)

Timed in this process, on the same code the workers run, with the metrics in multiprocess mode
(files in a temporary directory, as under gunicorn.conf.py) and the log line written to a file:

- per request: the metrics a finished request updates (a counter and a latency histogram), the
  JSON log line (formatting and writing), and what OpenTelemetry spans add when traces are on (a
  request's span and one attempt's, with their attributes; exporting happens on another thread);
- per stream write: the events and bytes counters;
- per event: what the relay notes of each event (its type and sequence number, for resumes and
  counts), on an output_text.delta event as OpenAI sends it; and the whole relay of such events
  from a stored body (split, observe, count, yield), with no I/O;
- per client that leaves: what the disconnect watchdog spends noticing it, with thousands watched.

Compare them with the added latency per call in overhead.py (milliseconds): they are microseconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import tempfile
import time
import typing as t

from harness import per_call_us, save_result

from wsgi_proxy.observe.record import ACCESS_LOGGER, RequestRecord
from wsgi_proxy.observe.tracing import Tracing
from wsgi_proxy.wire.usage import Usage

_DELTA = (
    b"event: response.output_text.delta\ndata: "
    + json.dumps(
        {
            "type": "response.output_text.delta",
            "sequence_number": 1234,
            "item_id": "msg_" + "a" * 48,
            "output_index": 0,
            "content_index": 0,
            "delta": " word",
            "logprobs": [],
            "obfuscation": "Xk3pQ9",
        },
        separators=(",", ":"),
    ).encode()
    + b"\n\n"
)


_COMPLETED = (
    b'event: response.completed\ndata: {"type":"response.completed","sequence_number":1235,'
    b'"response":{"id":"resp_0123","status":"completed"}}\n\n'
)


def _per_call_us(operation: t.Callable[[], object], calls: int) -> float:
    # Warmed up first: series created, caches filled.
    return round(per_call_us(lambda _: operation(), calls, warmup=min(calls, 1000)), 2)


def run(calls: int) -> dict[str, t.Any]:
    with tempfile.TemporaryDirectory(prefix="wsgi-proxy-metrics-") as directory:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        try:
            return _measure(calls, directory)
        finally:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]


class _StoredBody:
    """An upstream body that hands out one stored event per read, then the terminal one, with no I/O."""

    framed = True

    def __init__(self, events: int) -> None:
        self._left = events

    def wait(self, timeout: float) -> bool:
        return True

    def read(self) -> bytes:
        if self._left < 0:
            return b""
        self._left -= 1
        return _DELTA if self._left >= 0 else _COMPLETED

    def shutdown(self) -> None:
        pass

    def close(self) -> None:
        pass


def _relay_us(events: int) -> float:
    """Microseconds per event of a whole relay (split, observe, count, yield), best of three."""
    from wsgi_proxy.gateway.watchdog import NoWatch
    from wsgi_proxy.wire.relay import StreamRelay

    def relay_once() -> float:
        relay = StreamRelay(
            _StoredBody(events),
            label="bench",
            control=NoWatch(),
            keepalive_interval=15.0,
            on_forward=lambda *_: None,
        )
        start = time.perf_counter()
        for _ in relay:
            pass
        return (time.perf_counter() - start) / events * 1e6

    return round(min(relay_once() for _ in range(3)), 2)


def _departure_us(streams: int) -> float:
    """The disconnect watchdog's CPU microseconds per client that leaves, with ``streams`` watched
    and the clients leaving one at a time (a socket pair's peer closed every 0.2 ms): the process's
    CPU over the departures, less that of the same departures unwatched."""
    from wsgi_proxy.gateway.watchdog import DisconnectWatchdog

    def departures(watched: bool) -> float:
        watchdog, noticed = DisconnectWatchdog(), []
        pairs = [socket.socketpair() for _ in range(streams)]
        try:
            if watched:
                for ours, _ in pairs:
                    watchdog.watch(ours, lambda: noticed.append(1))
            start = time.process_time()
            for _, theirs in pairs:
                theirs.close()
                time.sleep(0.0002)
            deadline = time.monotonic() + 30
            while watched and len(noticed) < streams and time.monotonic() < deadline:
                time.sleep(0.01)
            return time.process_time() - start
        finally:
            for ours, theirs in pairs:
                ours.close()
                theirs.close()

    return round((departures(True) - departures(False)) / streams * 1e6, 2)


def _measure(calls: int, directory: str) -> dict[str, t.Any]:
    from wsgi_proxy.observe.metrics import Metrics  # after the variable is set: the mode is read at creation
    from wsgi_proxy.wire.sse import parse_event

    metrics = Metrics()
    assert metrics.multiprocess_dir == directory

    def request_metrics() -> None:
        metrics.request_finished(route="create", method="POST", status=200, upstream="default", seconds=0.002)

    access = logging.getLogger(ACCESS_LOGGER)
    saved = access.handlers, access.propagate, access.level
    handler = logging.FileHandler(os.path.join(directory, "access.log"))
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.handlers, access.propagate = [handler], False
    access.setLevel(logging.INFO)

    tracing = Tracing("bench", exporter=_NoExport)

    def log_line(traced: bool = False) -> None:
        trace = tracing.start("POST", "create", {"traceparent": _TRACEPARENT}.get) if traced else None
        record = RequestRecord("req_0123456789abcdef", "POST", "create", trace=trace)  # metrics=None
        record.identified("team-a", "a")
        record.asked_for("gpt-4o-mini")
        record.attempt("default")
        record.answered("req_upstream")
        record.used(Usage(input_tokens=12, output_tokens=40, total_tokens=52), 24_600)
        record.sent(200)

    try:
        line_us = _per_call_us(log_line, calls)
        traced_us = _per_call_us(lambda: log_line(traced=True), calls)
    finally:
        handler.close()
        access.handlers, access.propagate, access.level = saved
    return {
        "calls": calls,
        "per_request_metrics_us": _per_call_us(request_metrics, calls),
        "per_request_log_line_us": line_us,
        "per_request_traced_us": round(traced_us - line_us, 2),
        "per_write_metrics_us": _per_call_us(lambda: metrics.events_forwarded(events=3, nbytes=750), calls),
        "per_event_observation_us": _per_call_us(lambda: parse_event(_DELTA), calls),
        "per_event_relay_us": _relay_us(calls),
        "per_departure_watchdog_us": _departure_us(min(calls, 5000)),
        "watched_streams": min(calls, 5000),
        "event_bytes": len(_DELTA),
    }


_TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class _NoExport:
    """A span exporter that drops what it gets: the benchmark times making spans, not sending them
    (the batch processor sends from a thread of its own)."""

    def export(self, spans: t.Sequence[t.Any]) -> t.Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def bench(quick: bool) -> dict[str, t.Any]:
    """The run ``--quick`` (2,000 calls of each) or the default one (100,000) does."""
    return run(2000 if quick else 100_000)


def main(argv: t.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a short run that writes nothing (CI)")
    args = parser.parse_args(argv)
    result = bench(args.quick)
    for name, value in result.items():
        print(f"{name}: {value}")
    if not args.quick:
        save_result("observation", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
