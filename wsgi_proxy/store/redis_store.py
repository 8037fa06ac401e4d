"""The shared store: one Redis server for every gateway worker on every host.

Layout, under a key prefix (``wsgi_proxy:`` by default)::

    {prefix}response:{response_id}   string: the ResponseRecord as JSON, with a PX expiry
    {prefix}pin:{key}                string: the upstream a session is pinned to, with a PX expiry
    {prefix}rate:{key}:{window}      integer: INCR per request, expiring after its window ends
    {prefix}slots:{key}              sorted set: lease -> expiry time, changed only by Lua scripts
    {prefix}usage:seen:{response_id} string: "1" with a PX expiry, once the response's usage is counted
    {prefix}usage:day:{YYYY-MM-DD}   hash: "{column}|{dims}" -> total, where column is one of
                                     USAGE_COLUMNS (responses, the token and call counters, the
                                     cost, unpriced) and dims is the JSON array [key_name, team,
                                     model, upstream, service_tier] (null for None; earlier
                                     releases wrote the first three only)
    {prefix}usage:days               sorted set: YYYY-MM-DD -> the date as the number YYYYMMDD
    {prefix}mark:{key}               string: "1" with a PX expiry: a marker (a webhook delivered)
    {prefix}key:{digest}             string: a client key's KeyRecord as JSON (never the secret)
    {prefix}keys:all                 set: the digests of every stored client key
    {prefix}audit:log                list: the audit lines of key changes, oldest first
    {prefix}spend:{counter}:{window} hash: tokens, cost (nano-dollars) a budget counter spent in one
                                     minute (m:N), day (d:YYYY-MM-DD) or month (M:YYYY-MM), expiring
                                     after it

Responses, rate windows and usage markers expire by Redis's own key expiry, so
:meth:`RedisStore.purge_expired` only has expired slot leases to remove (the scripts also drop
them as they go). Usage totals are kept until deleted. The usage keys of one response live in
different hash slots, so the store needs a single Redis server (with replicas), not a cluster.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import re
import time
import typing as t
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .base import (
    SPEND_WINDOWS,
    USAGE_TTL_S,
    KeyRecord,
    RateDecision,
    ResponseRecord,
    Spend,
    Store,
    StoreError,
    UsageEntry,
    UsageRow,
    check_day,
    check_entry,
    check_positive,
    fixed_window,
    rate_decision,
    redact_url,
    spend_of,
    usage_day,
    usage_sort_key,
)

__all__ = ["RedisStore"]

#: Take a slot: drop expired leases, refuse if the lease is new and the set is full, else (re)add it.
#: Times stay strings end to end: Lua would print a number as %.14g and round a unix time to 0.1 ms.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if not redis.call('ZSCORE', KEYS[1], ARGV[3]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
    return 0
end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[5]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[5])
end
return 1
"""

#: Extend a lease that is still live; an expired or unknown one stays gone.
_REFRESH = """
local expires_at = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expires_at or tonumber(expires_at) <= tonumber(ARGV[2]) then
    return 0
end
redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[4]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return 1
"""

#: Count a response's usage once: the marker and the totals change together or not at all, since
#: a script runs without interruption and a client that dies mid-call never leaves half of it done.
#: A caller that retries after a lost reply finds the marker and adds nothing again.
_RECORD_USAGE = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
    return 0
end
local dims = ARGV[2]
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
-- KEYS[4..]: the spend hashes charged, ARGV[5] and ARGV[6] the tokens and cost they add, ARGV[7]
-- how many there are, then each one's expiry; the usage columns and values come in pairs after.
local spent = tonumber(ARGV[7])
for i = 1, spent do
    redis.call('HINCRBY', KEYS[3 + i], 'tokens', ARGV[5])
    redis.call('HINCRBY', KEYS[3 + i], 'cost', ARGV[6])
    if redis.call('PTTL', KEYS[3 + i]) < tonumber(ARGV[7 + i]) then
        redis.call('PEXPIRE', KEYS[3 + i], ARGV[7 + i])
    end
end
for i = 8 + spent, #ARGV, 2 do
    redis.call('HINCRBY', KEYS[2], ARGV[i] .. '|' .. dims, ARGV[i + 1])
