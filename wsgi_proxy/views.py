"""The proxy's Blueprint: thin views that validate, authenticate, call the upstream and relay.

Every route accepts every method and dispatches itself, so a wrong method or an unknown path under
the proxy's prefix gets an OpenAI-shaped error instead of the host app's HTML error page.
"""

from __future__ import annotations

import contextlib
import json
import logging
import typing as t
from dataclasses import dataclass

import requests
from flask import Blueprint, Response, current_app, g, request
from flask.blueprints import BlueprintSetupState
from werkzeug.exceptions import HTTPException
from werkzeug.routing import PathConverter

from .errors import (
    InvalidRequest,
    MethodNotAllowed,
    ProxyError,
    RateLimited,
    RequestTooLarge,
    RouteNotFound,
    UpstreamCredentialsRejected,
    UpstreamError,
    UpstreamProtocolError,
    error_body,
)
from .headers import client_response_headers, upstream_request_headers
from .observe import Observation, request_id_from, usage_of
from .resume import StreamResumer, create_resume_query
from .retries import send_with_retries
from .routing import Target
from .state import EXTENSION_KEY, ProxyState
from .streaming import StreamRelay
from .tenancy import Tenant
from .upstream import MAX_ERROR_BODY, UpstreamClient, UpstreamStream
from .validation import (
    RESPONSE_ID,
    parse_create_body,
    parse_response_path,
    parse_retrieve_query,
    with_model,
)
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


def _obs() -> Observation:
    return t.cast(Observation, g.wsgi_proxy_observation)


def _open_observation() -> None:
    route = (request.endpoint or "").rpartition(".")[2] or "unknown"
    g.wsgi_proxy_observation = Observation(
        request_id_from(request.headers.get("X-Request-ID")), request.method, route, metrics=_state().metrics
    )


def _close_observation(response: Response) -> Response:
    obs = _obs()
    response.headers["X-Request-ID"] = obs.request_id
    if obs.upstream_request_id:
        response.headers["X-Upstream-Request-ID"] = obs.upstream_request_id
    obs.status = response.status_code
    if not obs.stream:  # a stream's observation closes when its relay ends
        obs.finish()
    return response


def _tenant() -> Tenant:
    """Who is calling (401 otherwise), with this request counted against their rate limits."""
    state = _state()
    identity = state.keyring.identify(request.headers.get("Authorization"))
    obs = _obs()
    obs.key, obs.team = identity.key_name, identity.team
    tenant = Tenant(state, identity)
    tenant.charge_request()
    return tenant


def _read_body(state: ProxyState) -> bytes:
    limit = state.settings.max_request_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise RequestTooLarge(f"The request body is larger than the proxy's limit of {limit} bytes.")
    # Ask for no more than the declared length: the stream's read allocates a buffer of the size asked.
    body = request.stream.read(limit + 1 if length is None else length)
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


@dataclass(frozen=True)
class _Sent:
    """An upstream answer and what it took to get it."""

    client: UpstreamClient
    answer: requests.Response
    headers: dict[str, str]
    attempts: int


def _send(
    state: ProxyState,
    client: UpstreamClient,
    method: str,
    path: str,
    *,
    body: bytes | None,
    stream: bool,
    idempotent: bool,
) -> _Sent:
    obs = _obs()
    obs.upstream = client.name
    headers = upstream_request_headers(
        request.headers.items(),
        credentials=client.credentials(request.headers),
        pass_through=client.pass_through,
        stream=stream,
    )
    headers["X-Request-ID"] = obs.request_id
    answer, attempts = send_with_retries(
        client,
        method,
        path,
        query=request.query_string,
        headers=headers,
        body=body,
        stream=stream,
        idempotent=idempotent,
        attempts=state.settings.retry_attempts,
        max_wait=state.settings.retry_max_wait,
    )
    obs.attempts += attempts
    obs.upstream_request_id = answer.headers.get("x-request-id")
    return _Sent(client, answer, headers, attempts)


