"""The state store's interface and value types, shared by every backend.

The store holds what several gateway processes (and hosts) must agree on: which upstream holds a
response, how many requests a key made in the current window, which streams a key has open, and
how many tokens each key, team and model used per day.
Every backend is safe to call from many threads and processes at once, and raises only
:class:`StoreError`.
"""

from __future__ import annotations

import abc
import datetime
import math
import re
import time
import typing as t
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from ..wire.usage import COUNTERS, Usage

__all__ = [
    "USAGE_COLUMNS",
    "USAGE_DIMENSIONS",
    "USAGE_TTL_S",
    "KeyRecord",
    "RateDecision",
    "ResponseRecord",
    "SPEND_WINDOWS",
    "Spend",
    "Store",
    "StoreError",
    "UsageEntry",
    "UsageRow",
    "check_day",
    "check_entry",
    "check_positive",
    "fixed_window",
    "rate_decision",
    "redact_url",
    "spend_of",
    "usage_day",
    "usage_names",
    "usage_sort_key",
    "window_end",
]

#: How long :meth:`Store.record_usage` remembers a response id by default: 30 days.
USAGE_TTL_S = 30 * 86400.0


class StoreError(RuntimeError):
    """The store could not be opened or could not answer; the message names the store and what to do."""


@dataclass(frozen=True)
class ResponseRecord:
    """Where a stored response lives, and on whose behalf it was created."""

    response_id: str
    upstream: str
    """The name of the upstream that holds the response."""
    team: str | None
    key_name: str | None
    created_at: float
    """Unix time."""
    background: bool


@dataclass(frozen=True)
class KeyRecord:
    """One secret of a client key kept in the store (``wsgi-proxy keys``), by its SHA-256 digest.

    Every secret of one ``name`` is the same identity: its team, its own ``limits`` (the JSON of
    the configuration's per-key limits and budgets) and its usage. A secret is usable until it is
    revoked or expires.
    """

    digest: str
    """The hex SHA-256 digest of the secret; the secret itself is never stored."""
    name: str
    team: str
    hint: str
    """The secret's last four characters, to tell secrets apart in listings."""
    limits: str
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None

    def usable(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True)
class RateDecision:
    """The outcome of counting one request against a rate limit."""

    allowed: bool
    retry_after: float
    """Seconds until a request would be allowed again; 0 when this one was."""
    remaining: int
    """Requests still allowed in the current window: under contention a store may under-state it,
    never over-state it."""


@dataclass(frozen=True)
class UsageEntry:
    """One finished response's usage, as :meth:`Store.record_usage` counts it.

    ``cost_nano_usd`` is what it cost in nano-dollars (1e-9 USD), None when its model has no price.
    """

    response_id: str
    key_name: str | None
    team: str | None
    model: str | None
    upstream: str | None
    service_tier: str | None
    usage: Usage
    cost_nano_usd: int | None = None
    charges: tuple[str, ...] = ()
    """The budget counters (``key:alice``, ``team:research``) its tokens and cost count against."""


@dataclass(frozen=True)
class Spend:
    """What a budget counter has spent in the windows that hold one moment: its tokens this minute,
    today and this month, and its cost (in nano-dollars) today and this month (UTC)."""

    tokens_minute: int = 0
    tokens_day: int = 0
    tokens_month: int = 0
    cost_day: int = 0
    cost_month: int = 0

    def against(self, kind: str) -> int:
        """What counts against a budget of ``kind`` (``tpm``, ``tokens_per_day``, ...,
        ``usd_per_month``): tokens this minute, day or month, or cost in nano-dollars."""
        return {
            "tpm": self.tokens_minute,
            "tokens_per_day": self.tokens_day,
            "tokens_per_month": self.tokens_month,
            "usd_per_day": self.cost_day,
            "usd_per_month": self.cost_month,
        }[kind]


def window_end(kind: str, now: float) -> datetime.datetime:
    """When the window of a budget of ``kind`` that holds ``now`` ends (UTC): the next minute for
    ``tpm``, the next midnight for a daily budget, the first of the next month for a monthly one."""
    moment = datetime.datetime.fromtimestamp(now, tz=datetime.UTC)
    if kind == "tpm":
        return moment.replace(second=0, microsecond=0) + datetime.timedelta(minutes=1)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if kind.endswith("_per_day"):
        return day + datetime.timedelta(days=1)
    return (day.replace(day=1) + datetime.timedelta(days=32)).replace(day=1)


