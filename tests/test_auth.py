"""Client keys in, credentials out."""

from __future__ import annotations

import pytest
from pydantic import SecretStr
from werkzeug.datastructures import Headers

from wsgi_proxy.auth import Credentials
from wsgi_proxy.config import ProxySettings
from wsgi_proxy.errors import AuthenticationFailed

UPSTREAM_KEY = "sk-UPSTREAM-auth-1"
CLIENT_KEYS = ("sk-client-one", "sk-client-two", "sk-client-three")


def _gateway(**extra: str) -> Credentials:
    # Keys as an operator writes them: one comma-separated string.
    settings = {"upstream_api_key": UPSTREAM_KEY, "api_keys": ",".join(CLIENT_KEYS), **extra}
    return Credentials(ProxySettings.model_validate(settings))


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer    ",
        "Basic sk-client-one",
        "Token sk-client-one",
        "sk-client-one",
        "Bearer sk-client-on",
        "Bearer sk-client-one-extra",
        "Bearer SK-CLIENT-ONE",
        f"Bearer {UPSTREAM_KEY}",
        "Bearer sk-client-one,sk-client-two",
        "Bearer \udcff",
    ],
)
def test_authenticate_missing_or_wrong_key_fails(authorization: str | None) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        _gateway().authenticate(authorization)
    assert info.value.status == 401
    assert info.value.code == "invalid_api_key"
    assert "sk-client" not in info.value.message
    assert info.value.headers()["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "authorization",
    ["Bearer sk-client-one", "Bearer sk-client-two", "bearer sk-client-three", "BEARER sk-client-two "],
)
def test_authenticate_right_key_among_several_passes(authorization: str) -> None:
    _gateway().authenticate(authorization)


@pytest.mark.parametrize("authorization", [None, "", "Basic abc", "Bearer anything"])
def test_authenticate_without_client_keys_accepts_anyone(authorization: str | None) -> None:
    Credentials(ProxySettings()).authenticate(authorization)
    Credentials(ProxySettings(upstream_api_key=SecretStr(UPSTREAM_KEY), allow_anonymous=True)).authenticate(
        authorization
    )


def test_credentials_keep_client_keys_only_as_digests() -> None:
    credentials = _gateway()
    assert not any(key in repr(vars(credentials)) for key in CLIENT_KEYS)


def test_upstream_headers_gateway_sends_own_bearer() -> None:
    client = Headers({"Authorization": "Bearer sk-client-one", "api-key": "azure-client"})
    assert _gateway().upstream_headers(client) == {"Authorization": f"Bearer {UPSTREAM_KEY}"}


def test_upstream_headers_gateway_sends_organization_and_project() -> None:
    credentials = _gateway(upstream_organization="org-gw", upstream_project="proj_gw")
    assert credentials.upstream_headers(Headers({"OpenAI-Organization": "org-client"})) == {
        "Authorization": f"Bearer {UPSTREAM_KEY}",
        "OpenAI-Organization": "org-gw",
        "OpenAI-Project": "proj_gw",
    }


def test_upstream_headers_gateway_returns_a_copy() -> None:
    credentials = _gateway()
    credentials.upstream_headers(Headers())["Authorization"] = "tampered"
    assert credentials.upstream_headers(Headers())["Authorization"] == f"Bearer {UPSTREAM_KEY}"


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        ({"Authorization": "Bearer sk-own"}, {"Authorization": "Bearer sk-own"}),
        ({"authorization": "Bearer sk-own"}, {"Authorization": "Bearer sk-own"}),
        ({"api-key": "azure-own"}, {"api-key": "azure-own"}),
        (
            {"Authorization": "Bearer sk-own", "Api-Key": "azure-own", "Cookie": "x"},
            {"Authorization": "Bearer sk-own", "api-key": "azure-own"},
        ),
        ({}, {}),
    ],
)
def test_upstream_headers_pass_through_forwards_client_credentials(
    client: dict[str, str], expected: dict[str, str]
) -> None:
    credentials = Credentials(ProxySettings(upstream_organization="org-ignored"))
    assert credentials.pass_through
    assert credentials.upstream_headers(Headers(client)) == expected