end
return 1
"""

# A rate window's key outlives the window a little, so a host whose clock runs behind still finds it.
_RATE_GRACE_MS = 1000


class RedisStore(Store):
    """A :class:`Store` on a Redis server (``redis://`` or ``rediss://`` for TLS).

    Constructing it does not connect: the first call does, and :meth:`ping` tells whether Redis
    answers, so a gateway can start while Redis is briefly away and report itself not ready.

    :param url: a redis-py URL, e.g. ``redis://:password@host:6379/0``.
    :param prefix: put before every key, so that several gateways (or tests) can share a database.
    :param max_connections: the size of the connection pool; keep it at or above gunicorn's
        ``threads``, since a thread waits (up to ``socket_timeout``) for a free connection.
    :param socket_timeout: seconds to wait for one answer from Redis.
    :param connect_timeout: seconds to wait for a connection to Redis.
    :param health_check_interval: seconds a pooled connection may sit idle before it is checked
        with a PING prior to reuse.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "wsgi_proxy:",
        max_connections: int = 1000,
        socket_timeout: float = 2.0,
        connect_timeout: float = 2.0,
        health_check_interval: int = 30,
    ) -> None:
        self.url = redact_url(url)
        self.prefix = prefix
        self._closed = False
        self._secrets = _secrets_of(url)
        try:
            # redis-py ignores a database that is not a number; a typo must not silently mean db 0.
            database = urlsplit(url).path.strip("/")
            if database and not database.isdigit():
                raise ValueError("the database after the host must be a number, such as /0")
            self._pool = redis.BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=socket_timeout,
                socket_timeout=socket_timeout,
                socket_connect_timeout=connect_timeout,
                health_check_interval=health_check_interval,
                # One quick retry, and only when the connection itself failed (a pooled connection
                # that a Redis restart closed); a timeout may mean the command ran, so it is final.
                retry=Retry(
                    ExponentialBackoff(cap=0.2, base=0.02), 1, supported_errors=(redis.ConnectionError,)
                ),
            )
        except ValueError as exc:
            raise StoreError(
                f"The Redis store URL {self.url} is invalid: {self._redact(str(exc))}. Use the form"
                " redis://[[user]:password@]host[:port][/db], or rediss:// for TLS."
            ) from None
        self._client = redis.Redis(connection_pool=self._pool)
        self._acquire = self._client.register_script(_ACQUIRE)
        self._refresh = self._client.register_script(_REFRESH)
        self._record_usage = self._client.register_script(_RECORD_USAGE)

    def _redact(self, text: str) -> str:
        """``text`` without the password, should a driver message ever echo it.

        :meta private:
        """
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    @contextlib.contextmanager
    def _translate(self, action: str) -> t.Iterator[None]:
        """Turn redis-py's errors into a :class:`StoreError` sentence; the one boundary for them.

        :meta private:
        """
        if self._closed:
            raise StoreError(f"The Redis store at {self.url} was closed; open a new store to use it.")
        try:
            yield
        except redis.RedisError as exc:
            self._note_failure()
            detail = self._redact(str(exc)).rstrip(".") or type(exc).__name__
            raise StoreError(
                f"The Redis store at {self.url} could not {action}: {detail}. Check that Redis is running,"
                " that this host can reach it, and that the URL's password and database are right."
            ) from exc

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}:{name}"

    def put_response(self, record: ResponseRecord, ttl_s: float) -> None:
        check_positive("ttl_s", ttl_s)
        value = json.dumps(dataclasses.asdict(record), separators=(",", ":"))
        with self._translate("store a response"):
            self._client.set(self._key("response", record.response_id), value, px=_ms(ttl_s))

    def get_response(self, response_id: str) -> ResponseRecord | None:
        with self._translate("look up a response"):
            value = self._client.get(self._key("response", response_id))
        if value is None:
            return None
        try:
            return ResponseRecord(**json.loads(value))
        except (ValueError, TypeError):
            raise StoreError(
                f"The Redis store at {self.url} holds an unreadable record for {response_id!r}; delete"
                f" the key {self._key('response', response_id)!r} or check what else writes under the"
                f" prefix {self.prefix!r}."
            ) from None

    def delete_response(self, response_id: str) -> None:
        with self._translate("delete a response"):
            self._client.delete(self._key("response", response_id))

    def pin(self, key: str, upstream: str, ttl_s: float) -> None:
        check_positive("ttl_s", ttl_s)
        with self._translate("pin a session"):
            self._client.set(self._key("pin", key), upstream, px=_ms(ttl_s))

    def pinned(self, key: str) -> str | None:
        with self._translate("look up a session's pin"):
            value = self._client.get(self._key("pin", key))
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value

    def hit_rate(
        self, key: str, limit: int, window_s: float = 60.0, now: float | None = None
    ) -> RateDecision:
        check_positive("window_s", window_s)
        now = time.time() if now is None else now
        index, window_end = fixed_window(now, window_s)
        name = self._key("rate", f"{key}:{index}")
        with self._translate("count a request"):
            # MULTI/EXEC: the counter never exists without its expiry, whatever happens in between.
            pipe = self._client.pipeline(transaction=True)
            pipe.incr(name)
            pipe.pexpire(name, _ms(window_end - now) + _RATE_GRACE_MS)
            hits, _ = pipe.execute()
        return rate_decision(int(hits), limit, now, window_s)

    def acquire_slot(self, key: str, limit: int, lease: str, ttl_s: float, now: float | None = None) -> bool:
        check_positive("ttl_s", ttl_s)
        now = time.time() if now is None else now
        with self._translate("take a stream slot"):
            taken = self._acquire(
                keys=[self._key("slots", key)], args=[repr(now), limit, lease, repr(now + ttl_s), _ms(ttl_s)]
            )
        return bool(taken)

    def refresh_slot(self, key: str, lease: str, ttl_s: float, now: float | None = None) -> None:
        check_positive("ttl_s", ttl_s)
        now = time.time() if now is None else now
        with self._translate("refresh a stream slot"):
            self._refresh(
                keys=[self._key("slots", key)], args=[lease, repr(now), repr(now + ttl_s), _ms(ttl_s)]
            )

    def release_slot(self, key: str, lease: str) -> None:
        with self._translate("release a stream slot"):
            self._client.zrem(self._key("slots", key), lease)

    def record_usage(self, entry: UsageEntry, *, at: float | None = None, ttl_s: float = USAGE_TTL_S) -> bool:
        check_positive("ttl_s", ttl_s)
        counts = check_entry(entry)
        day = usage_day(time.time() if at is None else at)
        names = [entry.key_name, entry.team, entry.model, entry.upstream, entry.service_tier]
        dims = json.dumps([name or None for name in names], separators=(",", ":"))
        keys = [
            self._key("usage", f"seen:{entry.response_id}"),
            self._key("usage", f"day:{day}"),
            self._key("usage", "days"),
        ]
        when = time.time() if at is None else at
        charged = [
            (self._key("spend", f"{counter}:{key_of(when)}"), _ms(keep))
            for counter in entry.charges
            for _, key_of, keep in SPEND_WINDOWS
        ]
        keys += [key for key, _ in charged]
        args: list[str | int] = [_ms(ttl_s), dims, _day_score(day), day]
        args += [entry.usage.total_tokens, entry.cost_nano_usd or 0, len(charged), *(ms for _, ms in charged)]
        for column, value in counts.items():
            if value:
                args += [column, value]
        with self._translate("record token usage"):
            first = self._record_usage(keys=keys, args=args)
        return bool(first)

    def spend(self, counters: t.Sequence[str], now: float | None = None) -> dict[str, Spend]:
        now = time.time() if now is None else now
        windows = [(counter, name, key_of(now)) for counter in counters for name, key_of, _ in SPEND_WINDOWS]
        with self._translate("read the budgets' spend"):
            pipe = self._client.pipeline(transaction=False)
            for counter, _, window in windows:
                pipe.hmget(self._key("spend", f"{counter}:{window}"), ["tokens", "cost"])
            answers = pipe.execute()
        found: dict[str, dict[str, tuple[int, int]]] = {counter: {} for counter in counters}
        for (counter, name, _), (tokens, cost) in zip(windows, answers, strict=True):
            found[counter][name] = (int(tokens or 0), int(cost or 0))
        return {counter: spend_of(spent) for counter, spent in found.items()}

    def mark(self, key: str, ttl_s: float) -> bool:
        check_positive("ttl_s", ttl_s)
        with self._translate("set a marker"):
            return bool(self._client.set(self._key("mark", key), "1", nx=True, px=_ms(ttl_s)))

    def marked(self, key: str) -> bool:
        with self._translate("look a marker up"):
            return bool(self._client.exists(self._key("mark", key)))

    def put_key(self, record: KeyRecord) -> None:
        value = json.dumps(dataclasses.asdict(record), separators=(",", ":"))
        with self._translate("store a client key"):
            pipe = self._client.pipeline(transaction=True)
            pipe.set(self._key("key", record.digest), value)
            pipe.sadd(self._key("keys", "all"), record.digest)
            pipe.execute()

    def get_key(self, digest: str) -> KeyRecord | None:
        with self._translate("look up a client key"):
            value = self._client.get(self._key("key", digest))
        return None if value is None else self._key_record(digest, value)

    def list_keys(self) -> list[KeyRecord]:
        with self._translate("list the client keys"):
            digests = sorted(_text(d) for d in self._client.smembers(self._key("keys", "all")))
            values = self._client.mget([self._key("key", d) for d in digests]) if digests else []
        records = [self._key_record(d, v) for d, v in zip(digests, values, strict=True) if v is not None]
        return sorted(records, key=lambda r: (r.name, r.created_at))

    def _key_record(self, digest: str, value: t.Any) -> KeyRecord:
        try:
            return KeyRecord(**json.loads(value))
        except (ValueError, TypeError):
            raise StoreError(
                f"The Redis store at {self.url} holds an unreadable client key record for digest"
                f" {digest[:12]}...; check what else writes under the prefix {self.prefix!r}."
            ) from None

    def add_audit(self, line: t.Mapping[str, t.Any]) -> None:
        with self._translate("write an audit line"):
            self._client.rpush(self._key("audit", "log"), json.dumps(line, separators=(",", ":")))

    def audit_log(self) -> list[dict[str, t.Any]]:
        with self._translate("read the audit log"):
            lines = self._client.lrange(self._key("audit", "log"), 0, -1)
        return [json.loads(line) for line in lines]

    def usage_totals(self, *, since: str | None = None, until: str | None = None) -> list[UsageRow]:
        check_day("since", since)
        check_day("until", until)
        low = _day_score(since) if since else "-inf"
        high = _day_score(until) if until else "+inf"
        with self._translate("read the usage totals"):
            days = [_text(day) for day in self._client.zrangebyscore(self._key("usage", "days"), low, high)]
            pipe = self._client.pipeline(transaction=False)
            for day in days:
                pipe.hgetall(self._key("usage", f"day:{day}"))
            hashes = pipe.execute()
        rows = []
        for day, fields in zip(days, hashes, strict=True):
            # By names: an earlier release's [key, team, model] adds to [key, team, model, null, null].
            totals: dict[tuple[str | None, ...], collections.Counter[str]] = collections.defaultdict(
                collections.Counter
            )
            for field, value in fields.items():
                column, _, dims = _text(field).partition("|")
                totals[self._usage_names(day, dims)][column] += int(value)
            rows += [UsageRow.of(names, counts) for names, counts in totals.items()]
        return sorted(rows, key=usage_sort_key)

    def _usage_names(self, day: str, dims: str) -> tuple[str | None, ...]:
        """A usage field's names in ``USAGE_DIMENSIONS`` order, from its JSON array of names."""
        try:
            names = json.loads(dims)
            if not isinstance(names, list) or len(names) not in (3, 5):
                raise ValueError
            if not all(name is None or isinstance(name, str) for name in names):
                raise ValueError
        except ValueError:
            raise StoreError(
                f"The Redis store at {self.url} holds an unreadable usage total {dims!r} for {day};"
                f" check what else writes under the prefix {self.prefix!r}."
            ) from None
        key_name, team, model, upstream, tier = (*names, None, None)[:5]
        return (day, team, key_name, model, upstream, tier)

    def purge_expired(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        removed = 0
        pattern = _glob_escape(self.prefix) + "slots:*"
        with self._translate("purge expired entries"):
            for name in self._client.scan_iter(match=pattern, count=500):
                removed += int(self._client.zremrangebyscore(name, "-inf", repr(now)))
        return removed

    def ping(self) -> bool:
        """True when a write lands (a replica, an out-of-memory or a read-only server say False)."""
        if self.failing():
            return False
        try:
            with self._translate("answer a ping"):
                return bool(self._client.set(self._key("heartbeat", "ping"), "1", px=60_000))
        except Exception:
            return False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool.disconnect()

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, prefix={self.prefix!r})"


def _secrets_of(url: str) -> set[str]:
    """The password in ``url``, as written and percent-decoded (redis-py decodes it)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return set()
    return {password, unquote(password)} - {""} if password else set()


def _ms(seconds: float) -> int:
    """Whole milliseconds, rounded up and at least 1 (Redis rejects a zero or negative expiry)."""
    return max(1, math.ceil(seconds * 1000))


def _day_score(day: str) -> int:
    """``2025-01-31`` as the number 20250131, which orders days in a sorted set."""
    return int(day.replace("-", ""))


def _text(value: object) -> str:
    """A reply from Redis as text (the client does not decode replies)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)
