"""Client authentication: which key (and so which team and limits) a request comes with."""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import typing as t
from dataclasses import dataclass

from .config import ProxySettings
from .errors import AuthenticationFailed

if t.TYPE_CHECKING:  # pragma: no cover
    from .configfile import FileConfig

__all__ = ["ANONYMOUS", "Identity", "Keyring"]


def _digest(value: str) -> bytes:
    # Comparing fixed-size digests keeps the comparison's time independent of the key's length.
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True)
class Identity:
    """Who is calling: the key's name and team, the models it may use, and the limits that apply.

    ``models`` holds one tuple of ``fnmatch`` patterns per level (team, key); a model must match
    every level. ``rpm`` and ``max_streams`` are ``(counter name, limit)`` pairs, all enforced.
    """

    key_name: str | None
    team: str | None
    models: tuple[tuple[str, ...], ...] = ()
    rpm: tuple[tuple[str, int], ...] = ()
    max_streams: tuple[tuple[str, int], ...] = ()

    def may_use(self, model: str) -> bool:
        return all(any(fnmatch.fnmatchcase(model, p) for p in patterns) for patterns in self.models)


#: The caller when no client keys are configured (pass-through or deliberate anonymous use).
ANONYMOUS = Identity(key_name=None, team=None)


class Keyring:
    """The configured client keys, kept only as SHA-256 digests, and the identity of each."""

    def __init__(self, entries: t.Sequence[tuple[bytes, Identity]]) -> None:
        self._entries = tuple(entries)

    @property
    def required(self) -> bool:
        return bool(self._entries)

    @classmethod
    def from_settings(cls, settings: ProxySettings) -> Keyring:
        """The ``WSGI_PROXY_API_KEYS`` keys: one team, no limits."""
        return cls(
            [
                (_digest(key.get_secret_value()), Identity(key_name=f"key-{n}", team="default"))
                for n, key in enumerate(settings.api_keys, start=1)
            ]
        )

    @classmethod
    def from_file(cls, config: FileConfig, environ: t.Mapping[str, str]) -> Keyring:
        """The file's ``[[keys]]``, with their team's and their own model lists and limits."""
        entries = []
        for key in config.keys:
            team = config.teams[key.team]
            digest = (
                bytes.fromhex(key.sha256)
                if key.sha256
                else _digest(environ[t.cast(str, key.key_env)].strip())
            )
            identity = Identity(
                key_name=key.name,
                team=key.team,
                models=tuple(m for m in (team.models, key.models) if m is not None),
                rpm=tuple(
                    (counter, limit)
                    for counter, limit in ((f"team:{key.team}", team.rpm), (f"key:{key.name}", key.rpm))
                    if limit is not None
                ),
                max_streams=tuple(
                    (counter, limit)
                    for counter, limit in (
                        (f"team:{key.team}", team.max_streams),
                        (f"key:{key.name}", key.max_streams),
                    )
                    if limit is not None
                ),
            )
            entries.append((digest, identity))
        return cls(entries)

    def identify(self, authorization: str | None) -> Identity:
        """The identity of the request's ``Authorization: Bearer`` key, or :class:`AuthenticationFailed`."""
        if not self._entries:
            return ANONYMOUS
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationFailed(
                "You didn't provide an API key. Send your proxy key as 'Authorization: Bearer <key>'"
                " (the OpenAI SDK does this with api_key=...)."
            )
        given = _digest(key.strip())
        found = None
        for digest, identity in self._entries:  # no early exit: every key is compared
            if hmac.compare_digest(given, digest):
                found = identity
        if found is None:
            raise AuthenticationFailed(
                "Incorrect API key provided. Use one of the keys configured in the proxy; ask the"
                " proxy's operator for one."
            )
        return found
