"""Client authentication and the credentials the proxy presents upstream."""

from __future__ import annotations

import hashlib
import hmac
import typing as t

from .config import ProxySettings
from .errors import AuthenticationFailed

__all__ = ["Credentials"]


def _digest(value: str) -> bytes:
    # Comparing fixed-size digests keeps the comparison's time independent of the key's length.
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class Credentials:
    """Checks client keys and builds the upstream's authentication headers for one proxy.

    :param settings: the proxy's settings; keys are read once and kept only as digests
        (the upstream key is kept as given, since it has to be sent).
    """

    def __init__(self, settings: ProxySettings) -> None:
        self.pass_through = settings.pass_through
        self._client_digests = tuple(_digest(k.get_secret_value()) for k in settings.api_keys)
        self._require_client_key = bool(self._client_digests)
        gateway: dict[str, str] = {}
        if settings.upstream_api_key is not None:
            key = settings.upstream_api_key.get_secret_value()
            if settings.upstream_kind == "azure":
                gateway["api-key"] = key
            else:
                gateway["Authorization"] = "Bearer " + key
            if settings.upstream_organization:
                gateway["OpenAI-Organization"] = settings.upstream_organization
            if settings.upstream_project:
                gateway["OpenAI-Project"] = settings.upstream_project
        self._gateway_headers = gateway

    def authenticate(self, authorization: str | None) -> None:
        """Accept the request's ``Authorization`` header or raise :class:`AuthenticationFailed`."""
        if not self._require_client_key:
            return
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationFailed(
                "You didn't provide an API key. Send your proxy key as 'Authorization: Bearer <key>'"
                " (the OpenAI SDK does this with api_key=...)."
            )
        given = _digest(key.strip())
        matched = False
        for digest in self._client_digests:  # no early exit: every key is compared
            matched |= hmac.compare_digest(given, digest)
        if not matched:
            raise AuthenticationFailed(
                "Incorrect API key provided. Use one of the keys configured in the proxy's"
                " WSGI_PROXY_API_KEYS; ask the proxy's operator for one."
            )

    def upstream_headers(self, client_headers: t.Any) -> dict[str, str]:
        """Headers that authenticate a request upstream: the gateway's, or the client's own."""
        if not self.pass_through:
            return dict(self._gateway_headers)
        own = {}
        for name in ("Authorization", "api-key"):
            value = client_headers.get(name)
            if value is not None:
                own[name] = value
        return own
