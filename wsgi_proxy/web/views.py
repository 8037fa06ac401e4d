"""The proxy's Blueprint: thin views that read and validate a request, authenticate it, describe it
as one :class:`~wsgi_proxy.gateway.call.Call` for the gateway core, and wrap its answer.

Every route accepts every method and dispatches itself, so a wrong method or an unknown path under
the proxy's prefix gets an OpenAI-shaped error instead of the host app's HTML error page.
"""

from __future__ import annotations

import logging
import typing as t

from flask import Blueprint, Response, request
from flask.blueprints import BlueprintSetupState
from werkzeug.exceptions import HTTPException
from werkzeug.routing import PathConverter

from ..errors import (
    InvalidRequest,
    LengthRequired,
    MethodNotAllowed,
    RequestTooLarge,
    RouteNotFound,
    WebSocketUnavailable,
)
from ..gateway.call import Answer, Call, ResumePlan
from ..gateway.tenancy import Tenant
from ..upstream.client import StreamedBody
from ..upstream.resume import create_resume_query
from ..upstream.websocket import UpgradeRefused
from ..wire.validation import (
    named_ids,
    parse_conversation_path,
    parse_create_body,
    parse_json_object,
    parse_object_path,
    parse_response_path,
    parse_retrieve_query,
)
from ..wire.websocket import accept_upgrade
from . import hooks
from .hooks import EXTENSION_KEY, gateway, record

__all__ = ["EXTENSION_KEY", "make_blueprint"]

log = logging.getLogger("wsgi_proxy")

_METHODS = ["GET", "POST", "DELETE", "PUT", "PATCH"]


def _require(*allowed: str) -> None:
    method = "GET" if request.method == "HEAD" else request.method
    if method not in allowed:
        raise MethodNotAllowed(
            f"{request.method} is not supported on {request.path}; use {' or '.join(allowed)}.",
            allowed=allowed,
        )


def _tenant() -> Tenant:
    return gateway().authenticate(request.headers.get("Authorization"), record())


def _read_body() -> bytes:
    limit = gateway().settings.max_request_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise RequestTooLarge(f"The request body is larger than the proxy's limit of {limit} bytes.")
    try:
        # Ask for no more than the declared length: the stream's read allocates a buffer of the size asked.
        body = request.stream.read(limit + 1 if length is None else length)
    except HTTPException:
        raise
    except Exception as exc:  # the server's reader of a malformed chunked body (gunicorn's own errors)
        log.info("could not read a request body: %s", type(exc).__name__)
        raise InvalidRequest(
            "The request body could not be read: its chunked transfer coding is malformed. Send a valid"
            " body, or a Content-Length instead.",
            param=None,
        ) from None
    if len(body) > limit:
        raise RequestTooLarge(f"The request body is larger than the proxy's limit of {limit} bytes.")
    if length is not None and len(body) < length:
        raise InvalidRequest(
            f"The request body ended after {len(body)} of the {length} bytes its Content-Length announced."
            " Send the whole body.",
            param=None,
        )
    return body


def _session(prompt_cache_key: str | None) -> str | None:
    """What ties a routed call to its session: its ``prompt_cache_key``, else Codex's ``Session-Id``."""
    return prompt_cache_key or request.headers.get("Session-Id") or None


def _call(method: str, path: str, **fields: t.Any) -> Call:
    """The call for this request: its raw query and headers, and what the view decided."""
    return Call(method, path, request.query_string, tuple(request.headers.items()), **fields)


def _response(answer: Answer) -> Response:
    return Response(
        answer.body, status=answer.status, headers=answer.headers, direct_passthrough=answer.streams
    )


def _forward(call: Call, tenant: Tenant) -> Response:
    environ = request.environ
    client = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    return _response(gateway().forward(call, tenant, record(), client))


# --- views -------------------------------------------------------------------------------------


def create() -> Response:
    _require("POST")
    tenant = _tenant()
    body = _read_body()
    fields = parse_create_body(body)
    stream, background = fields.stream is True, fields.background is True
    call = _call(
        "POST",
        "/responses",
        body=body,
        stream=stream,
        routed=True,
        model=fields.model,
        owner_id=next(iter(fields.owned_ids), None),
        owned=fields.owned_ids[1:],
        session=_session(fields.prompt_cache_key),
        # A background stream can be resumed; nothing else can (OpenAI's rule).
        resume=ResumePlan(create_resume_query(fields)) if stream and background else None,
        creates=True,
        background=background,
        counts_usage=True,
    )
    return _forward(call, tenant)


