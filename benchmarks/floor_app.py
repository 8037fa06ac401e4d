"""The least a Flask + requests forwarder can do: the floor under wsgi-proxy's latency.

It forwards ``POST /v1/responses`` with the gateway's key and nothing else: no validation, no auth,
no routing, no logs, no metrics, no retries, no header policy. ``overhead.py`` serves it with the
same gunicorn.conf.py and one worker, in front of the same simulator, so that the added latency
splits into what the stack costs (this app) and what the proxy's features cost (the rest).

It is a yardstick, not a proxy: it must never be deployed.
"""

from __future__ import annotations

import os

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
    answer = _session.post(_UPSTREAM + "/responses", data=request.get_data(), headers=_HEADERS, timeout=30)
    return Response(
        answer.content, status=answer.status_code, content_type=answer.headers.get("Content-Type")
    )
