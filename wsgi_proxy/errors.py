"""The proxy's own errors and their OpenAI-shaped JSON envelope.

Every failure that the proxy itself detects is a :class:`ProxyError`; upstream 4xx/5xx answers are
relayed as they are and never become one. The tree::

    ProxyError                        500  server_error
    ├── InvalidRequest                400  invalid_request_error   (bad query, path or body; names `param`)
    │   ├── RequestTooLarge           413
    │   ├── LengthRequired            411  (an upload without Content-Length)
    │   └── HeadersTooLarge           431
    ├── AuthenticationFailed          401  invalid_request_error   (missing or unknown client key)
    ├── ModelNotFound                 404  invalid_request_error   (not routed, or not for this key)
    ├── ResponseNotFound              404  invalid_request_error   (unknown id, or another team's object)
    ├── RateLimited                   429  rate_limit_error        (requests or tokens per minute, streams)
    │   └── BudgetExhausted           429  insufficient_quota      (a daily or monthly token or cost budget)
    ├── RouteNotFound                 404  invalid_request_error
    ├── MethodNotAllowed              405  invalid_request_error
    ├── WebSocketUnavailable          426  invalid_request_error   (an upgrade: clients fall back to HTTP)
    ├── StoreUnavailable              503  server_error            (the shared state store did not answer)
    └── UpstreamError                 502  upstream_error
        ├── UpstreamUnavailable       502  (could not connect, or the connection broke before an answer)
        ├── UpstreamCredentialsRejected 502  (the upstream refused the gateway's own key)
        ├── UpstreamProtocolError     502  (the upstream answered something a proxy cannot relay)
        ├── WebhookUndelivered        502  (a webhook's destination did not take it: the sender retries)
        └── UpstreamTimeout           504

    StreamAborted (ConnectionResetError)  raised inside an SSE relay after the first byte; not a response
    UpstreamStreamInterrupted             the upstream body broke mid-stream (translated in upstream.py)

The envelope is the one the OpenAI SDKs parse: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import errno
import json
import typing as t

__all__ = [
    "AuthenticationFailed",
    "BudgetExhausted",
    "HeadersTooLarge",
    "InvalidRequest",
    "LengthRequired",
    "MethodNotAllowed",
    "ModelNotFound",
    "RateLimited",
    "ResponseNotFound",
    "ProxyError",
    "RequestTooLarge",
    "RouteNotFound",
    "StoreUnavailable",
    "StreamAborted",
    "UpstreamCredentialsRejected",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamStreamInterrupted",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "WebSocketUnavailable",
    "WebhookUndelivered",
    "error_body",
]


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    """Serialise one error in OpenAI's envelope, as compact UTF-8 JSON."""
    payload = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


class ProxyError(Exception):
    """A failure the proxy answers itself, before any byte of a response went out."""

    status: t.ClassVar[int] = 500
    type: t.ClassVar[str] = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> bytes:
        """This error as the JSON body of an HTTP response."""
        return error_body(self.message, self.type, self.param, self.code)

    def headers(self) -> dict[str, str]:
        """Extra response headers for this error (none by default)."""
        return {}


class InvalidRequest(ProxyError):
    """The client's request is malformed: a bad query parameter, path segment or body field."""

    status = 400
    type = "invalid_request_error"


class RequestTooLarge(InvalidRequest):
    """The request body is larger than the configured limit."""

    status = 413
    code = "request_too_large"


class LengthRequired(InvalidRequest):
    """An upload without a Content-Length: it could be neither bounded nor streamed upstream whole."""

    status = 411
    code = "length_required"


class HeadersTooLarge(InvalidRequest):
    """The client's headers to forward exceed the proxy's bound."""

    status = 431
    code = "request_headers_too_large"


class AuthenticationFailed(ProxyError):
    """The client sent no key, or a key that is not one of the configured client keys."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="wsgi-proxy"'}


class ModelNotFound(ProxyError):
    """The model is not routed by this gateway, or the caller's key may not use it."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str | None) -> None:
        shown = repr(model[:100]) if model else "(none given)"
        super().__init__(
            f"The model {shown} does not exist or you do not have access to it. Ask the proxy's operator"
            " which models your key may use (GET /v1/models lists them).",
            param="model",
        )