def _forward(
    tenant: Tenant,
    client: UpstreamClient,
    method: str,
    path: str,
    *,
    body: bytes | None,
    stream: bool,
    idempotent: bool,
    resume: _Resume | None = None,
    count_usage: bool = False,
) -> Response:
    release = tenant.open_stream() if stream else None
    with _released_on_error(release):
        sent = _send(tenant.state, client, method, path, body=body, stream=stream, idempotent=idempotent)
    return _relay(
        tenant,
        sent,
        label=f"{method} {path}",
        stream=stream,
        resume=resume,
        release=release,
        count_usage=count_usage,
    )


@contextlib.contextmanager
def _released_on_error(release: t.Callable[[], None] | None) -> t.Iterator[None]:
    """Free a stream's slots if getting its answer fails; otherwise the relay frees them."""
    try:
        yield
    except BaseException:
        if release is not None:
            release()
        raise


def _relay(
    tenant: Tenant,
    sent: _Sent,
    *,
    label: str,
    stream: bool,
    resume: _Resume | None = None,
    release: t.Callable[[], None] | None = None,
    on_response_id: t.Callable[[str], None] | None = None,
    count_usage: bool = False,
) -> Response:
    """Relay an upstream answer: JSON as it is, an event stream through a :class:`StreamRelay`.

    ``release`` frees the stream's concurrency slots: at once when the answer is not a stream,
    otherwise when the relay ends.
    """
    state = tenant.state
    extra = [(ATTEMPTS_HEADER, str(sent.attempts))]
    upstream = sent.answer
    content_type = upstream.headers.get("Content-Type", "")
    if (
        not stream
        or not 200 <= upstream.status_code < 300
        or not content_type.startswith("text/event-stream")
    ):
        if release is not None:
            release()
        if stream:
            content = sent.client.read_body(upstream, limit=MAX_ERROR_BODY)
            if 200 <= upstream.status_code < 300:
                raise UpstreamProtocolError(
                    f"The upstream answered a streaming request with {content_type or 'no content type'!r}"
                    " instead of an event stream, so there are no events to relay. Check that the upstream"
                    " supports streaming for this request."
                )
        else:
            content = upstream.content
        if count_usage and 200 <= upstream.status_code < 300:
            response_id, usage, model = _summary_of(content)
            obs = _obs()
            obs.usage = usage
            if response_id is not None and on_response_id is not None:
                on_response_id(response_id)
            if response_id is not None and usage is not None:
                tenant.record_usage(response_id, model or obs.model, usage)
        return _relay_answer(sent.client, upstream, content, extra)
    settings = state.settings
    resumer = None
    if resume is not None and settings.resume_attempts:
        resumer = StreamResumer(
            sent.client,
            sent.headers,
            resume.query,
            max_attempts=settings.resume_attempts,
            backoff_base=settings.resume_backoff,
            backoff_max=settings.resume_backoff_max,
        )
    obs = _obs()
    obs.stream = True

    metrics = state.metrics
    metrics.stream_opened()

    def finished() -> None:
        metrics.stream_closed()
        if relay.failure is not None and relay.failure.startswith("aborted"):
            metrics.upstream_error(upstream=sent.client.name, kind="stream_aborted")
        if release is not None:
            release()
        obs.events, obs.bytes, obs.resumes, obs.usage = relay.events, relay.bytes, relay.resumes, relay.usage
        if relay.usage is not None and relay.response_id is not None:
            tenant.record_usage(relay.response_id, relay.model or obs.model, relay.usage)
        obs.error = relay.failure
        if relay.first_event_at is not None:
            obs.first_event_s = relay.first_event_at - obs.started
        obs.finish()

    body = UpstreamStream(upstream)
    watch = None
    if settings.watch_disconnects:
        watch = state.watchdog.watch(_client_socket(request.environ), body.shutdown)
    relay = StreamRelay(
        body,
        label=label,
        control=watch or NoWatch(),
        resumer=resumer,
        response_id=resume.response_id if resume else None,
        keepalive_interval=settings.keepalive_interval,
        max_event_bytes=settings.max_event_bytes,
        on_response_id=on_response_id,
        on_close=finished,
        on_forward=lambda events, nbytes: metrics.events_forwarded(events=events, nbytes=nbytes),
    )
    headers = [h for h in client_response_headers(upstream.headers.items()) if h[0].lower() != "content-type"]
    headers += _SSE_HEADERS + extra
    headers.append(("Content-Type", content_type))
    return Response(relay, status=upstream.status_code, headers=headers, direct_passthrough=True)


