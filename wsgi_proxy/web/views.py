"""The proxy's Blueprint: thin views that read and validate a request, authenticate it, describe it
as one :class:`~wsgi_proxy.gateway.call.Call` for the gateway core, and wrap its answer. This module
has the Responses, Conversations, Models and WebSocket views and assembles the Blueprint;
``families.py`` has the other endpoint families, ``webhooks.py`` the upstreams' webhooks, and
``inputs.py`` the helpers they share.

Every route accepts every method and dispatches itself, so a wrong method or an unknown path under
the proxy's prefix gets an OpenAI-shaped error instead of the host app's HTML error page.
"""

from __future__ import annotations

import typing as t

from flask import Blueprint, Response, request
from flask.blueprints import BlueprintSetupState
from werkzeug.routing import PathConverter

from ..errors import (
    InvalidRequest,
    RouteNotFound,
    WebSocketUnavailable,
)
from ..gateway.call import ResumePlan
from ..upstream.resume import create_resume_query
from ..upstream.websocket import UpgradeRefused
from ..wire.validation import (
    parse_conversation_path,
    parse_create_body,
    parse_response_path,
    parse_retrieve_query,
)
from ..wire.websocket import accept_upgrade
from . import families, hooks, webhooks
from .hooks import EXTENSION_KEY, gateway, record
from .inputs import (
    METHODS,
    call_for,
    caller,
    forward,
    json_body,
    owning,
    read_body,
    require,
    respond,
    session,
)

__all__ = ["EXTENSION_KEY", "make_blueprint"]

# --- views -------------------------------------------------------------------------------------


def create() -> Response:
    require("POST")
    tenant = caller()
    body = read_body()
    fields = parse_create_body(body)
    stream, background = fields.stream is True, fields.background is True
    call = call_for(
        "POST",
        "/responses",
        body=body,
        stream=stream,
        routed=True,
        model=fields.model,
        **owning(fields.owned_ids),
        session=session(fields.prompt_cache_key),
        # A background stream can be resumed; nothing else can (OpenAI's rule).
        resume=ResumePlan(create_resume_query(fields)) if stream and background else None,
        creates=True,
        background=background,
        counts_usage=True,
    )
    return forward(call, tenant)


def json_post(endpoint: str) -> Response:
    """``POST /responses/input_tokens`` and ``POST /responses/compact``: a JSON object in, JSON out."""
    require("POST")
    tenant = caller()
    body = read_body()
    fields = parse_create_body(body)
    call = call_for(
        "POST",
        f"/responses/{endpoint}",
        body=body,
        routed=True,
        model=fields.model,
        **owning(fields.owned_ids),
        session=session(fields.prompt_cache_key),
    )
    return forward(call, tenant)


def response_item(subpath: str) -> Response:
    tenant = caller()  # before validation: an unauthenticated client learns nothing more
    target = parse_response_path(subpath)
    rid, path = target.response_id, f"/responses/{target.response_id}"
    if target.action == "cancel":
        record().renamed("cancel")
        require("POST")
        # Cancelling is idempotent: "subsequent calls simply return the final Response object".
        call = call_for("POST", f"{path}/cancel", body=read_body(), idempotent=True, owner_id=rid)
    elif target.action == "input_items":
        record().renamed("input_items")
        require("GET")
        call = call_for("GET", f"{path}/input_items", idempotent=True, owner_id=rid)
    elif request.method == "DELETE":
        record().renamed("delete")
        call = call_for("DELETE", path, idempotent=True, owner_id=rid, forgets=True)
    else:
        record().renamed("retrieve")
        require("GET", "DELETE")
        stream = parse_retrieve_query(request.query_string).stream
        call = call_for(
            "GET",
            path,
            stream=stream,
            idempotent=True,
            owner_id=rid,
            resume=ResumePlan(request.query_string, rid) if stream else None,
            # A background response polled to its end carries its usage: count it (once) here too.
            counts_usage=True,
        )
    return forward(call, tenant)


