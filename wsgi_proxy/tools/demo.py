"""``wsgi-proxy demo``: the background-stream resume scenario, played through a real proxy.

It starts the bundled simulator (a fake OpenAI upstream, no key and no network needed) and the proxy
under gunicorn on free loopback ports, then speaks the same wire the OpenAI SDK speaks: a background
streamed create, a connection dropped mid-stream, a resume with ``starting_after``, and a check that
the text assembled from both parts is whole, with no event missing or repeated. Then one WebSocket
turn (the Responses API's WebSocket mode, as Codex speaks it): a create and a chained create on one
connection.
"""

from __future__ import annotations

import json
import secrets
import signal
import sys
import time
import typing as t

import requests
import websockets.exceptions
from websockets.sync.client import connect as ws_connect

from ..simulator import Simulator, SimulatorConfig
from ..wire.sse import EventSplitter
from .launch import ServerProcess, free_port, gunicorn_argv

__all__ = ["run_demo"]


def _say(text: str = "") -> None:
    print(text, flush=True)


def _events(response: requests.Response) -> t.Iterator[dict[str, t.Any]]:
    """Decode the SSE events of a streamed answer as they arrive."""
    splitter = EventSplitter()
    raw = response.raw
    while chunk := raw.read1(65536, decode_content=True):
        for event in splitter.feed(chunk):
            for line in event.splitlines():
                if line.startswith(b"data:"):
                    yield json.loads(line[5:])


def _show(event: dict[str, t.Any]) -> None:
    kind = event.get("type", "?")
    detail = ""
    if kind == "response.created":
        detail = f"id={event['response']['id']}"
    elif kind.endswith(".delta"):
        detail = json.dumps(event.get("delta", ""))
    elif kind == "response.completed":
        detail = f"status={event['response']['status']}"
    _say(f"     seq {event.get('sequence_number', '?'):>3}  {kind:<34} {detail}".rstrip())


def _final_text(response: dict[str, t.Any]) -> str:
    return "".join(
        part.get("text", "")
        for item in response.get("output", [])
        for part in item.get("content", []) or []
        if part.get("type") == "output_text"
    )


def _play(base_url: str, key: str, cut_after: int) -> bool:
    http = requests.Session()
    http.headers.update({"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    body = {
        "model": "gpt-4o-mini",
        "input": "Tell me about resumable streams.",
        "background": True,
        "stream": True,
    }

    _say(f"1. POST {base_url}/responses   background=true, stream=true")
    seen: list[dict[str, t.Any]] = []
    with http.post(f"{base_url}/responses", data=json.dumps(body), stream=True, timeout=30) as first:
        first.raise_for_status()
        for event in _events(first):
            seen.append(event)
            _show(event)
            if event.get("sequence_number") == cut_after:
                break
    response_id = seen[0]["response"]["id"]
    _say(
        f"   -- connection dropped after sequence_number {cut_after}; the response keeps running upstream --"
    )
    time.sleep(0.5)

    _say(f"2. GET {base_url}/responses/{response_id}?stream=true&starting_after={cut_after}")
    resume_url = f"{base_url}/responses/{response_id}?stream=true&starting_after={cut_after}"
    with http.get(resume_url, stream=True, timeout=30) as second:
        second.raise_for_status()
        for event in _events(second):
            seen.append(event)
            _show(event)

    numbers = [e["sequence_number"] for e in seen]
    complete = numbers == list(range(len(numbers)))
    final = seen[-1]
    text = "".join(e.get("delta", "") for e in seen if e.get("type") == "response.output_text.delta")
    matches = final.get("type") == "response.completed" and text == _final_text(final["response"])
    _say("3. Result")
    _say(f"   text: {text!r}")
    _say(
        f"   events 0..{numbers[-1]}: "
        + ("none missing, none repeated" if complete else f"NOT contiguous: {numbers}")
    )
    _say(
        "   text from the deltas "
        + ("equals" if matches else "DIFFERS FROM")
        + " the text of response.completed"
    )
    return complete and matches


def _websocket_turn(base_url: str, key: str) -> bool:
    url = base_url.replace("http://", "ws://", 1) + "/responses"
    _say(f"4. WebSocket mode: GET {url} upgraded; two chained response.create frames")
    finals: list[dict[str, t.Any]] = []
    with ws_connect(url, additional_headers={"Authorization": f"Bearer {key}"}, open_timeout=10) as ws:
        previous = None
        for text in ("Hello over a WebSocket.", "And a second turn."):
            create = {"type": "response.create", "model": "gpt-4o-mini", "input": text, "store": False}
            if previous is not None:
                create["previous_response_id"] = previous
            ws.send(json.dumps(create))
            while True:
                event = json.loads(ws.recv(timeout=30))
                if event.get("type") in ("response.created", "response.completed", "error"):
                    _show(event)
                if event.get("type") in ("response.completed", "error"):
                    break
            finals.append(event)
            previous = event.get("response", {}).get("id")
    chained = (
        all(e.get("type") == "response.completed" for e in finals)
        and finals[1]["response"].get("previous_response_id") == finals[0]["response"]["id"]
    )
    _say("   two turns on one connection, the second chained to the first: " + ("yes" if chained else "NO"))
    return chained


def run_demo(*, serve: bool = False, cut_after: int = 8) -> int:
    """Play the scenario; with ``serve``, keep the proxy running until Ctrl-C. Returns an exit status."""
    upstream_key = "sk-sim-" + secrets.token_hex(12)
    client_key = "sk-demo-" + secrets.token_hex(12)
    simulator = Simulator(config=SimulatorConfig(api_key=upstream_key, delay_ms=60, words=16)).start()
    port = free_port()
    proxy = ServerProcess(
        gunicorn_argv(f"127.0.0.1:{port}", workers=1, threads=32),
        ready_url=f"http://127.0.0.1:{port}/healthz",
        env={
            "WSGI_PROXY_UPSTREAM_URL": simulator.base_url,
            "WSGI_PROXY_UPSTREAM_API_KEY": upstream_key,
            "WSGI_PROXY_API_KEYS": client_key,
        },
    )
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        _say("wsgi-proxy demo: background stream, dropped connection, resume with starting_after")
        _say(f"   upstream: the bundled simulator       {simulator.base_url}")
        _say("   proxy:    gunicorn (gthread), starting ...")
        proxy.start()
        _say(f"   proxy:    ready                       {base_url}")
        _say()
        ok = _play(base_url, client_key, cut_after)
        _say()
        ok = _websocket_turn(base_url, client_key) and ok
        _say()
        if serve:
            _say("The proxy is running. Point an openai client at it:")
            _say()
            _say("    from openai import OpenAI")
            _say(f'    client = OpenAI(base_url="{base_url}", api_key="{client_key}")')
            _say('    r = client.responses.create(model="gpt-4o-mini", input="hi", background=True)')
            _say("    print(client.responses.retrieve(r.id).status)")
            _say()
            _say("Press Ctrl-C to stop.")
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            try:
                while proxy.process is not None and proxy.process.poll() is None:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
        else:
            _say("Run `wsgi-proxy demo --serve` to keep a proxy running and point an openai client at it.")
        if not ok:
            _say("The demo's checks FAILED. The proxy log follows:\n" + proxy.log())
        return 0 if ok else 1
    except (
        RuntimeError,
        OSError,
        requests.RequestException,
        websockets.exceptions.WebSocketException,
    ) as exc:
        _say(f"The demo failed: {exc}")
        return 1
    finally:
        proxy.close()
        simulator.stop()
