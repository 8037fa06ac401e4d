"""The gateway's configuration file (``WSGI_PROXY_CONFIG``): upstreams, model routes, teams, keys.

TOML, because Python reads it with the standard library (no YAML parser to depend on), it has
comments, and its types are unambiguous (no ``no`` turning into ``false``). Secrets never sit in
the file: upstream keys and client keys are named by the environment variable that holds them
(``api_key_env``, ``key_env``), or a client key is given only as its SHA-256 digest. Every mistake
is one :class:`~wsgi_proxy.config.ConfigError` sentence naming the key to fix.

.. code-block:: toml

    [[upstreams]]
    name = "openai"
    url = "https://api.openai.com/v1"
    api_key_env = "OPENAI_API_KEY"

    [[upstreams]]
    name = "azure-eu"
    kind = "azure"
    url = "https://my-resource.openai.azure.com/openai/v1"
    api_key_env = "AZURE_OPENAI_KEY"

    [[models]]
    name = "gpt-4o-mini"
    routes = [{ upstream = "openai", weight = 3 }, { upstream = "azure-eu", deployment = "mini-prod" }]

    [teams.research]
    models = ["gpt-4o*"]
    rpm = 600
    max_streams = 50

    [[keys]]
    name = "alice"
    team = "research"
    sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

    [prices."ft:gpt-4o-mini:acme"]     # USD per million tokens, over the dated defaults
    input = 0.30
    cached_input = 0.15
    output = 1.20
"""

from __future__ import annotations

import os
import re
import tomllib
import typing as t
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .prices import ModelPrice
from .settings import ConfigError, check_api_version, check_base_url, check_endpoints

__all__ = [
    "FileConfig",
    "KeyEntry",
    "KeyLimits",
    "ModelEntry",
    "Route",
    "TeamEntry",
    "UpstreamEntry",
    "load_config_file",
]

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError("it must be 1 to 64 letters, digits, '_', '.' or '-'")
    return value


def _env_name(value: str | None) -> str | None:
    if value is not None and not _ENV.fullmatch(value):
        raise ValueError("it must be the name of an environment variable, such as OPENAI_API_KEY")
    return value


class UpstreamEntry(_Strict):
    """One upstream account or server."""

    name: str
    kind: t.Literal["openai", "azure", "openai-compatible"] = "openai"
    url: str
    api_key_env: str | None = None
    api_version: str | None = None
    organization: str | None = None
    project: str | None = None
    headers: dict[str, str] = {}
    connect_timeout: float = Field(default=5.0, gt=0)
    read_timeout: float = Field(default=600.0, gt=0)
    websockets: t.Literal["native", "off"] | None = None
    prices: dict[str, ModelPrice] = {}
    #: The variable holding the signing secret of this upstream's webhooks (``whsec_...``).
    webhook_secret_env: str | None = None

    _check_name = field_validator("name")(_name)
    _check_env = field_validator("api_key_env", "webhook_secret_env")(_env_name)

    _check_url = field_validator("url")(check_base_url)
    _check_api_version = field_validator("api_version")(check_api_version)

    @model_validator(mode="after")
    def _version_is_azure(self) -> UpstreamEntry:
        if self.api_version is not None and self.kind != "azure":
            raise ValueError('api_version is only for kind = "azure" (Azure\'s legacy API)')
        return self


class Route(_Strict):
    """Where a model may go: an upstream, its share of the traffic, and the name it has there."""

    upstream: str
    weight: float = Field(default=1.0, gt=0)
    deployment: str | None = None


class ModelEntry(_Strict):
    """A public model name (or ``fnmatch`` pattern such as ``gpt-4o*``) and its routes, in order."""

    name: str
    upstream: str | None = None
    routes: tuple[Route, ...] = ()

    @model_validator(mode="after")
    def _one_form(self) -> ModelEntry:
        if (self.upstream is None) == (not self.routes):
            raise ValueError('give either upstream = "name" or routes = [...], not both and not neither')
        return self

    @property
    def all_routes(self) -> tuple[Route, ...]:
        return self.routes or (Route(upstream=t.cast(str, self.upstream)),)