def json_post(endpoint: str) -> Response:
    """``POST /responses/input_tokens`` and ``POST /responses/compact``: a JSON object in, JSON out."""
    _require("POST")
    tenant = _tenant()
    body = _read_body()
    fields = parse_create_body(body)
    call = _call(
        "POST",
        f"/responses/{endpoint}",
        body=body,
        routed=True,
        model=fields.model,
        owner_id=next(iter(fields.owned_ids), None),
        owned=fields.owned_ids[1:],
        session=_session(fields.prompt_cache_key),
    )
    return _forward(call, tenant)


def response_item(subpath: str) -> Response:
    tenant = _tenant()  # before validation: an unauthenticated client learns nothing more
    target = parse_response_path(subpath)
    rid, path = target.response_id, f"/responses/{target.response_id}"
    if target.action == "cancel":
        record().renamed("cancel")
        _require("POST")
        # Cancelling is idempotent: "subsequent calls simply return the final Response object".
        call = _call("POST", f"{path}/cancel", body=_read_body(), idempotent=True, owner_id=rid)
    elif target.action == "input_items":
        record().renamed("input_items")
        _require("GET")
        call = _call("GET", f"{path}/input_items", idempotent=True, owner_id=rid)
    elif request.method == "DELETE":
        record().renamed("delete")
        call = _call("DELETE", path, idempotent=True, owner_id=rid, forgets=True)
    else:
        record().renamed("retrieve")
        _require("GET", "DELETE")
        stream = parse_retrieve_query(request.query_string).stream
        call = _call(
            "GET",
            path,
            stream=stream,
            idempotent=True,
            owner_id=rid,
            resume=ResumePlan(request.query_string, rid) if stream else None,
            # A background response polled to its end carries its usage: count it (once) here too.
            counts_usage=True,
        )
    return _forward(call, tenant)


def _json_body() -> tuple[bytes, tuple[str, ...]]:
    """The request body, checked to be a JSON object (and forwarded as its original bytes), and the
    ids of objects it names (files in items), which the caller must own too."""
    body = _read_body()
    return body, named_ids(parse_json_object(body))


def conversations() -> Response:
    """``POST /conversations``: a new conversation, recorded with the caller's team. A conversation
    has no model, so it is made on the first upstream; creates that name it go there."""
    _require("POST")
    tenant = _tenant()
    body, named = _json_body()
    call = _call(
        "POST", "/conversations", body=body, creates=True, owner_id=next(iter(named), None), owned=named[1:]
    )
    return _forward(call, tenant)


def conversation_item(subpath: str) -> Response:
    """A conversation, its items or one item: served by its upstream, for its team only."""
    tenant = _tenant()  # before validation: an unauthenticated client learns nothing more
    target = parse_conversation_path(subpath)
    cid = target.conversation_id
    path = f"/conversations/{cid}"
    if target.item_id is not None:
        record().renamed("conversation_item")
        _require("GET", "DELETE")
        call = _call(request.method, f"{path}/items/{target.item_id}", idempotent=True, owner_id=cid)
    elif target.items:
        record().renamed("conversation_items")
        _require("GET", "POST")
        if request.method == "POST":
            body, named = _json_body()
            call = _call("POST", f"{path}/items", body=body, owner_id=cid, owned=named)
        else:
            call = _call("GET", f"{path}/items", idempotent=True, owner_id=cid)
    elif request.method == "POST":  # its metadata
        call = _call("POST", path, body=_json_body()[0], owner_id=cid)
    else:
        _require("GET", "DELETE")
        deletes = request.method == "DELETE"
        call = _call(request.method, path, idempotent=True, owner_id=cid, forgets=deletes)
    return _forward(call, tenant)


#: Model-routed endpoints (a JSON object with a model in): path -> (family, what comes back:
#: ``chunks`` streams when ``stream`` is true, ``json`` is a JSON answer, ``bytes`` a binary one).
_ROUTED = {
    "chat/completions": ("chat/completions", "chunks"),
    "completions": ("completions", "chunks"),
    "embeddings": ("embeddings", "json"),
    "moderations": ("moderations", "json"),
    "images/generations": ("images", "json"),
    "audio/speech": ("audio", "bytes"),
}
#: Endpoints whose request is a multipart upload (a file, and the model among its fields): path -> family.
_MULTIPART = {
    "images/edits": "images",
    "images/variations": "images",
    "audio/transcriptions": "audio",
    "audio/translations": "audio",
}


