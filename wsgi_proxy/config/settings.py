"""Settings: environment variables with the ``WSGI_PROXY_`` prefix, validated once at start-up.

Every setting can also be given as a keyword argument or, for an embedded proxy, as a
``WSGI_PROXY_*`` key of the host app's ``app.config``. A mistake is reported as a
:class:`ConfigError` whose message names the environment variable and says what to do.
"""

from __future__ import annotations

import json
import re
import typing as t
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["ConfigError", "ProxySettings", "ENV_PREFIX"]

ENV_PREFIX = "WSGI_PROXY_"

#: Headers an operator may not add to the forwarded ones: credentials, framing, proxies' own.
_NEVER_FORWARDED = frozenset(
    {
        "authorization", "api-key", "x-api-key", "cookie", "proxy-authorization", "host", "connection",
        "content-length", "transfer-encoding", "upgrade", "te", "trailer", "keep-alive", "expect",
        "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip",
        "openai-organization", "openai-project", "accept-encoding", "",
    }
)  # fmt: skip


def _check_forwardable(name: str) -> None:
    """Refuse a header name (or ``prefix*``) that could forward a credential or framing header."""
    prefix = name[:-1] if name.endswith("*") else None
    covers = [n for n in _NEVER_FORWARDED if n == name or (prefix is not None and n.startswith(prefix))]
    if not re.fullmatch(r"[a-z0-9-]+\*?", name) or covers:
        raise ValueError(
            f"{name!r} cannot be forwarded: name headers by letters, digits and '-' (a trailing '*' for"
            " a prefix), and never a credential, hop-by-hop or forwarding header"
        )


#: The ``/v1`` endpoint families beyond Responses, Conversations and Models that a gateway may serve.
ENDPOINT_FAMILIES = (
    "chat/completions",
    "completions",
    "embeddings",
    "moderations",
    "files",
    "uploads",
    "batches",
    "vector_stores",
    "containers",
    "images",
    "audio",
)
#: Those served unless the operator says otherwise: stateless, routed by their model.
DEFAULT_ENDPOINTS = ("chat/completions", "completions", "embeddings", "moderations")


def check_endpoints(names: t.Iterable[str]) -> tuple[str, ...]:
    """Endpoint family names, checked against :data:`ENDPOINT_FAMILIES`, or ValueError."""
    chosen = tuple(dict.fromkeys(name.strip().strip("/") for name in names if name.strip()))
    unknown = [name for name in chosen if name not in ENDPOINT_FAMILIES]
    if unknown:
        known = ", ".join(ENDPOINT_FAMILIES)
        raise ValueError(f"{unknown[0]!r} is not an endpoint family the proxy serves; choose from {known}")
    return chosen


#: The fewest characters a client key may have (a digest in the file is trusted to hide a long one).
MIN_CLIENT_KEY = 16


class ConfigError(RuntimeError):
    """The configuration is invalid; the message is one sentence naming the setting to fix."""


def check_base_url(value: str) -> str:
    """An upstream base URL, normalised (no trailing slash), or ValueError."""
    value = value.strip().rstrip("/")
    scheme, sep, rest = value.partition("://")
    if scheme not in ("http", "https") or not sep or not rest or any(c in rest for c in "?# "):
        raise ValueError("it must be an http:// or https:// URL without query or fragment")
    if "@" in rest.split("/", 1)[0]:
        # It would be shown in every error about the upstream; keys go in their own settings.
        raise ValueError("it must not hold credentials (user:password@); give the upstream's key as its key")
    return value


def check_api_version(value: str | None) -> str | None:
    """An Azure api-version such as ``2025-04-01-preview``, or ValueError."""
    if value is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        raise ValueError("it must look like 2025-04-01-preview (letters, digits, '.', '_', '-')")
    return value