class _Limits(_Strict):
    models: tuple[str, ...] | None = None
    rpm: int | None = Field(default=None, ge=1)
    max_streams: int | None = Field(default=None, ge=1)
    #: Tokens per minute, and token and cost (US dollars) budgets per UTC day and month.
    tpm: int | None = Field(default=None, ge=1)
    tokens_per_day: int | None = Field(default=None, ge=1)
    tokens_per_month: int | None = Field(default=None, ge=1)
    usd_per_day: float | None = Field(default=None, gt=0)
    usd_per_month: float | None = Field(default=None, gt=0)


class KeyLimits(_Limits):
    """A key's own models, limits and budgets, narrower than its team's (a stored key's, as JSON)."""


class _WebhookDestination(_Strict):
    webhook_url: str | None = None
    webhook_secret_env: str | None = None

    _check_env = field_validator("webhook_secret_env")(_env_name)

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
            raise ValueError("it must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _both_or_neither(self) -> t.Self:
        if (self.webhook_url is None) != (self.webhook_secret_env is None):
            raise ValueError(
                "give webhook_url and webhook_secret_env together (the secret signs what goes there)"
            )
        return self


class TeamEntry(_Limits, _WebhookDestination):
    """A team: the models and endpoint families its keys may use, limits counted over all its keys,
    and where its webhooks go."""

    endpoints: tuple[str, ...] | None = None

    @field_validator("endpoints")
    @classmethod
    def _known_endpoints(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if value is None else check_endpoints(value)


class KeyEntry(_Limits):
    """A client key: named, in a team, with optional narrower limits of its own."""

    name: str
    team: str
    key_env: str | None = None
    sha256: str | None = None

    _check_name = field_validator("name")(_name)
    _check_env = field_validator("key_env")(_env_name)

    @field_validator("sha256")
    @classmethod
    def _check_digest(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("it must be 64 lowercase hex digits (sha256sum of the key)")
        return value

    @model_validator(mode="after")
    def _one_secret(self) -> KeyEntry:
        if (self.key_env is None) == (self.sha256 is None):
            raise ValueError(
                "give either key_env (a variable holding the key) or sha256 (its digest), not both"
            )
        return self


class FileConfig(_Strict):
    """The whole file, cross-checked: every name it refers to exists."""

    upstreams: tuple[UpstreamEntry, ...] = Field(min_length=1)
    models: tuple[ModelEntry, ...] = ()
    teams: dict[str, TeamEntry] = {}
    keys: tuple[KeyEntry, ...] = ()
    unknown_ids: t.Literal["auto", "forward", "reject"] = "auto"
    response_ttl_days: float = Field(default=30.0, gt=0)
    store_url: str | None = None
    allow_anonymous: bool = False
    keys_in_store: bool = False
    prices: dict[str, ModelPrice] = {}
    #: Where webhooks about objects no team is known to own go (and the secret that signs them).
    operator_webhook: _WebhookDestination = _WebhookDestination()

    @model_validator(mode="after")
    def _cross_check(self) -> FileConfig:
        names = [u.name for u in self.upstreams]
        if len(set(names)) != len(names):
            raise ValueError(f"upstream names must be unique; found {names}")
        for model in self.models:
            for route in model.all_routes:
                if route.upstream not in names:
                    raise ValueError(
                        f"model {model.name!r} routes to unknown upstream {route.upstream!r}; known: {names}"
                    )
        for team in self.teams:
            _name(team)
        key_names = [k.name for k in self.keys]
        if len(set(key_names)) != len(key_names):
            raise ValueError(f"key names must be unique; found {key_names}")
        for key in self.keys:
            if key.team not in self.teams:
                raise ValueError(f"key {key.name!r} is in unknown team {key.team!r}; add [teams.{key.team}]")
        keyless = [u.name for u in self.upstreams if u.api_key_env is None]
        if self.keys and keyless:
            # Without a key of its own the gateway would pass the client's Authorization on, and
            # with [[keys]] that is the client's proxy key: it must never leave the gateway.
            raise ValueError(
                f"upstream {keyless[0]!r} has no api_key_env, but the file defines [[keys]], so the"
                " gateway authenticates clients itself and must hold every upstream's key: add api_key_env"
            )
        if self.unknown_ids == "forward" and len(self.teams) > 1:
            raise ValueError(
                'unknown_ids = "forward" sends ids the store does not know to the first upstream, so with'
                f" {len(self.teams)} teams one team could reach another's responses whenever a record is"
                ' missing: use "auto" or "reject"'
            )
        if not self.keys and not self.keys_in_store and not self.allow_anonymous:
            raise ValueError(
                "the file defines no [[keys]], so anyone who can reach the proxy could spend on its upstream"
                " keys: add [[keys]] entries, set keys_in_store = true to use keys made with wsgi-proxy"
                " keys, or set allow_anonymous = true to allow this deliberately"
            )
        keyless = [u.name for u in self.upstreams if u.api_key_env is None]
        if self.keys_in_store and keyless:
            raise ValueError(
                f"upstream {keyless[0]!r} has no api_key_env, but keys_in_store = true makes the gateway"
                " authenticate clients itself, so it must hold every upstream's key: add api_key_env"
            )
        if self.keys_in_store and self.allow_anonymous:
            raise ValueError(
                "keys_in_store = true and allow_anonymous = true contradict each other: choose one"
            )
        return self


def _where(loc: tuple[int | str, ...], raw: t.Mapping[str, t.Any]) -> str:
    """``upstreams[1] (name 'azure').kind`` from a pydantic location."""
    out = ""
    node: t.Any = raw
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            try:
                node = node[part]
                if isinstance(node, dict) and "name" in node:
                    out += f" (name {node['name']!r})"
            except (IndexError, KeyError, TypeError):
                node = None
        else:
            out += f".{part}" if out else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return out


def load_config_file(path: str | Path, environ: t.Mapping[str, str] | None = None) -> FileConfig:
    """Read, validate and cross-check the file, or raise :class:`ConfigError` with one sentence.

    Environment variables named by ``api_key_env`` and ``key_env`` must be set.
    """
    environ = os.environ if environ is None else environ
    where = f"The configuration file {str(path)!r}"
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{where} could not be read ({exc.strerror}); check WSGI_PROXY_CONFIG.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where} is not valid TOML: {exc}. Fix the file and start again.") from None
    try:
        config = FileConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        message = str(first["msg"]).removeprefix("Value error, ")
        location = _where(tuple(first["loc"]), raw)
        place = f" at {location}" if location else ""
        raise ConfigError(f"{where} is invalid{place}: {message}. Fix the file and start again.") from None
    for index, upstream in enumerate(config.upstreams):
        _require_env(
            environ, upstream.api_key_env, f"upstreams[{index}] (name {upstream.name!r}).api_key_env", where
        )
    for index, key in enumerate(config.keys):
        _require_env(environ, key.key_env, f"keys[{index}] (name {key.name!r}).key_env", where)
    for index, upstream in enumerate(config.upstreams):
        place = f"upstreams[{index}] (name {upstream.name!r}).webhook_secret_env"
        _require_env(environ, upstream.webhook_secret_env, place, where)
    for name, team in config.teams.items():
        _require_env(environ, team.webhook_secret_env, f"teams.{name}.webhook_secret_env", where)
    _require_env(
        environ, config.operator_webhook.webhook_secret_env, "operator_webhook.webhook_secret_env", where
    )
    return config


def _require_env(environ: t.Mapping[str, str], name: str | None, key: str, where: str) -> None:
    if name is not None and not environ.get(name, "").strip():
        raise ConfigError(
            f"{where} names the environment variable {name} at {key}, but it is not set: export it,"
            " or change the file."
        )
