"""The embedded store: one SQLite file shared by the gateway workers of one host.

Concurrency model: each process keeps at most :data:`CONNECTIONS` connections, taken by whichever
of its threads asks, never one per thread: a connection costs some 140 KB of memory once used (its
page cache and parsed schema), and a worker holding thousands of streams has a thread for each. The
file is in WAL mode, so reads never wait for writes. A write that is one statement is a transaction
of its own, which SQLite serialises across connections and processes with ``busy_timeout``; a
response's usage is one too (an insert into a view whose trigger does the counting), and so is
taking a stream slot or counting a request against a rate window (counted only while the window
has room). Purges run inside one ``BEGIN IMMEDIATE`` transaction, which makes them atomic for all
workers on the host; the transactions of one process take turns on a lock first. A forked child
opens its own connections: it must never touch its parent's.

Usage totals keep "" for a missing key, team, model, upstream or tier: NULLs would never conflict in
the primary key, so every response without a key would get a row of its own instead of adding to one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import sqlite3
import threading
import time
import typing as t
import weakref
from pathlib import Path

from .base import (
    SPEND_WINDOWS,
    USAGE_COLUMNS,
    USAGE_DIMENSIONS,
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
    spend_of,
    usage_day,
    usage_names,
)

__all__ = ["CONNECTIONS", "SQLiteStore"]

log = logging.getLogger("wsgi_proxy.store")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    response_id TEXT PRIMARY KEY,
    upstream TEXT NOT NULL,
    team TEXT,
    key_name TEXT,
    created_at REAL NOT NULL,
    background INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_expires_at ON responses (expires_at);

CREATE TABLE IF NOT EXISTS pins (
    key TEXT PRIMARY KEY,
    upstream TEXT NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pins_expires_at ON pins (expires_at);

CREATE TABLE IF NOT EXISTS rate_windows (
    key TEXT NOT NULL,
    window_index INTEGER NOT NULL,
    hits INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (key, window_index)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rate_windows_expires_at ON rate_windows (expires_at);

CREATE TABLE IF NOT EXISTS slot_leases (
    key TEXT NOT NULL,
    lease TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (key, lease)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS slot_leases_expires_at ON slot_leases (expires_at);

CREATE TABLE IF NOT EXISTS usage_seen (
    response_id TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_seen_expires_at ON usage_seen (expires_at);

CREATE TABLE IF NOT EXISTS usage_daily (
    {dimensions},
    {columns},
    PRIMARY KEY ({names})
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS spend (
    counter TEXT NOT NULL,
    span TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    cost INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (counter, span)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS spend_expires_at ON spend (expires_at);

CREATE TABLE IF NOT EXISTS markers (
    key TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS markers_expires_at ON markers (expires_at);

CREATE TABLE IF NOT EXISTS client_keys (
    digest TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    team TEXT NOT NULL,
    hint TEXT NOT NULL,
    limits TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    revoked_at REAL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    line TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS heartbeat (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at REAL NOT NULL
);

-- A response's usage is counted by one statement, an insert into this view, so that it is atomic
-- without a transaction of several statements: its trigger sets the response's marker, stops if the
-- marker was already set (the response was counted), then adds to the day's totals and to the spend
-- of every counter charged (a JSON array of [counter, span, expires_at]). A new shape needs new names.
CREATE VIEW IF NOT EXISTS usage_count ({count_columns}) AS SELECT {nulls} WHERE 0;

CREATE TRIGGER IF NOT EXISTS usage_count_insert INSTEAD OF INSERT ON usage_count BEGIN
    -- A marker that expired but was not purged yet counts as absent, as in Redis.
    INSERT INTO usage_seen (response_id, expires_at) VALUES (NEW.response_id, NEW.expires_at)
        ON CONFLICT (response_id) DO UPDATE SET expires_at = excluded.expires_at
        WHERE usage_seen.expires_at <= NEW.now;
    SELECT RAISE(IGNORE) WHERE changes() = 0;
    INSERT INTO usage_daily ({names}, {counted}) VALUES ({new_names}, {new_counted})
        ON CONFLICT ({names}) DO UPDATE SET {sums};
    INSERT INTO spend (counter, span, tokens, cost, expires_at)
        SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), NEW.total_tokens,
            NEW.cost_nano_usd, json_extract(value, '$[2]') FROM json_each(NEW.spends) WHERE 1
        ON CONFLICT (counter, span) DO UPDATE SET tokens = tokens + excluded.tokens,
            cost = cost + excluded.cost, expires_at = MAX(expires_at, excluded.expires_at);
END;
"""