def _summary_of(content: bytes) -> tuple[str | None, dict[str, int] | None, str | None]:
    """The id, token usage and model of a Response object."""
    try:
        payload = json.loads(content)
    except ValueError:
        return None, None, None
    if not isinstance(payload, dict):
        return None, None, None
    value, model = payload.get("id"), payload.get("model")
    response_id = value if isinstance(value, str) and RESPONSE_ID.fullmatch(value) else None
    return response_id, usage_of(payload), model if isinstance(model, str) else None


def _relay_answer(
    client: UpstreamClient, upstream: requests.Response, content: bytes, extra: list[tuple[str, str]]
) -> Response:
    """Relay a complete upstream answer (success or error) with its status and safe headers."""
    if upstream.status_code == 401 and not client.pass_through:
        # The body echoes a masked fragment of the gateway's key: it must not reach the client.
        log.warning("upstream %s rejected the gateway's credentials (HTTP 401); check its key", client.name)
        raise UpstreamCredentialsRejected(
            "The upstream rejected this gateway's own credentials. This is not a problem with your"
            " request: the proxy's operator must check the gateway's upstream key."
        )
    headers = client_response_headers(upstream.headers.items()) + extra
    if "Content-Type" not in upstream.headers:
        headers.append(("Content-Type", "application/json"))
    return Response(content, status=upstream.status_code, headers=headers)


# --- views -------------------------------------------------------------------------------------

#: Answers after which a create is tried on the model's next upstream, if it has one.
FAILOVER_STATUSES = frozenset({429, 500, 502, 503, 504})


def responses_root() -> Response:
    _require("POST")
    tenant = _tenant()
    state = tenant.state
    body = _read_body(state)
    fields = parse_create_body(body)
    _obs().model = fields.model
    tenant.check_model(fields.model)
    targets = state.router.route(fields.model)
    if fields.previous_response_id is not None:
        # A continuation goes where the previous response lives, and only if the caller may see it.
        holder = tenant.locate(fields.previous_response_id).name
        targets = [next((tg for tg in targets if tg.upstream == holder), Target(holder))]
    stream = fields.stream is True
    background = fields.background is True
    # A background stream can be resumed; nothing else can (OpenAI's rule).
    resume = _Resume(create_resume_query(fields)) if stream and background else None
    release = tenant.open_stream() if stream else None
    with _released_on_error(release):
        sent, target = _create_with_failover(state, targets, body, stream=stream)

    def remember(response_id: str) -> None:
        tenant.remember(response_id, target.upstream, background=background)

    return _relay(
        tenant,
        sent,
        label="POST /responses",
        stream=stream,
        resume=resume,
        release=release,
        on_response_id=remember,
        count_usage=True,
    )


def _create_with_failover(
    state: ProxyState, targets: list[Target], body: bytes, *, stream: bool
) -> tuple[_Sent, Target]:
    """Send a create to the first target that answers; before any byte, a failure moves to the next."""
    for number, target in enumerate(targets, start=1):
        last = number == len(targets)
        client = state.upstreams[target.upstream]
        payload = body if target.deployment is None else with_model(body, target.deployment)
        try:
            sent = _send(state, client, "POST", "/responses", body=payload, stream=stream, idempotent=False)
        except UpstreamError as exc:
            if last:
                raise
            log.warning("create failed on upstream %s (%s); trying the next one", client.name, exc.message)
            continue
        if last or sent.answer.status_code not in FAILOVER_STATUSES:
            return sent, target
        log.warning(
            "upstream %s answered %d to a create; trying the next one", client.name, sent.answer.status_code
        )
        sent.answer.close()
    raise AssertionError("unreachable: the last target always returns or raises")


