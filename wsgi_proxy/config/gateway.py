"""The one shape of a gateway's configuration, whichever source it came from.

The ``WSGI_PROXY_UPSTREAM_*`` and ``WSGI_PROXY_API_KEYS`` variables describe a gateway with one
upstream and one team; a ``WSGI_PROXY_CONFIG`` file describes several of each. Both become the
same :class:`GatewayConfig` here, so that start-up, routing, tenancy and the store have one path.
Secrets are resolved here (upstream keys read from the variables the file names, client keys
reduced to digests) and nowhere else.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
import tempfile
import typing as t
from dataclasses import dataclass, field

from ..wire.webhooks import sign
from .file import FileConfig, KeyEntry, KeyLimits, ModelEntry, TeamEntry, load_config_file
from .prices import DEFAULT_PRICES, PriceTable
from .settings import MIN_CLIENT_KEY, ConfigError, ProxySettings

__all__ = [
    "ANONYMOUS",
    "BUDGET_KINDS",
    "Budget",
    "BudgetKind",
    "ClientKey",
    "GatewayConfig",
    "Identity",
    "UpstreamSpec",
    "WebhookDestination",
    "Webhooks",
    "default_store_url",
    "identity_of",
    "key_digest",
]

#: The team of every key given by ``WSGI_PROXY_API_KEYS``.
DEFAULT_TEAM = "default"


def key_digest(value: str) -> bytes:
    """The SHA-256 digest a client key is kept and compared as."""
    # Comparing fixed-size digests keeps the comparison's time independent of the key's length.
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def default_store_url() -> str:
    """The SQLite file a config-file gateway uses when no store is named: one per host and user, in a
    directory of that user's alone (see :func:`make_default_store_dir`)."""
    return "sqlite:///" + os.path.join(_default_store_dir(), "state.db")


def _default_store_dir() -> str:
    return os.path.join(tempfile.gettempdir(), f"wsgi-proxy-{os.getuid()}")


def make_default_store_dir() -> None:
    """Create the default store's directory, readable by this user only, or refuse one that is not.

    The temporary directory is shared by every user of the host, so the directory must be this
    user's own and closed to others: the store holds who owns which response.
    """
    path = _default_store_dir()
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ConfigError(
            f"The default store's directory {path} is not a directory of this user's alone (mode 700):"
            " remove it, or name a store with WSGI_PROXY_STORE_URL or store_url in the file."
        )


@dataclass(frozen=True)
class UpstreamSpec:
    """One upstream: where it is, how to authenticate to it, and how long to wait for it."""

    name: str
    url: str
    kind: str = "openai"
    api_key: str | None = field(default=None, repr=False)
    api_version: str | None = None
    organization: str | None = None
    project: str | None = None
    headers: t.Mapping[str, str] = field(default_factory=dict)
    connect_timeout: float = 5.0
    read_timeout: float = 600.0
    websockets: t.Literal["native", "off"] = "native"
    """``native``: client WebSocket connections are relayed to the upstream's own; ``off``: a 426."""


def websockets_mode(kind: str, chosen: t.Literal["native", "off"] | None) -> t.Literal["native", "off"]:
    """An upstream's WebSocket mode: as configured, else ``native`` for OpenAI itself only (Azure and
    compatible servers may not serve it, and a 426 makes every client fall back to HTTP at once)."""
    if chosen is not None:
        return chosen
    return "native" if kind == "openai" else "off"


#: The budgets a team or key may have, as the configuration names them.
BudgetKind = t.Literal["tpm", "tokens_per_day", "tokens_per_month", "usd_per_day", "usd_per_month"]
BUDGET_KINDS: tuple[BudgetKind, ...] = t.get_args(BudgetKind)


@dataclass(frozen=True)
class Budget:
    """One budget of a team or key: ``counter`` names whose spend it limits (``key:alice``,
    ``team:research``); ``limit`` is in tokens, or in nano-dollars for the ``usd_*`` kinds."""

    counter: str
    kind: BudgetKind
    limit: int


@dataclass(frozen=True)
class Identity:
    """Who is calling: the key's name and team, the models it may use, and the limits that apply.

    ``models`` holds one tuple of ``fnmatch`` patterns per level (team, key); a model must match
    every level. ``rpm`` and ``max_streams`` are ``(counter name, limit)`` pairs, all enforced.
    ``endpoints`` narrows the gateway's endpoint families for this team (None: all of them).
    ``budgets`` are the team's and the key's token and cost budgets, all enforced.
    """

    key_name: str | None
    team: str | None
    models: tuple[tuple[str, ...], ...] = ()
    rpm: tuple[tuple[str, int], ...] = ()
    max_streams: tuple[tuple[str, int], ...] = ()
    endpoints: tuple[str, ...] | None = None
    budgets: tuple[Budget, ...] = ()

    @property
    def charges(self) -> tuple[str, ...]:
        """The budget counters a response of this caller's is charged to."""
        return tuple(dict.fromkeys(budget.counter for budget in self.budgets))

    def may_use(self, model: str) -> bool:
        return all(any(fnmatch.fnmatchcase(model, p) for p in patterns) for patterns in self.models)