def family_endpoint(path: str) -> Response:
    """A model-routed endpoint (``/chat/completions``, ``/embeddings``, ...), if the gateway and the
    caller's team serve its family: JSON in; JSON, a chunk stream or bytes out; usage counted."""
    _require("POST")
    family, answer = _ROUTED[path]
    tenant = _tenant()
    tenant.check_endpoint(family)
    body = _read_body()
    fields = parse_create_body(body)
    if fields.stream is True and answer != "chunks":
        raise InvalidRequest(
            f"This gateway does not relay streamed answers of /{path}. Send the request without"
            " 'stream' (or with stream false).",
            param="stream",
        )
    call = _call(
        "POST",
        f"/{path}",
        body=body,
        stream=fields.stream is True,
        routed=True,
        model=fields.model,
        counts_usage=answer != "bytes",
        dialect="chat",
        session=_session(fields.prompt_cache_key),
        downloads=answer == "bytes",
        owner_id=next(iter(fields.owned_ids), None),  # a file a message names, say
        owned=fields.owned_ids[1:],
    )
    return _forward(call, tenant)


def multipart_endpoint(path: str) -> Response:
    """An upload to a model (``/audio/transcriptions``, ``/images/edits``, ...), streamed to the first
    upstream. Its model is a field of the multipart body, which the proxy does not read (it would
    have to hold the file): so with a model table, or a key limited to some models, it is refused
    rather than sent where the model may not go."""
    _require("POST")
    tenant = _tenant()
    tenant.check_endpoint(_MULTIPART[path])
    if gateway().state.router.has_table or tenant.identity.models:
        raise InvalidRequest(
            f"/{path} takes its model inside a multipart upload, which this gateway does not read, so"
            " it cannot route it or check that your key may use it. Ask the operator to serve it from a"
            " gateway without a model table or model limits.",
            param="model",
        )
    if request.mimetype != "multipart/form-data":
        raise InvalidRequest(f"Send /{path} as multipart/form-data, as the SDKs do.", param=None)
    return _forward(_call("POST", f"/{path}", body=_upload_body()), tenant)


def _upload_body() -> StreamedBody:
    """The body of an upload, streamed upstream as it arrives: it must announce its length."""
    limit = gateway().settings.max_upload_bytes
    length = request.content_length
    if length is None:
        raise LengthRequired(
            "Send the upload with a Content-Length (the SDKs do), so the proxy can stream it upstream.",
            param=None,
        )
    if length > limit:
        raise RequestTooLarge(f"The upload is larger than the proxy's limit of {limit} bytes.")
    return StreamedBody(t.cast(t.BinaryIO, request.stream), length)


#: Families whose objects are their team's own: made by ``POST /{family}``, then found by their id.
_OWNED = ("files", "uploads", "batches", "vector_stores", "containers")
#: Objects the upstream makes for an owned one, named in its answers: a batch's output and error
#: files, the file a completed upload becomes. They are recorded as the team's too.
_ADOPTED = {"batches": ("output_file_id", "error_file_id"), "uploads": ("file.id",)}


def _object_body() -> tuple[bytes | StreamedBody, tuple[str, ...]]:
    """A body for an owned family: a multipart upload (streamed), or a JSON object (or nothing) and
    the ids it names, which the caller must own too."""
    if request.mimetype == "multipart/form-data":
        return _upload_body(), ()
    body = _read_body()
    return body, (named_ids(parse_json_object(body)) if body.strip() else ())


def owned_collection(family: str) -> Response:
    """``POST /{family}`` (the new object recorded with the caller's team, on the upstream of the
    objects its body names) and ``GET /{family}`` (only the team's own)."""
    _require("GET", "POST")
    tenant = _tenant()
    tenant.check_endpoint(family)
    if request.method == "GET":
        record().renamed(f"{family}_list")
        return _forward(_call("GET", f"/{family}", idempotent=True, lists=True), tenant)
    body, named = _object_body()
    call = _call(
        "POST",
        f"/{family}",
        body=body,
        creates=True,
        owner_id=next(iter(named), None),
        owned=named[1:],
        adopts=_ADOPTED.get(family, ()),
    )
    return _forward(call, tenant)


def owned_object(family: str, subpath: str) -> Response:
    """An object of an owned family and every route below it: served by its upstream, for its
    team only; a body naming other objects needs them to be the team's too."""
    tenant = _tenant()
    tenant.check_endpoint(family)
    target = parse_object_path(subpath)
    record().renamed(f"{family}_object")
    _require("GET", "POST", "DELETE")
    body: bytes | StreamedBody | None = None
    named: tuple[str, ...] = ()
    if request.method == "POST":
        body, named = _object_body()
    call = _call(
        request.method,
        f"/{family}/{target.object_id}{target.rest}",
        body=body,
        idempotent=request.method != "POST",
        owner_id=target.object_id,
        owned=named,
        downloads=request.method == "GET" and target.downloads,
        forgets=request.method == "DELETE" and not target.rest,
        adopts=_ADOPTED.get(family, ()),
    )
    return _forward(call, tenant)


