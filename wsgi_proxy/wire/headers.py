"""Header policy, as pure functions: what goes upstream, and what comes back to the client."""

from __future__ import annotations

import typing as t

__all__ = ["CREDENTIAL_HEADERS", "client_response_headers", "upstream_request_headers", "redact"]

# RFC 9110 §7.6.1 hop-by-hop headers, plus framing headers the WSGI server owns.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
        "expect",
    }
)

#: Headers that carry a credential: never forwarded from a client in gateway mode, never logged.
CREDENTIAL_HEADERS = frozenset({"authorization", "api-key", "x-api-key", "cookie", "proxy-authorization"})

# Request headers the proxy sets itself or that would reveal the client's network to the upstream.
_NOT_FORWARDED = frozenset(
    {"accept-encoding", "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip"}
)

# In gateway mode the account is the operator's: clients may not pick its organisation or project.
_ACCOUNT_HEADERS = frozenset({"openai-organization", "openai-project"})

_RESPONSE_EXACT = frozenset(
    {"content-type", "x-request-id", "retry-after", "retry-after-ms", "x-should-retry", "request-id"}
)
_RESPONSE_PREFIXES = ("openai-", "x-ratelimit-")


def _connection_tokens(headers: t.Iterable[tuple[str, str]]) -> set[str]:
    tokens: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            tokens.update(token.strip().lower() for token in value.split(",") if token.strip())
    return tokens


def upstream_request_headers(
    client_headers: t.Iterable[tuple[str, str]],
    *,
    credentials: t.Mapping[str, str],
    pass_through: bool,
    stream: bool,
) -> dict[str, str]:
    """The headers to send upstream for one client request.

    End-to-end headers pass through (``OpenAI-Beta``, ``X-Stainless-*``, ``Idempotency-Key``,
    vendor headers); hop-by-hop and framing headers do not. The client's credentials are dropped
    unless the proxy runs as a pass-through; ``credentials`` (the gateway's own, or the client's
    in pass-through mode) are added last. Streams ask for ``identity`` so that no compression sits
    between an event and its delivery.

    :param client_headers: the client's headers as (name, value) pairs.
    :param credentials: headers that authenticate the request upstream.
    :param pass_through: True when the proxy holds no key and relays the client's.
    :param stream: True for a request whose answer is an SSE stream.
    """
    pairs = list(client_headers)
    dropped = _connection_tokens(pairs)
    out: dict[str, str] = {}
    for name, value in pairs:
        lower = name.lower()
        if (
            lower in _HOP_BY_HOP
            or lower in dropped
            or lower in CREDENTIAL_HEADERS
            or lower in _NOT_FORWARDED
            or (not pass_through and lower in _ACCOUNT_HEADERS)
        ):
            continue
        out[name] = value
    out.update(credentials)
    out["Accept-Encoding"] = "identity" if stream else "gzip, deflate"
    return out


def client_response_headers(upstream_headers: t.Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The upstream response headers a client may see: an allow-list, never framing or cookies."""
    out = []
    for name, value in upstream_headers:
        lower = name.lower()
        if lower in _RESPONSE_EXACT or lower.startswith(_RESPONSE_PREFIXES):
            out.append((name, value))
    return out


def redact(headers: t.Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers with every credential value replaced, for logs and error reports."""
    return [(n, "<redacted>" if n.lower() in CREDENTIAL_HEADERS else v) for n, v in headers]
