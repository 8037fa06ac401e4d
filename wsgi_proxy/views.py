"""The proxy's Blueprint: thin views that validate, authenticate, call the upstream and relay.

Every route accepts every method and dispatches itself, so a wrong method or an unknown path under
the proxy's prefix gets an OpenAI-shaped error instead of the host app's HTML error page.
"""

from __future__ import annotations

import logging
import typing as t
from dataclasses import dataclass

import requests
from flask import Blueprint, Response, current_app, request
from flask.blueprints import BlueprintSetupState
from werkzeug.exceptions import HTTPException
from werkzeug.routing import PathConverter

from .errors import (
    InvalidRequest,
    MethodNotAllowed,
    ProxyError,
    RequestTooLarge,
    RouteNotFound,
    UpstreamCredentialsRejected,
    UpstreamProtocolError,
    error_body,
)
from .headers import client_response_headers, upstream_request_headers
from .resume import StreamResumer, create_resume_query
from .retries import send_with_retries
from .state import EXTENSION_KEY, ProxyState
from .streaming import StreamRelay
from .upstream import MAX_ERROR_BODY, UpstreamStream
from .validation import parse_create_body, parse_json_object, parse_response_path, parse_retrieve_query
from .watchdog import NoWatch

__all__ = ["make_blueprint"]

log = logging.getLogger("wsgi_proxy")

_METHODS = ["GET", "POST", "DELETE", "PUT", "PATCH"]
#: How many times the proxy sent the request upstream (retries where safe, see retries.py).
ATTEMPTS_HEADER = "X-Upstream-Attempts"
_SSE_HEADERS = [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]


def _state() -> ProxyState:
    return t.cast(ProxyState, current_app.extensions[EXTENSION_KEY])


def _require(*allowed: str) -> None:
    method = "GET" if request.method == "HEAD" else request.method
    if method not in allowed:
        raise MethodNotAllowed(
            f"{request.method} is not supported on {request.path}; use {' or '.join(allowed)}.",
            allowed=allowed,
        )


def _authenticated() -> ProxyState:
    state = _state()
    state.credentials.authenticate(request.headers.get("Authorization"))
    return state


def _read_body(state: ProxyState) -> bytes:
    limit = state.settings.max_request_bytes
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLarge(f"The request body is larger than the proxy's limit of {limit} bytes.")
    body = request.stream.read(limit + 1)
    if len(body) > limit:
        raise RequestTooLarge(f"The request body is larger than the proxy's limit of {limit} bytes.")
    return body


def _client_socket(environ: dict[str, t.Any]) -> t.Any:
    return environ.get("gunicorn.socket") or environ.get("werkzeug.socket")


@dataclass(frozen=True)
class _Resume:
    """How a stream of this request can be resumed: the query that replays it, and its id if known."""

    query: bytes
    response_id: str | None = None


def _forward(
    state: ProxyState,
    method: str,
    path: str,
    *,
    body: bytes | None,
    stream: bool,
    idempotent: bool,
    resume: _Resume | None = None,
) -> Response:
    settings = state.settings
    headers = upstream_request_headers(
        request.headers.items(),
        credentials=state.credentials.upstream_headers(request.headers),
        pass_through=state.credentials.pass_through,
        stream=stream,
    )
    upstream, attempts = send_with_retries(
        state.upstream,
        method,
        path,
        query=request.query_string,
        headers=headers,
        body=body,
        stream=stream,
        idempotent=idempotent,
        attempts=settings.retry_attempts,
        max_wait=settings.retry_max_wait,
    )
    extra = [(ATTEMPTS_HEADER, str(attempts))]
    if not stream:
        return _relay_answer(state, upstream, upstream.content, extra)
    resumer = None
    if resume is not None and settings.resume_attempts:
        resumer = StreamResumer(
            state.upstream,
            headers,
            resume.query,
            max_attempts=settings.resume_attempts,
            backoff_base=settings.resume_backoff,
            backoff_max=settings.resume_backoff_max,
        )
    return _relay_stream(
        state,
        upstream,
        extra,
        label=f"{method} {path}",
        resumer=resumer,
        response_id=resume.response_id if resume else None,
    )


def _relay_answer(
    state: ProxyState, upstream: requests.Response, content: bytes, extra: list[tuple[str, str]]
) -> Response:
    """Relay a complete upstream answer (success or error) with its status and safe headers."""
    if upstream.status_code == 401 and not state.credentials.pass_through:
        # The body echoes a masked fragment of the gateway's key: it must not reach the client.
        log.warning(
            "the upstream rejected the gateway's credentials (HTTP 401); check WSGI_PROXY_UPSTREAM_API_KEY"
        )
        raise UpstreamCredentialsRejected(
            "The upstream rejected this gateway's own credentials. This is not a problem with your"
            " request: the proxy's operator must check WSGI_PROXY_UPSTREAM_API_KEY."
        )
    headers = client_response_headers(upstream.headers.items()) + extra
    if "Content-Type" not in upstream.headers:
        headers.append(("Content-Type", "application/json"))
    return Response(content, status=upstream.status_code, headers=headers)