def responses_json_post(endpoint: str) -> Response:
    """``POST /responses/input_tokens`` and ``POST /responses/compact``: a JSON object in, JSON out."""
    _require("POST")
    tenant = _tenant()
    state = tenant.state
    body = _read_body(state)
    fields = parse_create_body(body)
    tenant.check_model(fields.model)
    if fields.previous_response_id is not None:
        client = tenant.locate(fields.previous_response_id)
    else:
        target = state.router.route(fields.model)[0]
        client = state.upstreams[target.upstream]
        body = body if target.deployment is None else with_model(body, target.deployment)
    return _forward(
        tenant, client, "POST", f"/responses/{endpoint}", body=body, stream=False, idempotent=False
    )


def response_item(subpath: str) -> Response:
    tenant = _tenant()  # before validation: an unauthenticated client learns nothing more
    target = parse_response_path(subpath)
    rid = target.response_id
    _obs().route = {"item": "delete" if request.method == "DELETE" else "retrieve"}.get(
        target.action, target.action
    )
    if target.action == "cancel":
        _require("POST")
        body = _read_body(tenant.state)
        client = tenant.locate(rid)
        # Cancelling is idempotent: "subsequent calls simply return the final Response object".
        return _forward(
            tenant, client, "POST", f"/responses/{rid}/cancel", body=body, stream=False, idempotent=True
        )
    if target.action == "input_items":
        _require("GET")
        client = tenant.locate(rid)
        return _forward(
            tenant, client, "GET", f"/responses/{rid}/input_items", body=None, stream=False, idempotent=True
        )
    _require("GET", "DELETE")
    if request.method == "DELETE":
        client = tenant.locate(rid)
        answer = _forward(
            tenant, client, "DELETE", f"/responses/{rid}", body=None, stream=False, idempotent=True
        )
        if 200 <= answer.status_code < 300:
            tenant.forget(rid)
        return answer
    query = parse_retrieve_query(request.query_string)
    client = tenant.locate(rid)
    resume = _Resume(request.query_string, rid) if query.stream else None
    return _forward(
        tenant,
        client,
        "GET",
        f"/responses/{rid}",
        body=None,
        stream=query.stream,
        idempotent=True,
        resume=resume,
        # A background response polled to its end carries its usage: count it (once) here too.
        count_usage=tenant.state.store is not None,
    )


def models() -> Response:
    _require("GET")
    tenant = _tenant()
    state = tenant.state
    if not state.router.has_table:
        client = state.upstreams[state.default_upstream]
        return _forward(tenant, client, "GET", "/models", body=None, stream=False, idempotent=True)
    # The gateway's own catalogue: the routed model names this key may use.
    names = [name for name in state.router.public_names() if tenant.identity.may_use(name)]
    listing = {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": 0, "owned_by": "wsgi-proxy"} for name in names],
    }
    return Response(json.dumps(listing, separators=(",", ":")), content_type="application/json")


def not_found(rest: str = "") -> Response:
    raise RouteNotFound(
        f"Unknown endpoint {request.method} {request.path}. The proxy serves /responses, /responses/{{id}}"
        " (with /cancel and /input_items), /responses/input_tokens, /responses/compact and /models."
    )


# --- error handlers (scoped to the blueprint: the host app's error pages stay its own) ---------


def _proxy_error(exc: ProxyError) -> Response:
    obs = _obs()
    obs.error = exc.code or exc.type
    metrics = _state().metrics
    if isinstance(exc, UpstreamError):
        metrics.upstream_error(upstream=obs.upstream, kind=exc.code or "upstream_error")
    elif isinstance(exc, RateLimited):
        metrics.rate_limited(limit=exc.limit)
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
    bp.before_request(_open_observation)
    bp.after_request(_close_observation)
    bp.register_error_handler(ProxyError, _proxy_error)
    bp.register_error_handler(HTTPException, _http_error)
    bp.register_error_handler(Exception, _unexpected)
    return bp