class ResponseNotFound(ProxyError):
    """No response (or conversation) with this id is visible to the caller: the same answer as for an
    unknown id, in OpenAI's words for the kind of object its prefix names (``conv_``: a conversation)."""

    status = 404
    type = "invalid_request_error"

    def __init__(self, object_id: str) -> None:
        kind = "Conversation" if object_id.startswith("conv_") else "Response"
        super().__init__(f"{kind} with id '{object_id}' not found.", param=None)


class RateLimited(ProxyError):
    """A key or team went over its requests or tokens per minute, or its concurrent streams."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float, limit: str) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        #: ``rpm``, ``streams``, ``tpm``, or a budget's kind: a metric label from that small set.
        self.limit = limit

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, int(self.retry_after + 0.999)))}


class BudgetExhausted(RateLimited):
    """A key or team spent its daily or monthly token or cost budget: OpenAI's quota error, which
    clients do not retry (``Retry-After`` still says when the budget resets)."""

    type = "insufficient_quota"
    code = "insufficient_quota"


class RouteNotFound(ProxyError):
    """No endpoint of the proxy matches the request path."""

    status = 404
    type = "invalid_request_error"
    code = "unknown_url"


class MethodNotAllowed(ProxyError):
    """The endpoint exists but not for this HTTP method."""

    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, message: str, *, allowed: t.Iterable[str]) -> None:
        super().__init__(message)
        self.allowed = sorted(allowed)

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allowed)}


class WebSocketUnavailable(ProxyError):
    """A WebSocket upgrade, which this gateway does not serve: 426, on which clients use HTTP."""

    status = 426
    type = "invalid_request_error"
    code = "websocket_unavailable"

    def __init__(
        self, reason: str = "This gateway does not serve the Responses API's WebSocket mode."
    ) -> None:
        super().__init__(
            f"{reason} Use HTTP (POST /v1/responses); the OpenAI SDKs and Codex fall back to it on this"
            " answer."
        )


class StoreUnavailable(ProxyError):
    """The shared state store did not answer, so the request can be neither checked nor routed."""

    status = 503
    type = "server_error"
    code = "store_unavailable"

    def __init__(self) -> None:
        super().__init__(
            "The gateway's state store is unavailable, so the request cannot be checked or routed."
            " Try again shortly; if it persists, the operator should check WSGI_PROXY_STORE_URL."
        )


class UpstreamError(ProxyError):
    """The upstream could not give an answer that the proxy can relay."""

    status = 502
    type = "upstream_error"

    #: True when the request provably never reached the upstream (no connection was made),
    #: so that even a create may be sent again.
    never_sent: bool = False


class WebhookUndelivered(UpstreamError):
    """A webhook could not be delivered where it goes: the sender is answered 502 and retries."""

    code = "webhook_undelivered"


class UpstreamUnavailable(UpstreamError):
    """The upstream could not be reached, or it dropped the connection before answering."""

    code = "upstream_unavailable"


class UpstreamCredentialsRejected(UpstreamError):
    """The upstream rejected the key the gateway holds; the operator, not the client, must act."""

    code = "upstream_credentials_rejected"


class UpstreamProtocolError(UpstreamError):
    """The upstream answered in a form the proxy cannot relay faithfully."""

    code = "upstream_protocol_error"


class UpstreamTimeout(UpstreamError):
    """The upstream did not connect or answer within the configured timeout."""

    status = 504
    code = "upstream_timeout"


class StreamAborted(ConnectionResetError):
    """Raised inside an SSE relay to drop the client connection without a clean end.

    After the first byte the status line cannot change, so the only honest signal of a broken
    stream is an aborted connection: no terminating chunk, so SDKs raise and the client can resume
    with ``starting_after``. Being a :class:`ConnectionResetError` with ``errno`` ECONNRESET makes
    gunicorn treat it as a connection reset (closed quietly, logged at debug) rather than an
    application crash with a traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(errno.ECONNRESET, message)


class UpstreamStreamInterrupted(Exception):
    """The upstream body ended abnormally after the response had started.

    A reset, a truncated chunked body, a read timeout or an undecodable body: the stream cannot be
    read further on this connection. ``reason`` is a short phrase for logs.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