class ProxySettings(BaseSettings):
    """All settings of one proxy, frozen after validation."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", populate_by_name=True
    )

    config: Path | None = None
    """A TOML file with several upstreams, model routes, teams and keys (see ``configfile.py``).
    With it, the ``WSGI_PROXY_UPSTREAM_*`` and ``WSGI_PROXY_API_KEYS`` variables must be unset."""

    store_url: str | None = None
    """Where shared state lives: ``sqlite:///path.db`` (one host) or ``redis://host:6379/0`` (several
    hosts). With a config file the default is its ``store_url``, else a file in the temporary
    directory; without one, a store that remembers nothing (no usage, no limits to share)."""

    metrics_token: SecretStr | None = None
    """``GET /metrics`` (Prometheus) answers only with ``Authorization: Bearer <token>``; unset: off."""

    upstream_url: str = "https://api.openai.com/v1"
    """Base URL of the upstream Responses API, up to and including its version segment."""

    upstream_kind: t.Literal["openai", "azure", "openai-compatible"] = "openai"
    """``openai`` and ``openai-compatible`` authenticate with ``Authorization: Bearer``; ``azure``
    with the ``api-key`` header."""

    upstream_api_version: str | None = None
    """Azure's legacy API (``.../openai`` with ``?api-version=``): merged into every upstream query,
    stream resume included. Leave unset for Azure's v1 API (``.../openai/v1``)."""

    upstream_headers: dict[str, str] = {}
    """Extra headers sent upstream with every request, as a JSON object (vendor-specific needs)."""

    forward_headers: t.Annotated[tuple[str, ...], NoDecode] = ()
    """Client request headers to forward upstream besides the SDKs' and Codex's own (comma-separated
    names; ``x-vendor-*`` matches a prefix). Credentials and hop-by-hop headers are never forwarded."""

    upstream_websockets: t.Literal["native", "off"] | None = None
    """Whether the upstream serves the Responses API's WebSocket mode: ``native`` relays client
    sockets to it, ``off`` answers upgrades with a 426 (clients use HTTP). Unset: ``native`` for
    ``openai``, ``off`` for the other kinds."""
    upstream_api_key: SecretStr | None = Field(
        default=None,
        # Not the bare field name: pydantic-settings would read it as an unprefixed UPSTREAM_API_KEY
        # variable. Keyword arguments still work through populate_by_name.
        validation_alias=AliasChoices("WSGI_PROXY_UPSTREAM_API_KEY", "OPENAI_API_KEY"),
    )
    """The key the gateway sends upstream. Unset: pass-through mode (the client's own key goes upstream)."""

    api_keys: t.Annotated[tuple[SecretStr, ...], NoDecode] = ()
    """Client keys the proxy accepts as ``Authorization: Bearer <key>`` (comma-separated)."""

    allow_anonymous: bool = False
    """With an upstream key but no client keys, serve anyone. Off unless set deliberately."""

    upstream_organization: str | None = None
    """Sent upstream as ``OpenAI-Organization``
    (clients' own values are dropped when the gateway holds a key)."""

    upstream_project: str | None = None
    """Sent upstream as ``OpenAI-Project``."""

    connect_timeout: float = Field(default=5.0, gt=0)
    """Seconds to wait for a TCP/TLS connection to the upstream."""

    read_timeout: float = Field(default=600.0, gt=0)
    """Seconds of upstream silence tolerated (reasoning models are silent for minutes)."""

    upstream_ca_bundle: Path | None = None
    """A CA bundle for the upstream's TLS certificate; the system store is used when unset."""

    pool_size: int = Field(default=1000, ge=1)
    """Upstream connections kept open per worker process; keep it at or above gunicorn's ``threads``."""

    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Largest request body accepted (413 above it)."""

    max_upload_bytes: int = Field(default=512 * 1024 * 1024, ge=1024)
    """Largest file upload accepted (``POST /files``, 413 above it): streamed upstream as it arrives,
    never held in memory. OpenAI's own limit is 512 MB."""
    max_answer_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Largest whole (JSON) upstream answer relayed, decoded; a larger one is a 502 instead of a
    worker's memory. Error bodies answering a stream request are bounded at 1 MiB."""

    max_event_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Largest single SSE event relayed; a larger one aborts the stream instead of exhausting memory."""

    watch_disconnects: bool = True
    """Watch client sockets so a gone client frees its thread and upstream connection at once."""

    keepalive_interval: float = Field(default=15.0, ge=0)
    """Seconds of upstream silence before a ``: keep-alive`` comment is sent (0: never)."""

    send_timeout: float = Field(default=60.0, gt=0)
    """Seconds one write to a client may take; a client that stops reading is then disconnected."""

    resume_attempts: int = Field(default=5, ge=0)
    """Attempts to re-open a broken background stream, per break (0: abort at once)."""

    resume_backoff: float = Field(default=0.25, ge=0)
    """Seconds before the first resume attempt; doubled per attempt, with jitter."""

    resume_backoff_max: float = Field(default=4.0, ge=0)
    """The longest wait between resume attempts."""

    stream_lease_ttl: float = Field(default=60.0, ge=3)
    """Seconds a stream's concurrency slot (``max_streams``) is held without a refresh. Open streams
    refresh theirs every third of it, so the slots of a crashed worker are free again this soon."""

    websockets: bool = True
    """Serve the Responses API's WebSocket mode (``GET /v1/responses`` with ``Upgrade: websocket``)
    where the upstream has it; false: every upgrade gets a JSON 426, on which clients use HTTP."""
    websocket_max_age: float = Field(default=3600.0, gt=0)
    """Seconds a client WebSocket connection may live (OpenAI's own limit is 60 minutes); then it gets
    a ``websocket_connection_limit_reached`` error and a 1001 close, once its responses have ended."""
    websocket_ping_interval: float = Field(default=20.0, ge=0)
    """Seconds of silence on a WebSocket before the proxy pings; a peer that does not answer within
    as long again is taken for gone (0: never ping)."""
    endpoints: t.Annotated[tuple[str, ...], NoDecode] = DEFAULT_ENDPOINTS
    """The ``/v1`` endpoint families served besides Responses, Conversations and Models (comma-separated;
    empty: none); a team of the file may be narrowed further with its own ``endpoints``."""
    key_cache_ttl: float = Field(default=2.0, ge=0, le=60)
    """Seconds a worker trusts what it read of a key kept in the store (``keys_in_store``): a revoked
    key is refused everywhere within this; 0 reads the store on every request."""
    affinity_ttl: float = Field(default=3600.0, ge=0)
    """Seconds a session stays pinned to the upstream that last served it (0: no pins). A session is
    a team's ``prompt_cache_key``, or Codex's ``Session-Id``; pins apply where a model has several routes."""
    retry_attempts: int = Field(default=2, ge=0)
    """Extra attempts for a request that failed where a retry is safe (see the README)."""

    retry_max_wait: float = Field(default=8.0, ge=0)
    """The longest wait before a retry; a longer ``Retry-After`` is relayed to the client instead."""

    _check_url = field_validator("upstream_url")(check_base_url)
    _check_api_version = field_validator("upstream_api_version")(check_api_version)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            if value.lstrip().startswith("["):  # a JSON list, as pydantic-settings users may write it
                try:
                    return tuple(json.loads(value))
                except ValueError:
                    raise ValueError("it looks like a JSON list but is not valid JSON") from None
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("forward_headers", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, (tuple, list)):
            names = tuple(str(name).lower() for name in value)
            for name in names:
                _check_forwardable(name)
            return names
        return value

    @field_validator("endpoints", mode="before")
    @classmethod
    def _split_endpoints(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.split(",")
        return check_endpoints(t.cast(t.Iterable[str], value)) if isinstance(value, (tuple, list)) else value

    @field_validator("upstream_api_key", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        if isinstance(value, str):
            # A key read from a file often ends in a newline, which no upstream would accept.
            return value.strip() or None
        return value

    @field_validator("api_keys")
    @classmethod
    def _long_enough(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        short = [n for n, key in enumerate(value, start=1) if len(key.get_secret_value()) < MIN_CLIENT_KEY]
        if short:
            raise ValueError(
                f"key {short[0]} has fewer than {MIN_CLIENT_KEY} characters, so it could be guessed;"
                " generate keys with: openssl rand -hex 24"
            )
        secrets = [key.get_secret_value() for key in value]
        if len(set(secrets)) != len(secrets):
            raise ValueError("the same key is given twice; give each client its own")
        return value

    @model_validator(mode="after")
    def _check_auth_mode(self) -> ProxySettings:
        if self.config is not None:
            single = sorted(
                f
                for f in self.model_fields_set
                if f.startswith("upstream_")
                or f in ("api_keys", "allow_anonymous", "connect_timeout", "read_timeout")
            )
            if single:
                names = ", ".join(ENV_PREFIX + f.upper() for f in single)
                raise ValueError(
                    f"WSGI_PROXY_CONFIG is set, so {names} would be ignored: put the upstreams and keys"
                    " (and each upstream's connect_timeout and read_timeout) in the file and unset these"
                    " variables."
                )
            return self
        if self.upstream_api_version is not None and self.upstream_kind != "azure":
            raise ValueError(
                "WSGI_PROXY_UPSTREAM_API_VERSION is only for Azure's legacy API: set"
                " WSGI_PROXY_UPSTREAM_KIND=azure too, or unset the API version."
            )
        if self.upstream_api_key is None and self.api_keys:
            raise ValueError(
                "WSGI_PROXY_API_KEYS is set but no upstream key is, so there is nothing to authenticate"
                " clients for: set WSGI_PROXY_UPSTREAM_API_KEY (or OPENAI_API_KEY), or unset"
                " WSGI_PROXY_API_KEYS to run as a transparent pass-through."
            )
        if self.upstream_api_key is not None and not self.api_keys and not self.allow_anonymous:
            raise ValueError(
                "An upstream key is configured but WSGI_PROXY_API_KEYS is empty, so anyone who can reach"
                " the proxy could spend on that key: set WSGI_PROXY_API_KEYS=key1,key2 (the keys your"
                " clients will send), or set WSGI_PROXY_ALLOW_ANONYMOUS=true to allow this deliberately."
            )
        return self

    @property
    def pass_through(self) -> bool:
        """True when the proxy holds no key of its own and forwards each client's credentials."""
        return self.upstream_api_key is None

    @classmethod
    def load(cls, overrides: t.Mapping[str, t.Any] | None = None) -> ProxySettings:
        """Build settings from the environment plus ``overrides``, or raise :class:`ConfigError`.

        ``overrides`` may use field names (``read_timeout``) or ``WSGI_PROXY_*`` names, so a Flask
        ``app.config`` can be passed as it is; other keys are ignored.
        """
        values: dict[str, t.Any] = {}
        for key, value in (overrides or {}).items():
            name = key[len(ENV_PREFIX) :].lower() if key.startswith(ENV_PREFIX) else key
            if name in cls.model_fields:
                values[name] = value
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    """One sentence for the first problem, naming the environment variable to fix."""
    first = exc.errors(include_url=False, include_input=False)[0]
    loc = [str(part) for part in first["loc"]]
    message = str(first["msg"]).removeprefix("Value error, ")
    if not loc:
        return message
    name = loc[0]
    if name in ("upstream_api_key", "WSGI_PROXY_UPSTREAM_API_KEY", "OPENAI_API_KEY"):
        name = "upstream_api_key"
    env = ENV_PREFIX + name.upper()
    return f"{env} is invalid: {message}. Fix the value of {env} and start again."