#: The windows a budget counter's spend is kept in: (name, how its key is made from a unix time,
#: seconds its total is kept after the window began). Minutes are ``[i * 60, (i + 1) * 60)``.
SPEND_WINDOWS: tuple[tuple[str, t.Callable[[float], str], float], ...] = (
    ("minute", lambda at: f"m:{math.floor(at / 60)}", 180.0),
    ("day", lambda at: f"d:{usage_day(at)}", 2 * 86400.0),
    ("month", lambda at: f"M:{usage_day(at)[:7]}", 33 * 86400.0),
)


def spend_of(windows: t.Mapping[str, tuple[int, int]]) -> Spend:
    """A :class:`Spend` from the (tokens, cost) of each of :data:`SPEND_WINDOWS` by name."""
    minute, day, month = (windows.get(name, (0, 0)) for name, _, _ in SPEND_WINDOWS)
    return Spend(minute[0], day[0], month[0], day[1], month[1])


#: The names a usage row is kept apart by, in their natural order (``day`` first).
USAGE_DIMENSIONS = ("day", "team", "key_name", "model", "upstream", "service_tier")

#: The counted columns of a usage row: responses, every counter of :class:`Usage`, the cost, and
#: how many responses had no price (their cost is not in ``cost_nano_usd``).
USAGE_COLUMNS = ("responses", *COUNTERS, "cost_nano_usd", "unpriced")


@dataclass(frozen=True)
class UsageRow:
    """What was used on one UTC day by one key, in one team, with one model, upstream and tier.

    A name is None when the response had none (an anonymous or pass-through request, a response
    that named no model or tier, or a total recorded before upstreams and tiers were); an empty
    name counts as None.
    """

    day: str
    """The UTC date, ``YYYY-MM-DD``."""
    key_name: str | None
    team: str | None
    model: str | None
    upstream: str | None = None
    service_tier: str | None = None
    responses: int = 0
    """How many responses were counted."""
    usage: Usage = Usage()
    cost_nano_usd: int = 0
    unpriced: int = 0
    """How many of the responses had no price, so that ``cost_nano_usd`` leaves them out."""

    def value(self, column: str) -> int:
        """The row's count in one of :data:`USAGE_COLUMNS`."""
        if column in _ROW_COUNTS:
            return t.cast(int, getattr(self, column))
        return t.cast(int, getattr(self.usage, column))

    @classmethod
    def of(cls, names: t.Sequence[str | None], counts: t.Mapping[str, int]) -> UsageRow:
        """A row from its :data:`USAGE_DIMENSIONS` values (empty names as None) and its counts by
        column (a column not given is 0)."""
        day, team, key_name, model, upstream, tier = (name or None for name in names)
        return cls(
            day=t.cast(str, day),
            key_name=key_name,
            team=team,
            model=model,
            upstream=upstream,
            service_tier=tier,
            responses=counts.get("responses", 0),
            usage=Usage(**{name: counts.get(name, 0) for name in COUNTERS}),
            cost_nano_usd=counts.get("cost_nano_usd", 0),
            unpriced=counts.get("unpriced", 0),
        )


_ROW_COUNTS = frozenset({"responses", "cost_nano_usd", "unpriced"})


