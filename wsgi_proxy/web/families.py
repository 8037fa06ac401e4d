"""The Blueprint's views of the endpoint families beyond Responses and Conversations, each served only
where the operator (and the caller's team) lets it through: model-routed ones (chat completions,
embeddings, ...), uploads to a model (transcriptions, image edits), and the families whose objects
are their team's own (files, batches, vector stores, ...).
"""

from __future__ import annotations

from flask import Blueprint, Response, request

from ..errors import InvalidRequest
from ..upstream.client import StreamedBody
from ..wire.validation import parse_create_body, parse_object_path
from .hooks import record
from .inputs import (
    METHODS,
    call_for,
    caller,
    forward,
    object_body,
    owning,
    read_body,
    require,
    session,
    upload_body,
)

__all__ = ["PATHS", "add_rules"]


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
    require("POST")
    family, answer = _ROUTED[path]
    tenant = caller()
    tenant.check_endpoint(family)
    body = read_body()
    fields = parse_create_body(body)
    if fields.stream is True and answer != "chunks":
        raise InvalidRequest(
            f"This gateway does not relay streamed answers of /{path}. Send the request without"
            " 'stream' (or with stream false).",
            param="stream",
        )
    call = call_for(
        "POST",
        f"/{path}",
        body=body,
        stream=fields.stream is True,
        routed=True,
        model=fields.model,
        counts_usage=answer != "bytes",
        dialect="chat",
        session=session(fields.prompt_cache_key),
        downloads=answer == "bytes",
        **owning(fields.owned_ids),  # a file a message names, say
    )
    return forward(call, tenant)


def multipart_endpoint(path: str) -> Response:
    """An upload to a model (``/audio/transcriptions``, ``/images/edits``, ...), streamed to the first
    upstream. Its model is a field of the multipart body, which the proxy does not read (it would
    have to hold the file): so with a model table, or a key limited to some models, it is refused
    rather than sent where the model may not go."""
    require("POST")
    tenant = caller()
    tenant.check_endpoint(_MULTIPART[path])
    tenant.check_unread_model(path)
    if request.mimetype != "multipart/form-data":
        raise InvalidRequest(f"Send /{path} as multipart/form-data, as the SDKs do.", param=None)
    return forward(call_for("POST", f"/{path}", body=upload_body()), tenant)


#: Families whose objects are their team's own: made by ``POST /{family}``, then found by their id.
_OWNED = ("files", "uploads", "batches", "vector_stores", "containers")
#: Objects the upstream makes for an owned one, named in its answers: a batch's output and error
#: files, the file a completed upload becomes. They are recorded as the team's too.
_ADOPTED = {"batches": ("output_file_id", "error_file_id"), "uploads": ("file.id",)}


def owned_collection(family: str) -> Response:
    """``POST /{family}`` (the new object recorded with the caller's team, on the upstream of the
    objects its body names) and ``GET /{family}`` (only the team's own)."""
    require("GET", "POST")
    tenant = caller()
    tenant.check_endpoint(family)
    if request.method == "GET":
        record().renamed(f"{family}_list")
        return forward(call_for("GET", f"/{family}", idempotent=True, lists=True), tenant)
    body, named = object_body()
    call = call_for(
        "POST",
        f"/{family}",
        body=body,
        creates=True,
        **owning(named),
        adopts=_ADOPTED.get(family, ()),
    )
    return forward(call, tenant)


def owned_object(family: str, subpath: str) -> Response:
    """An object of an owned family and every route below it: served by its upstream, for its
    team only; a body naming other objects needs them to be the team's too."""
    tenant = caller()
    tenant.check_endpoint(family)
    target = parse_object_path(subpath)
    record().renamed(f"{family}_object")
    require("GET", "POST", "DELETE")
    body: bytes | StreamedBody | None = None
    named: tuple[str, ...] = ()
    if request.method == "POST":
        body, named = object_body()
    call = call_for(
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
    return forward(call, tenant)


#: Every path these views serve below the prefix (for the 404 of a path that is none of them).
PATHS = (*_ROUTED, *_MULTIPART, *_OWNED)


def add_rules(bp: Blueprint) -> None:
    """Add every family's routes to ``bp``."""
    for family in _OWNED:
        bp.add_url_rule(f"/{family}", family, owned_collection, methods=METHODS, defaults={"family": family})
        bp.add_url_rule(
            f"/{family}/<wsgi_proxy_path:subpath>",
            f"{family}_object",
            owned_object,
            methods=METHODS,
            defaults={"family": family},
        )
    for path in _ROUTED:
        bp.add_url_rule(
            f"/{path}", path.replace("/", "_"), family_endpoint, methods=METHODS, defaults={"path": path}
        )
    for path in _MULTIPART:
        bp.add_url_rule(
            f"/{path}", path.replace("/", "_"), multipart_endpoint, methods=METHODS, defaults={"path": path}
        )
