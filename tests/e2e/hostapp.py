"""A host Flask app with its own routes and error page, embedding the proxy under /llm/v1."""

from __future__ import annotations

from flask import Flask, Response, jsonify

from wsgi_proxy import ResponsesProxy

app = Flask("host")


@app.route("/")
def home() -> str:
    return "host home"


@app.route("/api/ping")
def ping() -> Response:
    return jsonify(pong=True)


@app.errorhandler(404)
def host_not_found(_exc: Exception) -> tuple[str, int]:
    return "host 404 page", 404


proxy = ResponsesProxy(app, url_prefix="/llm/v1")
