"""Client authentication: which key (and so which team and limits) a request comes with."""

from __future__ import annotations

import hmac
import typing as t

from ..config.gateway import ANONYMOUS, ClientKey, Identity, key_digest
from ..errors import AuthenticationFailed
from .keys import StoredKeys

__all__ = ["Keyring"]


class Keyring:
    """The configured client keys, kept only as SHA-256 digests, and the identity of each; and the
    keys kept in the store, when the configuration accepts them (``stored``)."""

    def __init__(self, keys: t.Sequence[ClientKey], stored: StoredKeys | None = None) -> None:
        self._keys = tuple(keys)
        self._stored = stored

    def identify(self, authorization: str | None) -> Identity:
        """The identity of the request's ``Authorization: Bearer`` key, or :class:`AuthenticationFailed`."""
        if not self._keys and self._stored is None:
            return ANONYMOUS
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationFailed(
                "You didn't provide an API key. Send your proxy key as 'Authorization: Bearer <key>'"
                " (the OpenAI SDK does this with api_key=...)."
            )
        given = key_digest(key.strip())
        found = None
        for entry in self._keys:  # no early exit: every key is compared
            if hmac.compare_digest(given, entry.digest):
                found = entry.identity
        if found is None and self._stored is not None:
            found = self._stored.identity(given)
        if found is None:
            raise AuthenticationFailed(
                "Incorrect API key provided. Use one of the keys configured in the proxy; ask the"
                " proxy's operator for one."
            )
        return found