def _relay_stream(
    state: ProxyState,
    upstream: requests.Response,
    extra: list[tuple[str, str]],
    *,
    label: str,
    resumer: StreamResumer | None,
    response_id: str | None,
) -> Response:
    content_type = upstream.headers.get("Content-Type", "")
    if not 200 <= upstream.status_code < 300 or not content_type.startswith("text/event-stream"):
        content = state.upstream.read_body(upstream, limit=MAX_ERROR_BODY)
        if 200 <= upstream.status_code < 300:
            raise UpstreamProtocolError(
                f"The upstream answered a streaming request with {content_type or 'no content type'!r}"
                " instead of an event stream, so there are no events to relay. Check that the upstream"
                " supports streaming for this request."
            )
        return _relay_answer(state, upstream, content, extra)
    body = UpstreamStream(upstream)
    watch = None
    if state.settings.watch_disconnects:
        watch = state.watchdog.watch(_client_socket(request.environ), body.shutdown)
    relay = StreamRelay(
        body,
        label=label,
        control=watch or NoWatch(),
        resumer=resumer,
        response_id=response_id,
        keepalive_interval=state.settings.keepalive_interval,
        max_event_bytes=state.settings.max_event_bytes,
    )
    headers = [h for h in client_response_headers(upstream.headers.items()) if h[0].lower() != "content-type"]
    headers += _SSE_HEADERS + extra
    headers.append(("Content-Type", content_type))
    return Response(relay, status=upstream.status_code, headers=headers, direct_passthrough=True)


# --- views -------------------------------------------------------------------------------------


def responses_root() -> Response:
    _require("POST")
    state = _authenticated()
    body = _read_body(state)
    fields = parse_create_body(body)
    stream = fields.stream is True
    # A background stream can be resumed; nothing else can (OpenAI's rule).
    resume = _Resume(create_resume_query(fields)) if stream and fields.background is True else None
    return _forward(state, "POST", "/responses", body=body, stream=stream, idempotent=False, resume=resume)


def responses_json_post(endpoint: str) -> Response:
    """``POST /responses/input_tokens`` and ``POST /responses/compact``: a JSON object in, JSON out."""
    _require("POST")
    state = _authenticated()
    body = _read_body(state)
    parse_json_object(body)
    return _forward(state, "POST", f"/responses/{endpoint}", body=body, stream=False, idempotent=False)


def response_item(subpath: str) -> Response:
    state = _authenticated()  # before validation: an unauthenticated client learns nothing more
    target = parse_response_path(subpath)
    rid = target.response_id
    if target.action == "cancel":
        _require("POST")
        # Cancelling is idempotent: "subsequent calls simply return the final Response object".
        body = _read_body(state)
        return _forward(state, "POST", f"/responses/{rid}/cancel", body=body, stream=False, idempotent=True)
    if target.action == "input_items":
        _require("GET")
        return _forward(
            state, "GET", f"/responses/{rid}/input_items", body=None, stream=False, idempotent=True
        )
    _require("GET", "DELETE")
    if request.method == "DELETE":
        return _forward(state, "DELETE", f"/responses/{rid}", body=None, stream=False, idempotent=True)
    query = parse_retrieve_query(request.query_string)
    resume = _Resume(request.query_string, rid) if query.stream else None
    return _forward(
        state, "GET", f"/responses/{rid}", body=None, stream=query.stream, idempotent=True, resume=resume
    )


def models() -> Response:
    _require("GET")
    return _forward(_authenticated(), "GET", "/models", body=None, stream=False, idempotent=True)


def not_found(rest: str = "") -> Response:
    raise RouteNotFound(
        f"Unknown endpoint {request.method} {request.path}. The proxy serves /responses, /responses/{{id}}"
        " (with /cancel and /input_items), /responses/input_tokens, /responses/compact and /models."
    )


# --- error handlers (scoped to the blueprint: the host app's error pages stay its own) ---------


def _proxy_error(exc: ProxyError) -> Response:
    return Response(exc.body(), status=exc.status, headers=exc.headers(), content_type="application/json")


def _http_error(exc: HTTPException) -> Response:
    code = exc.code or 500
    if code == 413:
        return _proxy_error(RequestTooLarge("The request body is larger than the server accepts."))
    if code < 500:
        return _proxy_error(InvalidRequest(f"The request could not be read: {exc.description}", param=None))
    return _unexpected(exc)


def _unexpected(exc: Exception) -> Response:
    log.error("unexpected error in the proxy (%s)", type(exc).__name__, exc_info=exc)
    body = error_body(
        "The proxy failed unexpectedly while handling this request. Try again; if it persists,"
        " report it to the proxy's operator.",
        "server_error",
    )
    return Response(body, status=500, content_type="application/json")


class _AnyPathConverter(PathConverter):
    """Like ``path`` but also matching control characters, so that a percent-encoded CR/LF in an id
    reaches validation (and a 400 naming ``response_id``) instead of the host app's 404 page."""

    regex = "[^/](?s:.)*?"


def _add_converter(setup: BlueprintSetupState) -> None:
    setup.app.url_map.converters.setdefault("wsgi_proxy_path", _AnyPathConverter)


def make_blueprint() -> Blueprint:
    """A fresh Blueprint with every proxy route (one per mounted proxy)."""
    bp = Blueprint("wsgi_proxy", __name__)
    bp.record_once(_add_converter)  # first, so the converter exists before the rules below are added
    bp.add_url_rule("/responses", "create", responses_root, methods=_METHODS)
    for endpoint in ("input_tokens", "compact"):
        bp.add_url_rule(
            f"/responses/{endpoint}",
            endpoint,
            responses_json_post,
            methods=_METHODS,
            defaults={"endpoint": endpoint},
        )
    bp.add_url_rule("/responses/<wsgi_proxy_path:subpath>", "response", response_item, methods=_METHODS)
    bp.add_url_rule("/models", "models", models, methods=_METHODS)
    bp.add_url_rule("", "not_found_root", not_found, methods=_METHODS)
    bp.add_url_rule("/", "not_found", not_found, methods=_METHODS)
    bp.add_url_rule("/<wsgi_proxy_path:rest>", "not_found_path", not_found, methods=_METHODS)
    bp.register_error_handler(ProxyError, _proxy_error)
    bp.register_error_handler(HTTPException, _http_error)
    bp.register_error_handler(Exception, _unexpected)
    return bp