def conversations() -> Response:
    """``POST /conversations``: a new conversation, recorded with the caller's team. A conversation
    has no model, so it is made on the first upstream; creates that name it go there."""
    require("POST")
    tenant = caller()
    body, named = json_body()
    call = call_for("POST", "/conversations", body=body, creates=True, **owning(named))
    return forward(call, tenant)


def conversation_item(subpath: str) -> Response:
    """A conversation, its items or one item: served by its upstream, for its team only."""
    tenant = caller()  # before validation: an unauthenticated client learns nothing more
    target = parse_conversation_path(subpath)
    cid = target.conversation_id
    path = f"/conversations/{cid}"
    if target.item_id is not None:
        record().renamed("conversation_item")
        require("GET", "DELETE")
        call = call_for(request.method, f"{path}/items/{target.item_id}", idempotent=True, owner_id=cid)
    elif target.items:
        record().renamed("conversation_items")
        require("GET", "POST")
        if request.method == "POST":
            body, named = json_body()
            call = call_for("POST", f"{path}/items", body=body, owner_id=cid, owned=named)
        else:
            call = call_for("GET", f"{path}/items", idempotent=True, owner_id=cid)
    elif request.method == "POST":  # its metadata
        call = call_for("POST", path, body=json_body()[0], owner_id=cid)
    else:
        require("GET", "DELETE")
        deletes = request.method == "DELETE"
        call = call_for(request.method, path, idempotent=True, owner_id=cid, forgets=deletes)
    return forward(call, tenant)


def models() -> Response:
    require("GET")
    tenant = caller()
    return respond(gateway().list_models(call_for("GET", "/models", idempotent=True), tenant, record()))


class _HandedOver(Response):
    """The answer to an upgrade the proxy served on the socket itself: there is nothing left to write.

    gunicorn's workers close the connection, quietly, when the application raises StopIteration (the
    way WebSocket extensions of Flask hand a socket back); no status line or body goes out.
    """

    def __call__(self, environ: t.Any, start_response: t.Any) -> t.Any:
        raise StopIteration


def websocket_create() -> Response:
    """``GET /responses`` with ``Upgrade: websocket``: the Responses API's WebSocket mode."""
    require("GET")
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        raise WebSocketUnavailable(
            "This server does not hand its sockets to the application (run it under gunicorn)."
        )
    tenant = caller()
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
        stats = gateway().websocket(call_for("GET", "/responses"), tenant, record(), sock, handshake)
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
        " (with /{id}, /{id}/items and /{id}/items/{item_id}), /models, and where enabled "
        + ", ".join(f"/{path}" for path in families.PATHS)
        + "."
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
    bp.add_url_rule("/responses", "create", create, methods=METHODS)
    for endpoint in ("input_tokens", "compact"):
        bp.add_url_rule(
            f"/responses/{endpoint}", endpoint, json_post, methods=METHODS, defaults={"endpoint": endpoint}
        )
    bp.add_url_rule("/responses/<wsgi_proxy_path:subpath>", "response", response_item, methods=METHODS)
    bp.add_url_rule("/conversations", "conversations", conversations, methods=METHODS)
    bp.add_url_rule(
        "/conversations/<wsgi_proxy_path:subpath>", "conversation", conversation_item, methods=METHODS
    )
    families.add_rules(bp)
    bp.add_url_rule("/models", "models", models, methods=METHODS)
    webhooks.add_rule(bp)
    bp.add_url_rule("", "not_found_root", not_found, methods=METHODS)
    bp.add_url_rule("/", "not_found", not_found, methods=METHODS)
    bp.add_url_rule("/<wsgi_proxy_path:rest>", "not_found_path", not_found, methods=METHODS)
    bp.add_url_rule("/responses", "websocket_create", websocket_create, websocket=True)
    for rule, endpoint in (
        ("", "websocket_root"),
        ("/", "websocket_slash"),
        ("/<wsgi_proxy_path:rest>", "websocket"),
    ):
        bp.add_url_rule(rule, endpoint, websocket, websocket=True)
    hooks.install(bp)
    return bp
