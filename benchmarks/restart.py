"""What clients see when gunicorn restarts the proxy's worker (SIGHUP) during open streams.

    python benchmarks/restart.py            # 20 background + 5 foreground streams, writes results
    python benchmarks/restart.py --quick    # 5 + 2, nothing written (CI)

Background streams are ended by the draining worker at once and their clients resume (here with
the SDK's own retrieve(stream=True, starting_after=N)) on the new worker; foreground streams run on
until 2 s before graceful_timeout, then end with an error (they cannot be resumed). Reported per
kind: streams completed whole, how long after the SIGHUP they were cut, and how long the resume
took to bring the next event.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
import typing as t
from pathlib import Path

import openai
from harness import CLIENT_KEY, save_result, start_bed

GRACEFUL = 8


def _client(base: str, background: bool, out: list[dict[str, t.Any]], lock: threading.Lock) -> None:
    record: dict[str, t.Any] = {
        "background": background,
        "cut_at": None,
        "resumed_after": None,
        "error": None,
    }
    numbers: list[int] = []
    with openai.OpenAI(base_url=base, api_key=CLIENT_KEY, max_retries=0, timeout=60) as client:
        try:
            stream: t.Iterable[t.Any] = client.responses.create(
                model="gpt-4o-mini",
                input="restart",
                background=background,
                stream=True,
                # Foreground streams outlast graceful_timeout, so the drain has to end them.
                metadata={"sim_delay_ms": "50", "sim_words": "100" if background else "300"},
            )
            response_id = ""
            while True:
                try:
                    for event in stream:
                        if event.type == "response.created":
                            response_id = event.response.id
                        if record["cut_at"] is not None and record["resumed_after"] is None:
                            record["resumed_after"] = time.monotonic() - record["cut_at"]
                        numbers.append(event.sequence_number)
                    break
                except openai.APIConnectionError:
                    if record["cut_at"] is not None:
                        raise
                    record["cut_at"] = time.monotonic()
                    if not background:
                        raise  # a foreground response cannot be resumed
                    stream = client.responses.retrieve(response_id, stream=True, starting_after=numbers[-1])
        except openai.APIError as exc:
            record["error"] = type(exc).__name__
    record["whole"] = numbers == list(range(len(numbers))) and record["error"] is None
    with lock:
        out.append(record)


def run(background: int, foreground: int) -> dict[str, t.Any]:
    with tempfile.TemporaryDirectory(prefix="wsgi-proxy-restart-") as scratch:
        bed = start_bed(Path(scratch), threads=64, env={"WSGI_PROXY_GRACEFUL_TIMEOUT": str(GRACEFUL)})
        results: list[dict[str, t.Any]] = []
        lock = threading.Lock()
        try:
            threads = [
                threading.Thread(target=_client, args=(bed.proxied, kind, results, lock), daemon=True)
                for kind in [True] * background + [False] * foreground
            ]
            for thread in threads:
                thread.start()
            time.sleep(1.0)
            hup = time.monotonic()
            bed.proxy.signal(signal.SIGHUP)
            for thread in threads:
                thread.join(60)
        finally:
            bed.stop()

    def summary(kind: bool) -> dict[str, t.Any]:
        group = [r for r in results if r["background"] is kind]
        cut = [r["cut_at"] - hup for r in group if r["cut_at"] is not None]
        resumed = [r["resumed_after"] for r in group if r["resumed_after"] is not None]
        return {
            "streams": len(group),
            "completed_whole": sum(1 for r in group if r["whole"]),
            "cut_by_restart": len(cut),
            "cut_after_sighup_s_median": round(statistics.median(cut), 2) if cut else None,
            "resume_to_next_event_s_median": round(statistics.median(resumed), 3) if resumed else None,
            "errors": [r["error"] for r in group if r["error"]],
        }

    return {"graceful_timeout": GRACEFUL, "background": summary(True), "foreground": summary(False)}


def bench(quick: bool) -> dict[str, t.Any]:
    """The run ``--quick`` (5 background + 2 foreground streams) or the default one (20 + 5) does."""
    return run(5, 2) if quick else run(20, 5)


def ok(result: t.Mapping[str, t.Any]) -> bool:
    """Every background stream completed whole, across the restart."""
    return bool(result["background"]["completed_whole"] == result["background"]["streams"])


def main(argv: t.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="5 + 2 streams, nothing written (CI)")
    args = parser.parse_args(argv)
    result = bench(args.quick)
    print(json.dumps(result, indent=2))
    if not args.quick:
        save_result("restart", result)
    return 0 if ok(result) else 1


if __name__ == "__main__":
    sys.exit(main())