#: The caller when no client keys are configured (pass-through or deliberate anonymous use).
ANONYMOUS = Identity(key_name=None, team=None)


@dataclass(frozen=True)
class ClientKey:
    """A client key the gateway accepts, kept only as its digest, and who it makes the caller."""

    digest: bytes = field(repr=False)
    identity: Identity


@dataclass(frozen=True)
class WebhookDestination:
    """Where webhooks are delivered, and the secret they are signed with there."""

    url: str
    secret: str = field(repr=False)


@dataclass(frozen=True)
class Webhooks:
    """The webhook fan-out: each upstream's signing secret (of what it sends), each team's
    destination, and the operator's for events of objects no team is known to own."""

    secrets: t.Mapping[str, str] = field(default_factory=dict, repr=False)
    teams: t.Mapping[str, WebhookDestination] = field(default_factory=dict)
    operator: WebhookDestination | None = None


@dataclass(frozen=True)
class GatewayConfig:
    """Everything a gateway is built from: upstreams, client keys, model routes and the store.

    :param upstreams: in configuration order; the first one serves what nothing else decides.
    :param keys: the accepted client keys; none means every caller is :data:`ANONYMOUS`.
    :param models: the model table (empty: every model goes to the only upstream).
    :param store_url: the shared store, or None for a store that remembers nothing.
    :param unknown_ids: what a response id the store does not know gets: ``forward`` it to the
        first upstream, or ``reject`` it with the 404 of an unknown id.
    :param response_ttl_s: how long the store remembers where a response lives.
    :param prices: what responses cost, by model, tier and upstream.
    :param teams: the file's teams, which keys kept in the store belong to.
    :param keys_in_store: keys made with ``wsgi-proxy keys`` are accepted too.
    :param webhooks: where the upstreams' webhooks go.
    """

    upstreams: tuple[UpstreamSpec, ...]
    keys: tuple[ClientKey, ...] = ()
    models: tuple[ModelEntry, ...] = ()
    store_url: str | None = None
    unknown_ids: t.Literal["forward", "reject"] = "forward"
    response_ttl_s: float = 30 * 86400.0
    prices: PriceTable = field(default_factory=PriceTable)
    teams: t.Mapping[str, TeamEntry] = field(default_factory=dict)
    keys_in_store: bool = False
    webhooks: Webhooks = field(default_factory=Webhooks)

    @classmethod
    def from_settings(
        cls, settings: ProxySettings, environ: t.Mapping[str, str] | None = None
    ) -> GatewayConfig:
        """The configuration ``settings`` describe: their file's, or that of their variables.

        :raises ~wsgi_proxy.config.ConfigError: if the file is unreadable or invalid.
        """
        environ = os.environ if environ is None else environ
        if settings.config is None:
            return _from_variables(settings)
        return _from_file(load_config_file(settings.config, environ), settings, environ)


def _from_variables(settings: ProxySettings) -> GatewayConfig:
    """One upstream named ``default`` and one team of the ``WSGI_PROXY_API_KEYS`` keys."""
    key = settings.upstream_api_key
    upstream = UpstreamSpec(
        name="default",
        url=settings.upstream_url,
        kind=settings.upstream_kind,
        api_key=key.get_secret_value() if key is not None else None,
        api_version=settings.upstream_api_version,
        organization=settings.upstream_organization,
        project=settings.upstream_project,
        headers=dict(settings.upstream_headers),
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        websockets=websockets_mode(settings.upstream_kind, settings.upstream_websockets),
    )
    keys = tuple(
        ClientKey(key_digest(secret.get_secret_value()), Identity(key_name=f"key-{n}", team=DEFAULT_TEAM))
        for n, secret in enumerate(settings.api_keys, start=1)
    )
    # One upstream and one team: an id the store does not know can only be on that upstream.
    return GatewayConfig(upstreams=(upstream,), keys=keys, store_url=settings.store_url)