class Store(abc.ABC):
    """The gateway's shared state: response locators, session pins, rate-limit windows and stream slots.

    ``now`` arguments are unix times that default to :func:`time.time`; hosts sharing a store
    should keep their clocks in sync (NTP), since windows and leases are computed from them.
    """

    @abc.abstractmethod
    def put_response(self, record: ResponseRecord, ttl_s: float) -> None:
        """Store ``record`` under its ``response_id``, replacing any earlier one, for ``ttl_s`` seconds."""

    @abc.abstractmethod
    def get_response(self, response_id: str) -> ResponseRecord | None:
        """The record stored for ``response_id``, or None if there is none or it expired."""

    @abc.abstractmethod
    def delete_response(self, response_id: str) -> None:
        """Forget ``response_id`` (nothing happens if it is unknown)."""

    @abc.abstractmethod
    def pin(self, key: str, upstream: str, ttl_s: float) -> None:
        """Pin a session (``key``) to ``upstream`` for ``ttl_s`` seconds, replacing any earlier pin."""

    @abc.abstractmethod
    def pinned(self, key: str) -> str | None:
        """The upstream ``key`` is pinned to, or None if it is not (or the pin expired)."""

    @abc.abstractmethod
    def hit_rate(
        self, key: str, limit: int, window_s: float = 60.0, now: float | None = None
    ) -> RateDecision:
        """Count one request against ``key`` in a fixed window and say whether it is allowed.

        Windows are ``[i * window_s, (i + 1) * window_s)``; a request is allowed while the window's
        count, this request included, is at most ``limit``. A store may count refused requests or
        not: a window that refused one refuses every later one until it ends, either way.
        """

    @abc.abstractmethod
    def acquire_slot(self, key: str, limit: int, lease: str, ttl_s: float, now: float | None = None) -> bool:
        """Take one of ``limit`` concurrent slots of ``key`` for ``lease``, for ``ttl_s`` seconds.

        Returns False when ``limit`` other live leases hold the slots. Acquiring a lease that is
        already held refreshes it and returns True. A lease not refreshed within ``ttl_s`` expires,
        so the slots of a crashed worker free themselves.
        """

    @abc.abstractmethod
    def refresh_slot(self, key: str, lease: str, ttl_s: float, now: float | None = None) -> None:
        """Extend a live ``lease`` to ``ttl_s`` seconds from now (an expired or unknown lease stays gone)."""

    @abc.abstractmethod
    def release_slot(self, key: str, lease: str) -> None:
        """Give back the slot held by ``lease`` (nothing happens if it is not held)."""

    @abc.abstractmethod
    def record_usage(self, entry: UsageEntry, *, at: float | None = None, ttl_s: float = USAGE_TTL_S) -> bool:
        """Add ``entry`` to the totals of its day, key, team, model, upstream and tier, once.

        The first call for a response id adds the counts, the cost (or 1 to ``unpriced``), and 1 to
        the ``responses`` count, to the totals of the UTC day of ``at`` (a unix time, default now),
        and its total tokens and cost to the spend of each of ``entry.charges`` in the minute, day
        and month of ``at``; and returns True. Later calls for the same id return False and change
        nothing, from any thread, process or host: a resumed stream replays ``response.completed``
        and a background response may be polled as well. The id is remembered for ``ttl_s``
        seconds; the totals are kept until deleted.
        """

    @abc.abstractmethod
    def spend(self, counters: t.Sequence[str], now: float | None = None) -> dict[str, Spend]:
        """What each budget counter has spent in the minute, day and month (UTC) that hold ``now``,
        as :meth:`record_usage` added it for the entries charged to it."""

    @abc.abstractmethod
    def usage_totals(self, *, since: str | None = None, until: str | None = None) -> list[UsageRow]:
        """The usage totals from day ``since`` to day ``until`` (both ``YYYY-MM-DD``, inclusive).

        Rows are sorted by day, team, key, model, upstream and tier, with None before any name.
        """

    @abc.abstractmethod
    def mark(self, key: str, ttl_s: float) -> bool:
        """Set the marker ``key`` for ``ttl_s`` seconds; True if it was not set (from any thread,
        process or host: one caller wins)."""

    @abc.abstractmethod
    def marked(self, key: str) -> bool:
        """Whether the marker ``key`` is set."""

    @abc.abstractmethod
    def put_key(self, record: KeyRecord) -> None:
        """Store a client key's secret (by its digest), replacing any record of that digest."""

    @abc.abstractmethod
    def get_key(self, digest: str) -> KeyRecord | None:
        """The record of the secret whose hex SHA-256 digest is ``digest``, or None."""

    @abc.abstractmethod
    def list_keys(self) -> list[KeyRecord]:
        """Every stored secret, revoked and expired ones too, by name and then by creation."""

    @abc.abstractmethod
    def add_audit(self, line: t.Mapping[str, t.Any]) -> None:
        """Append one audit line (a JSON object) to the store's audit log."""

    @abc.abstractmethod
    def audit_log(self) -> list[dict[str, t.Any]]:
        """The audit log, oldest first."""

    @abc.abstractmethod
    def purge_expired(self, now: float | None = None) -> int:
        """Remove entries that expired by ``now`` and return how many were removed."""

    @abc.abstractmethod
    def ping(self) -> bool:
        """True if the store takes a write, as requests need it to; a cheap readiness check that
        never raises."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the store's connections; the store must not be used afterwards."""

    #: How long after a failed operation :meth:`ping` still says False: a heartbeat that happens to
    #: succeed (a row rewritten in place on a full disk) must not hide the requests that fail.
    FAILURE_MEMORY_S: t.ClassVar[float] = 5.0
    _failed_at: float | None = None

    def _note_failure(self) -> None:
        """Remember that an operation failed just now (the backends' error boundary calls this)."""
        self._failed_at = time.monotonic()

    def failing(self) -> bool:
        """True while an operation failed within the last :attr:`FAILURE_MEMORY_S` seconds."""
        failed = self._failed_at
        return failed is not None and time.monotonic() - failed < self.FAILURE_MEMORY_S

    def __enter__(self) -> t.Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_positive(name: str, value: float) -> None:
    """Reject a TTL or window that is not a positive finite number (a programming error)."""
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive number of seconds, not {value!r}.")


