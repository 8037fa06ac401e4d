"""What a view reads of its request, and how it hands the gateway core one call: the helpers every
view module of the Blueprint shares (checked methods, the caller, bodies within their bounds, the
:class:`~wsgi_proxy.gateway.call.Call`, the answer wrapped as a Flask response).
"""

from __future__ import annotations

import logging
import typing as t

from flask import Response, request
from werkzeug.exceptions import HTTPException

from ..errors import InvalidRequest, LengthRequired, MethodNotAllowed, RequestTooLarge
from ..gateway.call import Answer, Call
from ..gateway.tenancy import Tenant
from ..upstream.client import StreamedBody
from ..wire.validation import named_ids, parse_json_object
from .hooks import gateway, record

__all__ = [
    "METHODS",
    "call_for",
    "caller",
    "forward",
    "json_body",
    "object_body",
    "owning",
    "read_body",
    "require",
    "respond",
    "session",
    "upload_body",
]

log = logging.getLogger("wsgi_proxy")

#: Every route accepts these and dispatches itself, so a wrong method gets OpenAI's 405, not HTML.
METHODS = ["GET", "POST", "DELETE", "PUT", "PATCH"]


def require(*allowed: str) -> None:
    method = "GET" if request.method == "HEAD" else request.method
    if method not in allowed:
        raise MethodNotAllowed(
            f"{request.method} is not supported on {request.path}; use {' or '.join(allowed)}.",
            allowed=allowed,
        )


def caller() -> Tenant:
    return gateway().authenticate(request.headers.get("Authorization"), record())


def read_body() -> bytes:
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


def json_body(*, empty: bool = False) -> tuple[bytes, tuple[str, ...]]:
    """The request body, checked to be a JSON object (or, with ``empty``, nothing) and forwarded as
    its original bytes, and the ids of objects it names, which the caller must own too."""
    body = read_body()
    if empty and not body.strip():
        return body, ()
    return body, named_ids(parse_json_object(body))


def upload_body() -> StreamedBody:
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


def object_body() -> tuple[bytes | StreamedBody, tuple[str, ...]]:
    """A body for an owned family: a multipart upload (streamed), or a JSON object (or nothing) and
    the ids it names."""
    if request.mimetype == "multipart/form-data":
        return upload_body(), ()
    return json_body(empty=True)


def session(prompt_cache_key: str | None) -> str | None:
    """What ties a routed call to its session: its ``prompt_cache_key``, else Codex's ``Session-Id``."""
    return prompt_cache_key or request.headers.get("Session-Id") or None


def owning(ids: tuple[str, ...]) -> dict[str, t.Any]:
    """The call fields for the ids a request names: the first one routes it, all must be the team's."""
    return {"owner_id": ids[0] if ids else None, "owned": ids[1:]}


def call_for(method: str, path: str, **fields: t.Any) -> Call:
    """The call for this request: its raw query and headers, and what the view decided."""
    return Call(method, path, request.query_string, tuple(request.headers.items()), **fields)


def respond(answer: Answer) -> Response:
    return Response(
        answer.body, status=answer.status, headers=answer.headers, direct_passthrough=answer.streams
    )


def forward(made: Call, caller: Tenant) -> Response:
    environ = request.environ
    client = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    return respond(gateway().forward(made, caller, record(), client))
