"""Client keys in, credentials out."""

from __future__ import annotations

import pytest
from pydantic import SecretStr
from werkzeug.datastructures import Headers

from wsgi_proxy.config import GatewayConfig, ProxySettings
from wsgi_proxy.config.gateway import ANONYMOUS
from wsgi_proxy.errors import AuthenticationFailed
from wsgi_proxy.gateway.auth import Keyring
from wsgi_proxy.upstream.client import UpstreamClient

UPSTREAM_KEY = "sk-UPSTREAM-auth-1"
CLIENT_KEYS = ("sk-client-one-000000", "sk-client-two-000000", "sk-client-three-0000")


def _settings(**extra: str) -> ProxySettings:
    # Keys as an operator writes them: one comma-separated string.
    settings = {"upstream_api_key": UPSTREAM_KEY, "api_keys": ",".join(CLIENT_KEYS), **extra}
    return ProxySettings.model_validate(settings)


def _keyring(settings: ProxySettings | None = None) -> Keyring:
    return Keyring(GatewayConfig.from_settings(settings or _settings()).keys)


def _upstream(settings: ProxySettings) -> UpstreamClient:
    (spec,) = GatewayConfig.from_settings(settings).upstreams
    return UpstreamClient(spec)


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer    ",
        "Basic sk-client-one-000000",
        "Token sk-client-one-000000",
        "sk-client-one-000000",
        "Bearer sk-client-on",
        "Bearer sk-client-one-000000-extra",
        "Bearer SK-CLIENT-ONE-000000",
        f"Bearer {UPSTREAM_KEY}",
        "Bearer sk-client-one-000000,sk-client-two-000000",
        "Bearer \udcff",
    ],
)
def test_authenticate_missing_or_wrong_key_fails(authorization: str | None) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        _keyring().identify(authorization)
    assert info.value.status == 401
    assert info.value.code == "invalid_api_key"
    assert "sk-client" not in info.value.message
    assert info.value.headers()["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer sk-client-one-000000",
        "Bearer sk-client-two-000000",
        "bearer sk-client-three-0000",
        "BEARER sk-client-two-000000 ",
    ],
)
def test_authenticate_right_key_among_several_passes(authorization: str) -> None:
    identity = _keyring().identify(authorization)
    assert identity.team == "default"
    assert identity.key_name == f"key-{1 + [k in authorization for k in CLIENT_KEYS].index(True)}"


@pytest.mark.parametrize("authorization", [None, "", "Basic abc", "Bearer anything"])
def test_authenticate_without_client_keys_accepts_anyone(authorization: str | None) -> None:
    assert _keyring(ProxySettings()).identify(authorization) is ANONYMOUS
    anonymous = ProxySettings(upstream_api_key=SecretStr(UPSTREAM_KEY), allow_anonymous=True)
    assert _keyring(anonymous).identify(authorization) is ANONYMOUS


def test_keyring_keeps_client_keys_only_as_digests() -> None:
    keyring = _keyring()
    assert not any(key in repr(vars(keyring)) for key in CLIENT_KEYS)


def test_upstream_spec_repr_hides_the_key() -> None:
    assert UPSTREAM_KEY not in repr(GatewayConfig.from_settings(_settings()))


def test_upstream_headers_gateway_sends_own_bearer() -> None:
    client = Headers({"Authorization": "Bearer sk-client-one-000000", "api-key": "azure-client"})
    assert _upstream(_settings()).credentials(client) == {"Authorization": f"Bearer {UPSTREAM_KEY}"}


def test_upstream_headers_gateway_sends_organization_and_project() -> None:
    upstream = _upstream(_settings(upstream_organization="org-gw", upstream_project="proj_gw"))
    assert upstream.credentials(Headers({"OpenAI-Organization": "org-client"})) == {
        "Authorization": f"Bearer {UPSTREAM_KEY}",
        "OpenAI-Organization": "org-gw",
        "OpenAI-Project": "proj_gw",
    }


def test_upstream_headers_gateway_returns_a_copy() -> None:
    upstream = _upstream(_settings())
    upstream.credentials(Headers())["Authorization"] = "tampered"
    assert upstream.credentials(Headers())["Authorization"] == f"Bearer {UPSTREAM_KEY}"


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
    upstream = _upstream(ProxySettings(upstream_organization="org-ignored"))
    assert upstream.pass_through
    assert upstream.credentials(Headers(client)) == expected
