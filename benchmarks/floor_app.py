"""The least a Flask + requests forwarder can do: the floor under wsgi-proxy's latency.

It forwards ``POST /v1/responses`` with the gateway's key (a stream's bytes as they arrive, by
``read1``) and nothing else: no validation, no auth, no routing, no logs, no metrics, no retries, no
header policy, no disconnect watchdog. ``overhead.py`` and ``ramp.py`` serve it with the same
gunicorn.conf.py in front of the same simulator, so that the added latency and the cost per stream
split into what the stack costs (this app) and what the proxy's features cost (the rest).

It is a yardstick, not a proxy: it must never be deployed.
"""

from __future__ import annotations

import os
import typing as t

import requests
from flask import Flask, Response, request

_UPSTREAM = os.environ["FLOOR_UPSTREAM_URL"]
_HEADERS = {"Authorization": "Bearer " + os.environ["FLOOR_UPSTREAM_KEY"], "Content-Type": "application/json"}

app = Flask(__name__)
_session = requests.Session()
_session.trust_env = False


@app.get("/healthz")
def healthz() -> Response:
    return Response(b'{"status":"ok"}', content_type="application/json")


@app.post("/v1/responses")
def create() -> Response:
    answer = _session.post(
        _UPSTREAM + "/responses", data=request.get_data(), headers=_HEADERS, timeout=30, stream=True
    )
    content_type = answer.headers.get("Content-Type", "")
    if not content_type.startswith("text/event-stream"):
        return Response(answer.content, status=answer.status_code, content_type=content_type)

    def relay() -> t.Iterator[bytes]:
        with answer:
            while data := answer.raw.read1(65536):
                yield data

    return Response(relay(), status=answer.status_code, content_type=content_type)
