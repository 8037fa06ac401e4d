"""Header policy: what goes upstream, what comes back, what is logged."""

from __future__ import annotations

import pytest

from wsgi_proxy.wire.headers import client_response_headers, redact, upstream_request_headers

GATEWAY = {"Authorization": "Bearer sk-gateway", "OpenAI-Organization": "org-gw"}


def _upstream(
    headers: list[tuple[str, str]], *, pass_through: bool = False, stream: bool = False
) -> dict[str, str]:
    credentials = {} if pass_through else GATEWAY
    return upstream_request_headers(
        headers, credentials=credentials, pass_through=pass_through, stream=stream
    )


def _lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


@pytest.mark.parametrize(
    "name",
    [
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
        "Expect",
        "Accept-Encoding",
        "Forwarded",
        "X-Forwarded-For",
        "X-Real-IP",
        "Cookie",
        "X-Api-Key",
        # Forwarded by the deny-list of old: an allow-list keeps them at the gateway.
        "X-Forwarded-Port",
        "X-Forwarded-Server",
        "X-Forwarded-Prefix",
        "X-Original-URL",
        "X-Rewrite-URL",
        "X-HTTP-Method-Override",
        "True-Client-IP",
        "CF-Connecting-IP",
        "OpenAI-Api-Key",
        "X-Auth-Token",
        "X-Custom-Vendor",
    ],
)
@pytest.mark.parametrize("pass_through", [False, True], ids=["gateway", "pass_through"])
def test_upstream_request_headers_dropped_in_both_modes(name: str, pass_through: bool) -> None:
    out = _lower(_upstream([(name, "client-value")], pass_through=pass_through))
    assert "client-value" not in out.values()


@pytest.mark.parametrize(
    ("name", "gateway_keeps", "pass_through_keeps"),
    [
        ("Authorization", False, False),  # pass-through credentials come through `credentials`
        ("api-key", False, False),
        ("OpenAI-Organization", False, True),
        ("OpenAI-Project", False, True),
        ("OpenAI-Beta", True, True),
        ("X-Stainless-Lang", True, True),
        ("X-Stainless-Retry-Count", True, True),
        ("Idempotency-Key", True, True),
        ("Content-Type", True, True),
        ("User-Agent", True, True),
        ("Accept", True, True),
        ("traceparent", True, True),
        ("tracestate", True, True),
        ("X-Client-Request-Id", True, True),
        ("Session-Id", True, True),
        ("Originator", True, True),
        ("X-Custom-Vendor", False, False),
    ],
)
def test_upstream_request_headers_mode_policy(
    name: str, gateway_keeps: bool, pass_through_keeps: bool
) -> None:
    gateway = _upstream([(name, "client-value")])
    assert (gateway.get(name) == "client-value") is gateway_keeps
    passed = _upstream([(name, "client-value")], pass_through=True)
    assert (passed.get(name) == "client-value") is pass_through_keeps


def test_upstream_request_headers_connection_named_headers_dropped() -> None:
    out = _upstream(
        [
            ("Connection", "keep-alive, X-Stainless-Os, openai-beta"),
            ("X-Stainless-Os", "1"),
            ("OpenAI-Beta", "2"),
            ("X-Stainless-Lang", "3"),
        ]
    )
    assert {k.lower() for k in out} == {
        "x-stainless-lang",
        "authorization",
        "openai-organization",
        "accept-encoding",
    }


def test_upstream_request_headers_gateway_replaces_client_credentials() -> None:
    out = _upstream(
        [
            ("Authorization", "Bearer sk-client"),
            ("authorization", "Bearer sk-client-2"),
            ("OpenAI-Organization", "org-client"),
            ("Cookie", "session=1"),
        ]
    )
    assert out["Authorization"] == "Bearer sk-gateway"
    assert out["OpenAI-Organization"] == "org-gw"
    assert not any("client" in v or "session" in v for v in out.values())
    assert sum(k.lower() == "authorization" for k in out) == 1


def test_upstream_request_headers_pass_through_uses_given_credentials() -> None:
    out = upstream_request_headers(
        [("Authorization", "Bearer sk-client"), ("OpenAI-Project", "proj_1")],
        credentials={"Authorization": "Bearer sk-client"},
        pass_through=True,
        stream=False,
    )
    assert out["Authorization"] == "Bearer sk-client"
    assert out["OpenAI-Project"] == "proj_1"