def _from_file(config: FileConfig, settings: ProxySettings, environ: t.Mapping[str, str]) -> GatewayConfig:
    upstreams = tuple(
        UpstreamSpec(
            name=entry.name,
            url=entry.url,
            kind=entry.kind,
            api_key=environ[entry.api_key_env].strip() if entry.api_key_env else None,
            api_version=entry.api_version,
            organization=entry.organization,
            project=entry.project,
            headers=dict(entry.headers),
            connect_timeout=entry.connect_timeout,
            read_timeout=entry.read_timeout,
            websockets=websockets_mode(entry.kind, entry.websockets),
        )
        for entry in config.upstreams
    )
    unknown = config.unknown_ids
    if unknown == "auto":
        # Forwarding an id nobody recorded is safe only where it can belong to no other team on no
        # other upstream: after a store outage, a lost record or an expired TTL, guessing would let
        # one team read, chain onto or delete another's response.
        unknown = "forward" if len(upstreams) == 1 and len(config.teams) <= 1 else "reject"
    keys = tuple(_file_key(key, config, environ) for key in config.keys)
    _check_distinct(keys)
    return GatewayConfig(
        upstreams=upstreams,
        keys=keys,
        models=config.models,
        store_url=settings.store_url or config.store_url or _made_default_store_url(),
        unknown_ids=unknown,
        response_ttl_s=config.response_ttl_days * 86400,
        prices=PriceTable(
            {**DEFAULT_PRICES, **config.prices},
            {entry.name: entry.prices for entry in config.upstreams if entry.prices},
        ),
        teams=config.teams,
        keys_in_store=config.keys_in_store,
        webhooks=_webhooks(config, environ),
    )


def _webhooks(config: FileConfig, environ: t.Mapping[str, str]) -> Webhooks:
    def secret_of(name: str) -> str:
        secret = environ[name].strip()
        try:
            sign(secret, "check", 0, b"")
        except ValueError:
            raise ConfigError(
                f"The webhook secret in {name} starts with whsec_ but is not base64 after it: copy it"
                " again from where it was made."
            ) from None
        return secret

    def destination(url: str | None, secret_env: str | None) -> WebhookDestination | None:
        return None if url is None or secret_env is None else WebhookDestination(url, secret_of(secret_env))

    teams = {
        name: found
        for name, team in config.teams.items()
        if (found := destination(team.webhook_url, team.webhook_secret_env)) is not None
    }
    operator = config.operator_webhook
    return Webhooks(
        secrets={u.name: secret_of(u.webhook_secret_env) for u in config.upstreams if u.webhook_secret_env},
        teams=teams,
        operator=destination(operator.webhook_url, operator.webhook_secret_env),
    )


def _made_default_store_url() -> str:
    make_default_store_dir()
    return default_store_url()


def _check_distinct(keys: tuple[ClientKey, ...]) -> None:
    seen: dict[bytes, str | None] = {}
    for key in keys:
        name = key.identity.key_name
        if key.digest in seen:
            raise ConfigError(
                f"The client keys {seen[key.digest]!r} and {name!r} are the same key, so one of them"
                " would be taken for the other (and its team): give each client a key of its own."
            )
        seen[key.digest] = name


def identity_of(name: str, team_name: str, team: TeamEntry, limits: KeyLimits | KeyEntry) -> Identity:
    """The identity of key ``name`` in ``team``: the team's and the key's own models, limits and
    budgets (a ``[[keys]]`` entry's, or a stored key's)."""
    levels = ((f"team:{team_name}", team), (f"key:{name}", limits))
    return Identity(
        key_name=name,
        team=team_name,
        models=tuple(m for m in (team.models, limits.models) if m is not None),
        rpm=tuple((counter, entry.rpm) for counter, entry in levels if entry.rpm is not None),
        max_streams=tuple(
            (counter, entry.max_streams) for counter, entry in levels if entry.max_streams is not None
        ),
        endpoints=team.endpoints,
        budgets=tuple(
            Budget(counter, kind, round(limit * 1e9) if kind.startswith("usd") else int(limit))
            for counter, entry in levels
            for kind in BUDGET_KINDS
            if (limit := getattr(entry, kind)) is not None
        ),
    )


def _file_key(key: KeyEntry, config: FileConfig, environ: t.Mapping[str, str]) -> ClientKey:
    """A ``[[keys]]`` entry with its team's and its own model lists and limits."""
    if key.sha256:
        digest = bytes.fromhex(key.sha256)
    else:
        secret = environ[t.cast(str, key.key_env)].strip()
        if len(secret) < MIN_CLIENT_KEY:
            raise ConfigError(
                f"The client key {key.name!r} ({key.key_env}) has fewer than {MIN_CLIENT_KEY} characters,"
                " so it could be guessed: generate one with openssl rand -hex 24."
            )
        digest = key_digest(secret)
    identity = identity_of(key.name, key.team, config.teams[key.team], key)
    return ClientKey(digest, identity)
