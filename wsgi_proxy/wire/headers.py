"""Header policy, as pure functions: what goes upstream, and what comes back to the client."""

from __future__ import annotations

import typing as t

from ..errors import HeadersTooLarge

__all__ = [
    "BUDGET_HEADER",
    "budget_remaining",
    "CREDENTIAL_HEADERS",
    "FORWARDED",
    "MAX_FORWARDED_HEADER_BYTES",
    "client_response_headers",
    "redact",
    "upstream_request_headers",
]

#: Headers that carry a credential: never forwarded from a client in gateway mode, never logged.
CREDENTIAL_HEADERS = frozenset({"authorization", "api-key", "x-api-key", "cookie", "proxy-authorization"})

#: Client request headers forwarded upstream: what the OpenAI SDKs, Codex and tracing send. Anything
#: else (X-Forwarded-*, X-Original-URL, X-HTTP-Method-Override, True-Client-IP, credential-looking
#: headers such as OpenAI-Api-Key or X-Auth-Token, vendor headers) stays at the gateway, unless the
#: operator names it in WSGI_PROXY_FORWARD_HEADERS.
FORWARDED = frozenset(
    {
        "accept",
        "content-type",
        "user-agent",
        "idempotency-key",
        "openai-beta",
        "x-client-request-id",
        "traceparent",
        "tracestate",
        # Codex's session headers (prompt caching and its own bookkeeping upstream).
        "session-id",
        "thread-id",
        "originator",
        "version",
    }
)
FORWARDED_PREFIXES = ("x-stainless-",)

# In gateway mode the account is the operator's: clients may not pick its organisation or project.
_ACCOUNT_HEADERS = frozenset({"openai-organization", "openai-project"})

#: The most bytes of client headers forwarded upstream (names and values); more is a 431.
MAX_FORWARDED_HEADER_BYTES = 16 * 1024

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
    also: t.Collection[str] = (),
) -> dict[str, str]:
    """The headers to send upstream for one client request.

    Client headers pass by allow-list (:data:`FORWARDED`, ``X-Stainless-*``, and ``also``), never
    when a ``Connection`` header names them hop-by-hop; the client's own credentials, organisation
    and project only in pass-through mode, where ``credentials`` carries them. ``credentials`` (the
    gateway's own, or the client's in pass-through mode) are added last. Streams ask for
    ``identity`` so that no compression sits between an event and its delivery.

    :param client_headers: the client's headers as (name, value) pairs.
    :param credentials: headers that authenticate the request upstream.
    :param pass_through: True when the proxy holds no key and relays the client's.
    :param stream: True for a request whose answer is an SSE stream.
    :param also: lowercase names the operator forwards too (a trailing ``*`` matches a prefix).
    :raises ~wsgi_proxy.errors.HeadersTooLarge: past :data:`MAX_FORWARDED_HEADER_BYTES`.
    """
    pairs = list(client_headers)
    dropped = _connection_tokens(pairs)
    out: dict[str, str] = {}
    size = 0
    for name, value in pairs:
        lower = name.lower()
        if lower in dropped or not (_forwarded(lower, also) or (pass_through and lower in _ACCOUNT_HEADERS)):
            continue
        size += len(name) + len(value)
        if size > MAX_FORWARDED_HEADER_BYTES:
            raise HeadersTooLarge(
                f"The request's headers are larger than the {MAX_FORWARDED_HEADER_BYTES} bytes the proxy"
                " forwards. Send fewer or shorter headers."
            )
        out[name] = value
    out.update(credentials)
    out["Accept-Encoding"] = "identity" if stream else "gzip, deflate"
    return out


def _forwarded(lower: str, also: t.Collection[str]) -> bool:
    if lower in FORWARDED or lower.startswith(FORWARDED_PREFIXES):
        return True
    return any(lower == name or (name.endswith("*") and lower.startswith(name[:-1])) for name in also)


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


#: The answer header that says what is left of the caller's budgets.
BUDGET_HEADER = "X-Budget-Remaining"


def budget_remaining(left: t.Iterable[tuple[str, str, int]]) -> str:
    """The value of :data:`BUDGET_HEADER`: ``<counter> <kind>=<left>`` for each (counter, kind,
    left) budget, comma-separated; cost budgets' ``left`` (nano-dollars) in US dollars."""
    parts = []
    for counter, kind, amount in left:
        value = f"{amount / 1e9:.6f}".rstrip("0").rstrip(".") if kind.startswith("usd") else str(amount)
        parts.append(f"{counter} {kind}={value}")
    return ", ".join(parts)