#: The columns of the view ``usage_count``, in the order :meth:`SQLiteStore.record_usage` gives them.
_USAGE_COUNT = ("response_id", "expires_at", "now", *USAGE_DIMENSIONS, *USAGE_COLUMNS, "spends")

_SCHEMA = _SCHEMA.format(
    dimensions=",\n    ".join(f"{name} TEXT NOT NULL" for name in USAGE_DIMENSIONS),
    columns=",\n    ".join(f"{name} INTEGER NOT NULL DEFAULT 0" for name in USAGE_COLUMNS),
    names=", ".join(USAGE_DIMENSIONS),
    counted=", ".join(USAGE_COLUMNS),
    count_columns=", ".join(_USAGE_COUNT),
    nulls=", ".join(["NULL"] * len(_USAGE_COUNT)),
    new_names=", ".join(f"NEW.{name}" for name in USAGE_DIMENSIONS),
    new_counted=", ".join(f"NEW.{name}" for name in USAGE_COLUMNS),
    sums=", ".join(f"{name} = {name} + excluded.{name}" for name in USAGE_COLUMNS),
)

_COUNT_USAGE = f"INSERT INTO usage_count VALUES ({', '.join('?' * len(_USAGE_COUNT))})"

#: Totals kept by earlier releases (one row per day, team, key and model, three token counts) move
#: into ``usage_daily`` once, with no upstream or tier, when a store is opened.
_MIGRATE_USAGE_TOTALS = (
    "INSERT INTO usage_daily (day, team, key_name, model, upstream, service_tier, responses, input_tokens,"
    " output_tokens, total_tokens)"
    " SELECT day, team, key_name, model, '', '', responses, input_tokens, output_tokens, total_tokens"
    " FROM usage_totals WHERE 1"
    " ON CONFLICT DO UPDATE SET responses = responses + excluded.responses,"
    " input_tokens = input_tokens + excluded.input_tokens,"
    " output_tokens = output_tokens + excluded.output_tokens,"
    " total_tokens = total_tokens + excluded.total_tokens"
)

_KEYS = "SELECT digest, name, team, hint, limits, created_at, expires_at, revoked_at FROM client_keys"
_READ_USAGE = "SELECT {names}, {columns} FROM usage_daily WHERE day >= ? AND day <= ? ORDER BY {names}"

#: How many connections each process uses at once, whichever of its threads asks (a read or a write
#: takes microseconds; a connection costs some 140 KB once used).
CONNECTIONS = 8

#: The tables whose rows expire (usage totals are kept until deleted).
_TABLES = ("responses", "pins", "rate_windows", "slot_leases", "usage_seen", "spend", "markers")