def check_entry(entry: UsageEntry) -> dict[str, int]:
    """The counts ``entry`` adds to its row, by column; ValueError for a count that is not a whole
    number of at least 0 (a programming error)."""
    counts = {"responses": 1, **entry.usage.counts()}
    if entry.cost_nano_usd is None:
        counts["unpriced"] = 1
    else:
        counts["cost_nano_usd"] = entry.cost_nano_usd
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a whole number of at least 0, not {value!r}.")
    return counts


def usage_names(entry: UsageEntry, day: str) -> tuple[str, ...]:
    """The :data:`USAGE_DIMENSIONS` values of ``entry``'s row, with "" for a missing name."""
    names = (entry.team, entry.key_name, entry.model, entry.upstream, entry.service_tier)
    return (day, *(name or "" for name in names))


_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def check_day(name: str, value: str | None) -> None:
    """Reject a day that is not a real date written ``YYYY-MM-DD``."""
    if value is None:
        return
    try:
        if not (isinstance(value, str) and _DAY.fullmatch(value)):
            raise ValueError
        datetime.date.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{name} must be a date written YYYY-MM-DD, such as 2025-01-31, not {value!r}."
        ) from None


def usage_day(at: float) -> str:
    """The UTC date of the unix time ``at``, as ``YYYY-MM-DD``."""
    return datetime.datetime.fromtimestamp(at, tz=datetime.UTC).strftime("%Y-%m-%d")


def usage_sort_key(row: UsageRow) -> tuple[str, ...]:
    """Order rows by day, team, key, model, upstream and tier; None (stored as "") sorts first."""
    return tuple(getattr(row, name) or "" for name in USAGE_DIMENSIONS)


def fixed_window(now: float, window_s: float) -> tuple[int, float]:
    """The index of the window that holds ``now``, and the unix time at which that window ends."""
    index = math.floor(now / window_s)
    return index, (index + 1) * window_s


def rate_decision(count: int, limit: int, now: float, window_s: float) -> RateDecision:
    """The decision for the ``count``-th request of the ``window_s`` window that holds ``now``."""
    if count <= limit:
        return RateDecision(allowed=True, retry_after=0.0, remaining=limit - count)
    _, window_end = fixed_window(now, window_s)
    # Float rounding can put the computed end a hair outside (now, now + window_s]; keep it inside.
    return RateDecision(allowed=False, retry_after=min(max(window_end - now, 1e-6), window_s), remaining=0)


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, fit for error messages and logs."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<an unparsable URL>"
    if not password:
        return url
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username or ''}:***@{host}"
    return urlunsplit(parts._replace(netloc=netloc))