@pytest.mark.parametrize(("stream", "encoding"), [(True, "identity"), (False, "gzip, deflate")])
def test_upstream_request_headers_accept_encoding(stream: bool, encoding: str) -> None:
    out = _upstream([("Accept-Encoding", "br, zstd")], stream=stream)
    assert [v for k, v in out.items() if k.lower() == "accept-encoding"] == [encoding]


@pytest.mark.parametrize(
    ("name", "kept"),
    [
        ("Content-Type", True),
        ("content-type", True),
        ("x-request-id", True),
        ("request-id", True),
        ("openai-organization", True),
        ("openai-processing-ms", True),
        ("openai-version", True),
        ("x-ratelimit-remaining-tokens", True),
        ("X-RateLimit-Reset-Requests", True),
        ("retry-after", True),
        ("retry-after-ms", True),
        ("x-should-retry", True),
        ("content-length", False),
        ("content-encoding", False),
        ("transfer-encoding", False),
        ("set-cookie", False),
        ("connection", False),
        ("keep-alive", False),
        ("server", False),
        ("date", False),
        ("cf-ray", False),
        ("strict-transport-security", False),
        ("alt-svc", False),
        ("www-authenticate", False),
    ],
)
def test_client_response_headers_allow_list(name: str, kept: bool) -> None:
    assert client_response_headers([(name, "v")]) == ([(name, "v")] if kept else [])


def test_client_response_headers_keeps_order_and_repeats() -> None:
    headers = [("x-ratelimit-a", "1"), ("Set-Cookie", "a=1"), ("openai-b", "2"), ("x-ratelimit-a", "3")]
    assert client_response_headers(headers) == [
        ("x-ratelimit-a", "1"),
        ("openai-b", "2"),
        ("x-ratelimit-a", "3"),
    ]


def test_redact_replaces_credentials_only() -> None:
    headers = [
        ("Authorization", "Bearer sk-secret"),
        ("api-key", "sk-secret"),
        ("X-Api-Key", "sk-secret"),
        ("Cookie", "sid=sk-secret"),
        ("Proxy-Authorization", "Basic sk-secret"),
        ("Content-Type", "application/json"),
        ("OpenAI-Beta", "responses=v1"),
    ]
    out = redact(headers)
    assert [n for n, _ in out] == [n for n, _ in headers]
    assert not any("sk-secret" in v for _, v in out)
    assert out[-2:] == headers[-2:]


@pytest.mark.parametrize(
    ("also", "name", "kept"),
    [
        (("x-vendor-id",), "X-Vendor-Id", True),
        (("x-vendor-*",), "X-Vendor-Trace", True),
        (("x-vendor-*",), "X-Other", False),
        ((), "X-Vendor-Id", False),
    ],
)
def test_upstream_request_headers_the_operator_forwards_too(
    also: tuple[str, ...], name: str, kept: bool
) -> None:
    out = upstream_request_headers(
        [(name, "v")], credentials=GATEWAY, pass_through=False, stream=False, also=also
    )
    assert (out.get(name) == "v") is kept


def test_upstream_request_headers_are_bounded() -> None:
    from wsgi_proxy.errors import HeadersTooLarge

    many = [(f"X-Stainless-H{n}", "x" * 1000) for n in range(20)]
    with pytest.raises(HeadersTooLarge) as info:
        _upstream(many)
    assert info.value.status == 431 and info.value.message.endswith(".")
    assert len(_upstream(many[:10])) == 13  # within the bound: all of them, and the proxy's own three


@pytest.mark.parametrize(
    "names",
    ["authorization", "x-forwarded-*", "x-*", "cookie", "Host", "bad name", "openai-organization"],
)
def test_forward_headers_setting_refuses_what_must_stay(names: str) -> None:
    from wsgi_proxy.config import ConfigError, ProxySettings

    with pytest.raises(ConfigError, match="WSGI_PROXY_FORWARD_HEADERS is invalid: .* cannot be forwarded"):
        ProxySettings.load({"forward_headers": names})