class SQLiteStore(Store):
    """A :class:`Store` in one SQLite file; opening it creates the file and its tables if needed.

    :param path: the database file. Its directory must exist and be writable (SQLite puts the
        ``-wal`` and ``-shm`` files next to it). Use a local disk: WAL does not work over NFS.
    :param busy_timeout: seconds a write waits for another process's transaction to finish.
    :param purge_every: expired rows are purged after this many writes by one process...
    :param purge_interval: ...or when this many seconds passed since the last purge, whichever
        comes first.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout: float = 5.0,
        purge_every: int = 1000,
        purge_interval: float = 60.0,
    ) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self.purge_every = purge_every
        self.purge_interval = purge_interval
        self._closed = False
        self._orphans: list[object] = []
        self._reset(os.getpid())
        # A forked child starts clean even if another thread held a lock at the moment of the fork.
        ref = weakref.ref(self)

        def after_fork_in_child() -> None:
            store = ref()
            if store is not None:
                store._reset(os.getpid())

        os.register_at_fork(after_in_child=after_fork_in_child)
        _create_private(self.path)
        with self._write_lock, self._connection("be opened") as conn:
            self._set_wal(conn)
            conn.executescript(_SCHEMA)
        self._inode = self.path.stat().st_ino
        with self._write("move the usage totals of an earlier release") as conn:
            # Checked inside the transaction: another worker opening the file may have moved them.
            if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'usage_totals'").fetchone():
                conn.execute(_MIGRATE_USAGE_TOTALS)
                conn.execute("DROP TABLE usage_totals")

    def _reset(self, pid: int) -> None:
        """Start this process's connection bookkeeping afresh (at open, and in a forked child).

        :meta private:
        """
        # The parent's connections stay referenced but unused: closing them in the child could
        # release locks the parent still relies on.
        if hasattr(self, "_idle"):
            self._orphans.append(self._idle)
        self._pid = pid
        self._idle: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()  # those not in use
        self._opened = 0
        self._open_lock = threading.Lock()
        # Reentrant for the same reason as the metrics lock: a relay finished by the garbage collector
        # may release its stream slot while this thread is inside a write.
        self._write_lock = threading.RLock()
        self._writes = 0
        self._last_purge = time.monotonic()

    @contextlib.contextmanager
    def _connection(self, action: str) -> t.Iterator[sqlite3.Connection]:
        """One of the process's connections, this thread's until the block ends; SQLite's errors in
        the block become a :class:`StoreError` saying what could not be done (``action``).

        :meta private:
        """
        with self._translate(action):
            if self._closed:
                raise StoreError(f"The SQLite store at {self.path} was closed; open a new store to use it.")
            if os.getpid() != self._pid:  # forked without os.fork(), so the at-fork hook did not run
                self._reset(os.getpid())
            conn = self._take(action)
            try:
                yield conn
            finally:
                self._idle.put(conn)
                if self._closed:  # close() may have run before this one came back
                    self._close_idle()

    def _take(self, action: str) -> sqlite3.Connection:
        """An idle connection, a new one while fewer than :data:`CONNECTIONS` are open, or the first
        to come back.

        :meta private:
        """
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._open_lock:
            opening = self._opened < CONNECTIONS
            self._opened += opening
        if opening:
            try:
                return self._make_connection()
            except BaseException:
                with self._open_lock:
                    self._opened -= 1
                raise
        try:
            return self._idle.get(timeout=2 * self.busy_timeout)
        except queue.Empty:
            raise self._kept_busy(action, f"its {CONNECTIONS} connections") from None

    def _kept_busy(self, action: str, what: str) -> StoreError:
        """The error of a thread that waited twice ``busy_timeout`` for ``what`` the process shares.

        :meta private:
        """
        return StoreError(
            f"The SQLite store at {self.path} could not {action}: other threads kept {what} busy for"
            f" {2 * self.busy_timeout:.0f} s. Lower the load or move the store to Redis."
        )

    def _close_idle(self) -> None:
        """:meta private:"""
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _rows(self, action: str, sql: str, params: t.Sequence[t.Any] = ()) -> list[t.Any]:
        """Every row ``sql`` reads (WAL: a read never waits for a write).

        :meta private:
        """
        with self._connection(action) as conn:
            return conn.execute(sql, params).fetchall()

    def _make_connection(self) -> sqlite3.Connection:
        """:meta private:"""
        # ``timeout`` is SQLite's busy_timeout. check_same_thread is off because a connection serves
        # whichever thread of the process holds it.
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            # With WAL, NORMAL loses at most the last commits on power loss and never corrupts.
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def _set_wal(self, conn: sqlite3.Connection) -> None:
        """Put the file in WAL mode (persistent), waiting out workers that open it at the same time.

        :meta private:
        """
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                mode = None
            if str(mode).lower() == "wal":
                return
            if mode is not None and time.monotonic() > deadline:
                raise StoreError(
                    f"The SQLite store at {self.path} cannot use WAL mode (it stayed in {mode!r} mode);"
                    " put the file on a local file system that supports shared memory."
                )
            time.sleep(0.01)

    @contextlib.contextmanager
    def _translate(self, action: str) -> t.Iterator[None]:
        """Turn SQLite's errors into a :class:`StoreError` sentence; the one boundary for them.

        :meta private:
        """
        try:
            yield
        except sqlite3.Error as exc:
            self._note_failure()
            raise StoreError(
                f"The SQLite store at {self.path} could not {action}: {exc}. Check that the directory"
                " exists and is writable by the gateway, that the disk is not full, and that no other"
                " program holds the file locked."
            ) from exc

    @contextlib.contextmanager
    def _write(self, action: str) -> t.Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction, committed on success and rolled back on error: for
        work of several statements (a purge; moving an earlier release's usage totals at open). The
        process's transactions take turns on a lock, so that they queue cheaply instead of sleeping
        in SQLite's busy handler.

        :meta private:
        """
        with self._translate(action):
            if not self._write_lock.acquire(timeout=2 * self.busy_timeout):
                raise self._kept_busy(action, "it")
        try:
            with self._connection(action) as conn:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
        finally:
            self._write_lock.release()
        self._wrote()

    def _write_one(self, action: str, sql: str, params: t.Sequence[t.Any]) -> int:
        """One statement, a transaction of its own (SQLite makes each statement outside one atomic,
        its triggers included); returns the rows it and its triggers changed.

        The file is locked only while SQLite runs the statement, with the GIL let go, and no lock of
        the process is held: a ``BEGIN IMMEDIATE`` transaction holds both while its thread wins the
        GIL back three times, each a wait behind thousands of threads in a busy worker.

        :meta private:
        """
        with self._connection(action) as conn:
            before = conn.total_changes
            conn.execute(sql, params)
            changed = conn.total_changes - before
        self._wrote()
        return changed

    def _wrote(self) -> None:
        """Count a write that succeeded, and purge expired entries every so often.

        :meta private:
        """
        self._writes += 1  # a lost count only delays a purge
        if self._writes >= self.purge_every or time.monotonic() - self._last_purge >= self.purge_interval:
            self._writes = 0
            self._last_purge = time.monotonic()
            self._purge_quietly()

    def _purge_quietly(self) -> None:
        """An opportunistic purge: its failure must not fail the write that triggered it.

        :meta private:
        """
        try:
            removed = self.purge_expired()
        except StoreError as exc:
            log.warning("purging expired entries failed: %s", exc)
        else:
            log.debug("purged %d expired entries from %s", removed, self.path)

    def put_response(self, record: ResponseRecord, ttl_s: float) -> None:
        check_positive("ttl_s", ttl_s)
        self._write_one(
            "store a response",
            "INSERT OR REPLACE INTO responses"
            " (response_id, upstream, team, key_name, created_at, background, expires_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                record.response_id,
                record.upstream,
                record.team,
                record.key_name,
                record.created_at,
                int(record.background),
                time.time() + ttl_s,
            ),
        )

    def get_response(self, response_id: str) -> ResponseRecord | None:
        rows = self._rows(
            "look up a response",
            "SELECT upstream, team, key_name, created_at, background FROM responses"
            " WHERE response_id = ? AND expires_at > ?",
            (response_id, time.time()),
        )
        if not rows:
            return None
        ((upstream, team, key_name, created_at, background),) = rows
        return ResponseRecord(response_id, upstream, team, key_name, created_at, bool(background))

    def delete_response(self, response_id: str) -> None:
        self._write_one("delete a response", "DELETE FROM responses WHERE response_id = ?", (response_id,))

    def pin(self, key: str, upstream: str, ttl_s: float) -> None:
        check_positive("ttl_s", ttl_s)
        self._write_one(
            "pin a session",
            "INSERT OR REPLACE INTO pins (key, upstream, expires_at) VALUES (?, ?, ?)",
            (key, upstream, time.time() + ttl_s),
        )

    def pinned(self, key: str) -> str | None:
        rows = self._rows(
            "look up a session's pin",
            "SELECT upstream FROM pins WHERE key = ? AND expires_at > ?",
            (key, time.time()),
        )
        return str(rows[0][0]) if rows else None

    def hit_rate(
        self, key: str, limit: int, window_s: float = 60.0, now: float | None = None
    ) -> RateDecision:
        check_positive("window_s", window_s)
        now = time.time() if now is None else now
        index, window_end = fixed_window(now, window_s)
        # One statement, so no lock of the process is held: the hit is counted only while the
        # window has room (a limit of 0 has none), so the count never passes the limit and a
        # refused hit changes no row. The count read back next, on the same connection, may
        # include later hits of other threads, so ``remaining`` can only be under-stated.
        with self._connection("count a request") as conn:
            counted = conn.execute(
                "INSERT INTO rate_windows (key, window_index, hits, expires_at) SELECT ?, ?, 1, ?"
                " WHERE ? > 0 ON CONFLICT (key, window_index) DO UPDATE SET hits = hits + 1 WHERE hits < ?",
                (key, index, window_end, limit, limit),
            ).rowcount
            if not counted:
                return rate_decision(limit + 1, limit, now, window_s)
            row = conn.execute(
                "SELECT hits FROM rate_windows WHERE key = ? AND window_index = ?", (key, index)
            ).fetchone()
        self._wrote()
        # A purge may have removed a window already over between the two statements.
        return rate_decision(int(row[0]) if row else limit, limit, now, window_s)

    def acquire_slot(self, key: str, limit: int, lease: str, ttl_s: float, now: float | None = None) -> bool:
        check_positive("ttl_s", ttl_s)
        now = time.time() if now is None else now
        # One statement, so no lock of the process is held: the lease is written when it is held
        # already (its expiry moves) or when fewer than ``limit`` live ones are. Expired leases
        # count as absent until a purge removes them.
        return bool(
            self._write_one(
                "take a stream slot",
                "INSERT OR REPLACE INTO slot_leases (key, lease, expires_at) SELECT ?, ?, ?"
                " WHERE EXISTS (SELECT 1 FROM slot_leases WHERE key = ? AND lease = ? AND expires_at > ?)"
                " OR (SELECT COUNT(*) FROM slot_leases WHERE key = ? AND expires_at > ?) < ?",
                (key, lease, now + ttl_s, key, lease, now, key, now, limit),
            )
        )

    def refresh_slot(self, key: str, lease: str, ttl_s: float, now: float | None = None) -> None:
        check_positive("ttl_s", ttl_s)
        now = time.time() if now is None else now
        self._write_one(
            "refresh a stream slot",
            "UPDATE slot_leases SET expires_at = ? WHERE key = ? AND lease = ? AND expires_at > ?",
            (now + ttl_s, key, lease, now),
        )

    def release_slot(self, key: str, lease: str) -> None:
        self._write_one(
            "release a stream slot", "DELETE FROM slot_leases WHERE key = ? AND lease = ?", (key, lease)
        )

    def record_usage(self, entry: UsageEntry, *, at: float | None = None, ttl_s: float = USAGE_TTL_S) -> bool:
        check_positive("ttl_s", ttl_s)
        counts = check_entry(entry)
        now = time.time()
        when = now if at is None else at
        spends = [
            (counter, key_of(when), when + keep)
            for counter in entry.charges
            for _, key_of, keep in SPEND_WINDOWS
        ]
        params = (
            entry.response_id,
            now + ttl_s,
            now,
            *usage_names(entry, usage_day(when)),
            *(counts.get(name, 0) for name in USAGE_COLUMNS),
            json.dumps(spends),
        )
        # One statement (the view's trigger does the rest), so no lock of the process is held.
        return bool(self._write_one("record token usage", _COUNT_USAGE, params))

    def spend(self, counters: t.Sequence[str], now: float | None = None) -> dict[str, Spend]:
        now = time.time() if now is None else now
        names = {key_of(now): name for name, key_of, _ in SPEND_WINDOWS}
        found: dict[str, dict[str, tuple[int, int]]] = {counter: {} for counter in counters}
        if counters:
            rows = self._rows(
                "read the budgets' spend",
                f"SELECT counter, span, tokens, cost FROM spend WHERE counter IN"
                f" ({', '.join('?' * len(counters))}) AND span IN (?, ?, ?)",
                (*counters, *names),
            )
            for counter, span, tokens, cost in rows:
                found[counter][names[span]] = (tokens, cost)
        return {counter: spend_of(windows) for counter, windows in found.items()}

    def usage_totals(self, *, since: str | None = None, until: str | None = None) -> list[UsageRow]:
        check_day("since", since)
        check_day("until", until)
        sql = _READ_USAGE.format(names=", ".join(USAGE_DIMENSIONS), columns=", ".join(USAGE_COLUMNS))
        rows = self._rows("read the usage totals", sql, (since or "", until or "9999-12-31"))
        width = len(USAGE_DIMENSIONS)
        return [UsageRow.of(row[:width], dict(zip(USAGE_COLUMNS, row[width:], strict=True))) for row in rows]

    def mark(self, key: str, ttl_s: float) -> bool:
        check_positive("ttl_s", ttl_s)
        now = time.time()
        # A marker that expired but was not purged yet counts as absent, as in Redis.
        return bool(
            self._write_one(
                "set a marker",
                "INSERT INTO markers (key, expires_at) VALUES (?, ?) ON CONFLICT (key) DO UPDATE"
                " SET expires_at = excluded.expires_at WHERE markers.expires_at <= ?",
                (key, now + ttl_s, now),
            )
        )

    def marked(self, key: str) -> bool:
        return bool(
            self._rows(
                "look a marker up",
                "SELECT 1 FROM markers WHERE key = ? AND expires_at > ?",
                (key, time.time()),
            )
        )

    def put_key(self, record: KeyRecord) -> None:
        self._write_one(
            "store a client key",
            "INSERT OR REPLACE INTO client_keys (digest, name, team, hint, limits, created_at,"
            " expires_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            dataclasses.astuple(record),
        )

    def get_key(self, digest: str) -> KeyRecord | None:
        rows = self._rows("look up a client key", f"{_KEYS} WHERE digest = ?", (digest,))
        return KeyRecord(*rows[0]) if rows else None

    def list_keys(self) -> list[KeyRecord]:
        return [
            KeyRecord(*row)
            for row in self._rows("list the client keys", f"{_KEYS} ORDER BY name, created_at")
        ]

    def add_audit(self, line: t.Mapping[str, t.Any]) -> None:
        self._write_one(
            "write an audit line",
            "INSERT INTO audit (line) VALUES (?)",
            (json.dumps(line, separators=(",", ":")),),
        )

    def audit_log(self) -> list[dict[str, t.Any]]:
        return [
            json.loads(line)
            for (line,) in self._rows("read the audit log", "SELECT line FROM audit ORDER BY id")
        ]

    def purge_expired(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        removed = 0
        with self._write("purge expired entries") as conn:
            for table in _TABLES:
                removed += conn.execute(f"DELETE FROM {table} WHERE expires_at <= ?", (now,)).rowcount
        return removed

    def ping(self) -> bool:
        """True when a write lands in the file this store opened (a full disk, a read-only or a
        deleted file or directory all say False): one small write."""
        try:
            if self.failing() or self.path.stat().st_ino != self._inode:
                return False  # or deleted, perhaps replaced: writes would go to a file nobody reads
            self._write_one(
                "answer a ping", "INSERT OR REPLACE INTO heartbeat (id, at) VALUES (1, ?)", (time.time(),)
            )
        except Exception:
            return False
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # from now on a connection given back is closed too
        self._close_idle()

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"


def _create_private(path: Path) -> None:
    """Create the database file readable by its owner only (its -wal and -shm files take its mode)."""
    if path.exists():
        return
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:  # another worker was first
        pass
    except OSError as exc:
        raise StoreError(
            f"The SQLite store at {path} could not be created ({exc.strerror}): check that the directory"
            f" {path.parent} exists and is writable by the gateway, or name another store."
        ) from None
