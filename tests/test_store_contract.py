"""One contract for every store backend: the same tests run against SQLite and a real Redis."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import threading
import time
import typing as t
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from wsgi_proxy.launch import free_port
from wsgi_proxy.store import RateDecision, ResponseRecord, Store, StoreError
from wsgi_proxy.store.redis_store import RedisStore
from wsgi_proxy.store.sqlite import SQLiteStore

#: A window-aligned time an hour ahead: explicit ``now`` values stay clear of purges on the real clock.
T0 = (math.floor(time.time() / 60) + 60) * 60.0


@dataclass
class Backend:
    """One store under test, plus how to open another handle (or process) on the same state."""

    kind: str
    target: str
    prefix: str
    store: Store

    def open(self) -> Store:
        return open_backend(self.kind, self.target, self.prefix)


def open_backend(kind: str, target: str, prefix: str) -> Store:
    if kind == "sqlite":
        return SQLiteStore(target)
    return RedisStore(target, prefix=prefix)


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> t.Iterator[Backend]:
    prefix = f"test:{uuid.uuid4().hex}:"
    if request.param == "sqlite":
        target = str(tmp_path / "state.db")
    else:
        target = request.getfixturevalue("redis_server")
    case = Backend(request.param, target, prefix, open_backend(request.param, target, prefix))
    try:
        yield case
    finally:
        case.store.close()


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.store


def record(response_id: str = "resp_1", **changes: t.Any) -> ResponseRecord:
    values: dict[str, t.Any] = {
        "response_id": response_id,
        "upstream": "east",
        "team": "search",
        "key_name": "ci",
        "created_at": 1_700_000_000.25,
        "background": True,
    }
    return ResponseRecord(**(values | changes))


def assert_sentence(message: str) -> None:
    assert message[:1].isupper() and message.endswith("."), message


class TestResponses:
    def test_put_then_get_returns_the_record(self, store: Store) -> None:
        store.put_response(record(), ttl_s=60)
        assert store.get_response("resp_1") == record()

    def test_none_fields_round_trip(self, store: Store) -> None:
        store.put_response(record(team=None, key_name=None, background=False), ttl_s=60)
        assert store.get_response("resp_1") == record(team=None, key_name=None, background=False)

    def test_unknown_id_is_none(self, store: Store) -> None:
        assert store.get_response("resp_unknown") is None

    def test_put_overwrites(self, store: Store) -> None:
        store.put_response(record(upstream="east"), ttl_s=60)
        store.put_response(record(upstream="west"), ttl_s=60)
        assert store.get_response("resp_1") == record(upstream="west")

    def test_delete_forgets_and_tolerates_unknown_ids(self, store: Store) -> None:
        store.put_response(record(), ttl_s=60)
        store.delete_response("resp_1")
        store.delete_response("resp_never_stored")
        assert store.get_response("resp_1") is None

    def test_entry_expires_after_its_ttl(self, store: Store) -> None:
        store.put_response(record("resp_short"), ttl_s=0.15)
        store.put_response(record("resp_long"), ttl_s=60)
        assert store.get_response("resp_short") is not None
        time.sleep(0.25)
        assert store.get_response("resp_short") is None
        assert store.get_response("resp_long") is not None

    def test_overwrite_resets_the_ttl(self, store: Store) -> None:
        store.put_response(record(), ttl_s=0.15)
        store.put_response(record(), ttl_s=60)
        time.sleep(0.25)
        assert store.get_response("resp_1") == record()

    def test_other_handle_sees_the_record(self, backend: Backend) -> None:
        backend.store.put_response(record(), ttl_s=60)
        with backend.open() as other:
            assert other.get_response("resp_1") == record()

    @pytest.mark.parametrize("ttl", [0, -1, math.inf, math.nan])
    def test_ttl_must_be_positive(self, store: Store, ttl: float) -> None:
        with pytest.raises(ValueError, match="ttl_s must be a positive number"):
            store.put_response(record(), ttl_s=ttl)


class TestRateLimit:
    def test_limit_in_a_window_then_the_next_window(self, store: Store) -> None:
        decisions = [store.hit_rate("k", 3, 60, now=T0 + s) for s in (1, 2, 3)]
        assert decisions == [
            RateDecision(True, 0.0, 2),
            RateDecision(True, 0.0, 1),
            RateDecision(True, 0.0, 0),
        ]
        refused = store.hit_rate("k", 3, 60, now=T0 + 10)
        assert not refused.allowed and refused.remaining == 0
        assert refused.retry_after == pytest.approx(50)
        assert 0 < refused.retry_after <= 60
        assert store.hit_rate("k", 3, 60, now=T0 + 60) == RateDecision(True, 0.0, 2)

    def test_keys_are_counted_apart(self, store: Store) -> None:
        assert not [store.hit_rate("a", 1, 60, now=T0) for _ in range(2)][-1].allowed
        assert store.hit_rate("b", 1, 60, now=T0).allowed

    def test_refusal_at_the_window_start_waits_the_whole_window(self, store: Store) -> None:
        decision = store.hit_rate("k", 0, 30, now=T0)
        assert not decision.allowed
        assert decision.retry_after == pytest.approx(30)

    def test_fractional_windows(self, store: Store) -> None:
        store.hit_rate("k", 1, 0.5, now=T0 + 0.1)
        refused = store.hit_rate("k", 1, 0.5, now=T0 + 0.2)
        assert not refused.allowed and refused.retry_after == pytest.approx(0.3)
        assert store.hit_rate("k", 1, 0.5, now=T0 + 0.5).allowed

    def test_threads_share_one_exact_count(self, store: Store) -> None:
        results: list[RateDecision] = []
        lock = threading.Lock()
        start = threading.Barrier(20)

        def worker() -> None:
            start.wait()
            mine = [store.hit_rate("shared", 500, 60, now=T0 + 1) for _ in range(50)]
            with lock:
                results.extend(mine)

        run_threads(worker, 20)
        allowed = [d for d in results if d.allowed]
        assert len(results) == 1000 and len(allowed) == 500
        # Every allowed hit saw a distinct count: no two threads read-modified-wrote the same value.
        assert sorted(d.remaining for d in allowed) == list(range(500))

    def test_processes_share_one_count(self, backend: Backend) -> None:
        key = f"proc-{uuid.uuid4().hex}"
        children = [spawn_hits(backend, key, hits=30, limit=40) for _ in range(2)]
        allowed = [finish(child) for child in children]
        assert sum(allowed) == 40
        assert backend.store.hit_rate(key, 40, 60, now=T0 + 1) == RateDecision(False, 59.0, 0)


class TestSlots:
    def test_limit_release_and_reacquire(self, store: Store) -> None:
        assert store.acquire_slot("k", 2, "a", 30, now=T0)
        assert store.acquire_slot("k", 2, "b", 30, now=T0)
        assert not store.acquire_slot("k", 2, "c", 30, now=T0)
        assert store.acquire_slot("k", 2, "b", 30, now=T0 + 1), "a held lease is refreshed, not refused"
        store.release_slot("k", "a")
        assert store.acquire_slot("k", 2, "c", 30, now=T0 + 2)
        assert not store.acquire_slot("k", 2, "d", 30, now=T0 + 2)

    def test_keys_are_limited_apart(self, store: Store) -> None:
        assert store.acquire_slot("x", 1, "a", 30, now=T0)
        assert store.acquire_slot("y", 1, "a", 30, now=T0)

    def test_expired_leases_free_their_slots(self, store: Store) -> None:
        assert store.acquire_slot("k", 2, "a", 10, now=T0)
        assert store.acquire_slot("k", 2, "b", 20, now=T0)
        assert not store.acquire_slot("k", 2, "c", 10, now=T0 + 9)
        assert store.acquire_slot("k", 2, "c", 10, now=T0 + 10)
        assert not store.acquire_slot("k", 2, "d", 10, now=T0 + 15)

    def test_reacquire_extends_the_lease(self, store: Store) -> None:
        assert store.acquire_slot("k", 1, "a", 10, now=T0)
        assert store.acquire_slot("k", 1, "a", 10, now=T0 + 8)
        assert not store.acquire_slot("k", 1, "b", 10, now=T0 + 15)

    def test_refresh_extends_a_live_lease(self, store: Store) -> None:
        assert store.acquire_slot("k", 1, "a", 10, now=T0)
        store.refresh_slot("k", "a", 10, now=T0 + 5)
        assert not store.acquire_slot("k", 1, "b", 10, now=T0 + 12)
        assert store.acquire_slot("k", 1, "b", 10, now=T0 + 15)

    def test_refresh_does_not_revive_an_expired_lease(self, store: Store) -> None:
        assert store.acquire_slot("k", 1, "a", 10, now=T0)
        store.refresh_slot("k", "a", 10, now=T0 + 11)
        store.refresh_slot("k", "never-acquired", 10, now=T0 + 11)
        assert store.acquire_slot("k", 1, "b", 10, now=T0 + 11)

    def test_release_of_an_unknown_lease_is_harmless(self, store: Store) -> None:
        store.release_slot("k", "nobody")
        assert store.acquire_slot("k", 1, "a", 10, now=T0)

    def test_racing_threads_take_exactly_the_limit(self, store: Store) -> None:
        won: list[bool] = []
        start = threading.Barrier(50)

        def worker() -> None:
            start.wait()
            won.append(store.acquire_slot("race", 10, uuid.uuid4().hex, 30))

        run_threads(worker, 50)
        assert len(won) == 50 and won.count(True) == 10

    def test_other_handle_sees_the_leases(self, backend: Backend) -> None:
        assert backend.store.acquire_slot("k", 1, "a", 30, now=T0)
        with backend.open() as other:
            assert not other.acquire_slot("k", 1, "b", 30, now=T0)
            other.release_slot("k", "a")
        assert backend.store.acquire_slot("k", 1, "b", 30, now=T0)


class TestMaintenance:
    def test_purge_removes_expired_leases(self, store: Store) -> None:
        store.acquire_slot("k", 5, "a", 10, now=T0)
        store.acquire_slot("k", 5, "b", 10, now=T0)
        store.acquire_slot("k", 5, "live", 100, now=T0)
        assert store.purge_expired(now=T0 + 50) == 2
        assert store.purge_expired(now=T0 + 50) == 0
        assert not store.acquire_slot("k", 1, "c", 10, now=T0 + 50), "the live lease survived the purge"

    def test_sqlite_purge_counts_every_table(self, tmp_path: Path) -> None:
        # Redis expires responses and rate windows itself, so only SQLite has them to purge.
        with SQLiteStore(tmp_path / "state.db") as store:
            store.put_response(record(), ttl_s=5)
            store.hit_rate("k", 1, 60, now=T0)
            store.acquire_slot("k", 1, "a", 10, now=T0)
            assert store.purge_expired(now=T0 + 3600) == 3
            assert store.purge_expired(now=T0 + 3600) == 0

    def test_sqlite_purges_opportunistically(self, tmp_path: Path) -> None:
        with SQLiteStore(tmp_path / "state.db", purge_every=3) as store:
            store.put_response(record("resp_a"), ttl_s=0.05)
            time.sleep(0.1)
            store.put_response(record("resp_b"), ttl_s=60)
            store.put_response(record("resp_c"), ttl_s=60)  # the third write purges
            assert store.purge_expired() == 0

    def test_ping_then_close(self, store: Store) -> None:
        assert store.ping()
        store.close()
        assert not store.ping()
        with pytest.raises(StoreError, match="was closed"):
            store.get_response("resp_1")

    def test_fork_child_uses_its_own_connections(self, backend: Backend) -> None:
        store = backend.store
        store.hit_rate("forked", 10, 60, now=T0)  # the parent's connection exists before the fork
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit status only
            try:
                ok = store.hit_rate("forked", 10, 60, now=T0).remaining == 8
            finally:
                os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert store.hit_rate("forked", 10, 60, now=T0).remaining == 7


class TestErrors:
    def test_unreachable_redis_raises_store_error_without_the_password(self) -> None:
        url = f"redis://:s3cretpass@127.0.0.1:{free_port()}/0"
        with RedisStore(url) as store:
            assert not store.ping()
            calls: list[t.Callable[[], object]] = [
                lambda: store.get_response("resp_1"),
                lambda: store.put_response(record(), 60),
                lambda: store.hit_rate("k", 1),
                lambda: store.acquire_slot("k", 1, "a", 10),
                lambda: store.purge_expired(),
            ]
            for call in calls:
                with pytest.raises(StoreError) as caught:
                    call()
                message = str(caught.value)
                assert_sentence(message)
                assert "s3cretpass" not in message and "s3cretpass" not in repr(caught.value)
                assert f"redis://:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in message

    def test_unwritable_sqlite_path_raises_store_error(self, tmp_path: Path) -> None:
        blocker = tmp_path / "not-a-directory"
        blocker.write_text("")
        with pytest.raises(StoreError) as caught:
            SQLiteStore(blocker / "state.db")
        assert_sentence(str(caught.value))
        assert str(blocker / "state.db") in str(caught.value)


def run_threads(target: t.Callable[[], None], count: int) -> None:
    threads = [threading.Thread(target=target) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)


_CHILD = textwrap.dedent(
    """
    import sys
    kind, target, prefix, key, hits, limit, now = sys.argv[1:]
    if kind == "sqlite":
        from wsgi_proxy.store.sqlite import SQLiteStore as Backend
        store = Backend(target)
    else:
        from wsgi_proxy.store.redis_store import RedisStore as Backend
        store = Backend(target, prefix=prefix)
    with store:
        print(sum(store.hit_rate(key, int(limit), 60, now=float(now)).allowed for _ in range(int(hits))))
    """
)


def spawn_hits(backend: Backend, key: str, *, hits: int, limit: int) -> subprocess.Popen[str]:
    """A separate Python process that counts ``hits`` requests against ``key`` and prints how many passed."""
    argv = [backend.kind, backend.target, backend.prefix, key, str(hits), str(limit), repr(T0 + 1)]
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(child: subprocess.Popen[str]) -> int:
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    return int(out)