def models() -> Response:
    _require("GET")
    tenant = _tenant()
    return _response(gateway().list_models(_call("GET", "/models", idempotent=True), tenant, record()))


class _HandedOver(Response):
    """The answer to an upgrade the proxy served on the socket itself: there is nothing left to write.

    gunicorn's workers close the connection, quietly, when the application raises StopIteration (the
    way WebSocket extensions of Flask hand a socket back); no status line or body goes out.
    """

    def __call__(self, environ: t.Any, start_response: t.Any) -> t.Any:
        raise StopIteration


def websocket_create() -> Response:
    """``GET /responses`` with ``Upgrade: websocket``: the Responses API's WebSocket mode."""
    _require("GET")
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        raise WebSocketUnavailable(
            "This server does not hand its sockets to the application (run it under gunicorn)."
        )
    tenant = _tenant()
    accept = accept_upgrade(request.full_path.rstrip("?"), list(request.headers.items()))
    if accept.status_code != 101:
        raise InvalidRequest(
            "This is not a valid WebSocket upgrade (RFC 6455): send Connection: Upgrade, Upgrade: websocket,"
            " Sec-WebSocket-Version: 13 and a Sec-WebSocket-Key.",
            param=None,
        )

    def handshake(extra: list[tuple[str, str]]) -> None:
        for name, value in extra:
            accept.headers[name] = value
        sock.sendall(accept.serialize())

    try:
        stats = gateway().websocket(_call("GET", "/responses"), tenant, record(), sock, handshake)
    except UpgradeRefused as exc:  # what the upstream answered, relayed (never before a 101)
        return Response(exc.body, status=exc.status, content_type="application/json")
    record().connection_ended(stats)
    return _HandedOver(status=101)


def websocket(rest: str = "") -> Response:
    """Any other WebSocket upgrade under the prefix (werkzeug routes upgrades to these rules only)."""
    raise WebSocketUnavailable(f"The proxy serves WebSocket mode on /responses only, not on {request.path}.")


def not_found(rest: str = "") -> Response:
    raise RouteNotFound(
        f"Unknown endpoint {request.method} {request.path}. The proxy serves /responses, /responses/{{id}}"
        " (with /cancel and /input_items), /responses/input_tokens, /responses/compact, /conversations"
        " (with /{id}, /{id}/items and /{id}/items/{item_id}), /models, and where enabled /chat/completions,"
        " /completions, /embeddings and /moderations."
    )


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
    bp.add_url_rule("/responses", "create", create, methods=_METHODS)
    for endpoint in ("input_tokens", "compact"):
        bp.add_url_rule(
            f"/responses/{endpoint}", endpoint, json_post, methods=_METHODS, defaults={"endpoint": endpoint}
        )
    bp.add_url_rule("/responses/<wsgi_proxy_path:subpath>", "response", response_item, methods=_METHODS)
    bp.add_url_rule("/conversations", "conversations", conversations, methods=_METHODS)
    bp.add_url_rule(
        "/conversations/<wsgi_proxy_path:subpath>", "conversation", conversation_item, methods=_METHODS
    )
    for family in _OWNED:
        bp.add_url_rule(f"/{family}", family, owned_collection, methods=_METHODS, defaults={"family": family})
        bp.add_url_rule(
            f"/{family}/<wsgi_proxy_path:subpath>",
            f"{family}_object",
            owned_object,
            methods=_METHODS,
            defaults={"family": family},
        )
    for path in _ROUTED:
        bp.add_url_rule(
            f"/{path}", path.replace("/", "_"), family_endpoint, methods=_METHODS, defaults={"path": path}
        )
    for path in _MULTIPART:
        bp.add_url_rule(
            f"/{path}", path.replace("/", "_"), multipart_endpoint, methods=_METHODS, defaults={"path": path}
        )
    bp.add_url_rule("/models", "models", models, methods=_METHODS)
    bp.add_url_rule("", "not_found_root", not_found, methods=_METHODS)
    bp.add_url_rule("/", "not_found", not_found, methods=_METHODS)
    bp.add_url_rule("/<wsgi_proxy_path:rest>", "not_found_path", not_found, methods=_METHODS)
    bp.add_url_rule("/responses", "websocket_create", websocket_create, websocket=True)
    for rule, endpoint in (
        ("", "websocket_root"),
        ("/", "websocket_slash"),
        ("/<wsgi_proxy_path:rest>", "websocket"),
    ):
        bp.add_url_rule(rule, endpoint, websocket, websocket=True)
    hooks.install(bp)
    return bp
