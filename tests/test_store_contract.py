"""One contract for every store backend: the same tests run against SQLite and a real Redis."""

from __future__ import annotations

import datetime
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import typing as t
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from wsgi_proxy.store import KeyRecord, RateDecision, ResponseRecord, Store, StoreError, UsageEntry, UsageRow
from wsgi_proxy.store.base import USAGE_TTL_S, Spend, usage_day
from wsgi_proxy.store.redis_store import RedisStore
from wsgi_proxy.store.sqlite import CONNECTIONS, SQLiteStore
from wsgi_proxy.tools.launch import free_port
from wsgi_proxy.wire.usage import COUNTERS, Usage

#: A window-aligned time an hour ahead: explicit ``now`` values stay clear of purges on the real clock.
T0 = (math.floor(time.time() / 60) + 60) * 60.0


def utc(text: str) -> float:
    """The unix time of ``text``, an ISO time in UTC."""
    return datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.UTC).timestamp()


#: Noon (UTC) of three days in a row, for usage records.
JAN30, JAN31, FEB01 = utc("2025-01-30T12:00"), utc("2025-01-31T12:00"), utc("2025-02-01T12:00")


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


class TestPins:
    def test_a_pin_is_read_back_replaced_and_expires(self, store: Store) -> None:
        assert store.pinned("team:session") is None
        store.pin("team:session", "east", ttl_s=60)
        assert store.pinned("team:session") == "east"
        store.pin("team:session", "west", ttl_s=0.15)
        assert store.pinned("team:session") == "west"
        time.sleep(0.25)
        assert store.pinned("team:session") is None

    def test_other_handle_sees_the_pin(self, backend: Backend) -> None:
        backend.store.pin("k", "east", ttl_s=60)
        with backend.open() as other:
            assert other.pinned("k") == "east"

    @pytest.mark.parametrize("ttl", [0, -1, math.inf, math.nan])
    def test_ttl_must_be_positive(self, store: Store, ttl: float) -> None:
        with pytest.raises(ValueError, match="ttl_s must be a positive number"):
            store.pin("k", "east", ttl_s=ttl)


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
        # No hit was lost or counted twice: the window is full, exactly. ``remaining`` may be
        # under-stated under contention (SQLite reads the count back), never over-stated.
        assert all(0 <= d.remaining < 500 for d in allowed)
        assert min(d.remaining for d in allowed) == 0
        assert not store.hit_rate("shared", 500, 60, now=T0 + 1).allowed

    @pytest.mark.slow
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


def use(store: Store, response_id: str, tokens: tuple[int, int] = (10, 5), **changes: t.Any) -> bool:
    """Record ``tokens`` (input, output) for ``response_id``, by key ci of team search on gpt-4o, on Jan 31."""
    at, ttl = changes.pop("at", JAN31), changes.pop("ttl_s", USAGE_TTL_S)
    input_tokens, output_tokens = tokens
    usage = Usage(
        input_tokens=input_tokens, output_tokens=output_tokens, total_tokens=input_tokens + output_tokens
    )
    values: dict[str, t.Any] = {
        "key_name": "ci",
        "team": "search",
        "model": "gpt-4o",
        "upstream": None,
        "service_tier": None,
        "usage": usage,
        "cost_nano_usd": 7,
    }
    return store.record_usage(UsageEntry(response_id, **(values | changes)), at=at, ttl_s=ttl)


def row(
    day: str = "2025-01-31", responses: int = 1, tokens: tuple[int, int] = (10, 5), **changes: t.Any
) -> UsageRow:
    values: dict[str, t.Any] = {
        "key_name": "ci",
        "team": "search",
        "model": "gpt-4o",
        "cost_nano_usd": 7 * responses,
    }
    input_tokens, output_tokens = tokens
    usage = Usage(
        input_tokens=input_tokens, output_tokens=output_tokens, total_tokens=input_tokens + output_tokens
    )
    return UsageRow(day=day, responses=responses, usage=usage, **(values | changes))


class TestUsage:
    def test_the_first_record_counts_and_repeats_change_nothing(self, store: Store) -> None:
        assert use(store, "resp_1")
        assert not use(store, "resp_1", tokens=(999, 999))
        assert not use(store, "resp_1", at=FEB01, model="other")
        assert store.usage_totals() == [row()]

    def test_totals_add_up_per_day_key_team_and_model(self, store: Store) -> None:
        assert use(store, "resp_1", tokens=(10, 5))
        assert use(store, "resp_2", tokens=(7, 3))
        assert use(store, "resp_3", key_name="bob")
        assert use(store, "resp_4", team="ads")
        assert use(store, "resp_5", model="gpt-4o-mini")
        assert use(store, "resp_6", at=JAN30)
        assert store.usage_totals() == [
            row("2025-01-30"),
            row(team="ads"),
            row(key_name="bob"),
            row(responses=2, tokens=(17, 8)),
            row(model="gpt-4o-mini"),
        ]

    def test_total_tokens_are_taken_as_given(self, store: Store) -> None:
        # Reasoning tokens are part of the output, and cached ones of the input: the caller's
        # total is stored as it is, never recomputed.
        assert use(store, "resp_1", usage=Usage(input_tokens=1, output_tokens=2, total_tokens=10))
        assert store.usage_totals()[0].usage.total_tokens == 10

    def test_every_counter_the_cost_and_the_unpriced_add_up(self, store: Store) -> None:
        full = Usage(**{name: number for number, name in enumerate(COUNTERS, start=1)})
        assert use(store, "resp_1", usage=full, cost_nano_usd=1_000_000_001)
        assert use(store, "resp_2", usage=full, cost_nano_usd=None)
        (total,) = store.usage_totals()
        assert total.usage == Usage(**{name: 2 * number for number, name in enumerate(COUNTERS, start=1)})
        assert (total.responses, total.cost_nano_usd, total.unpriced) == (2, 1_000_000_001, 1)

    def test_upstreams_and_tiers_are_kept_apart(self, store: Store) -> None:
        assert use(store, "resp_1", upstream="openai", service_tier="flex")
        assert use(store, "resp_2", upstream="openai", service_tier="default")
        assert use(store, "resp_3", upstream="azure", service_tier="default")
        assert use(store, "resp_4", upstream="azure", service_tier="default")
        assert store.usage_totals() == [
            row(responses=2, tokens=(20, 10), upstream="azure", service_tier="default"),
            row(upstream="openai", service_tier="default"),
            row(upstream="openai", service_tier="flex"),
        ]

    @pytest.mark.parametrize(
        ("moment", "day"),
        [
            ("2025-01-31T00:00:00", "2025-01-31"),
            ("2025-01-31T23:59:59.999", "2025-01-31"),
            ("2025-02-01T00:00:00", "2025-02-01"),
            ("2024-12-31T23:59:59", "2024-12-31"),
        ],
    )
    def test_the_day_is_the_utc_date_of_at(self, store: Store, moment: str, day: str) -> None:
        assert use(store, "resp_1", at=utc(moment))
        assert [r.day for r in store.usage_totals()] == [day]

    def test_at_defaults_to_now(self, store: Store) -> None:
        before = usage_day(time.time())
        assert use(store, "resp_1", at=None)
        after = usage_day(time.time())
        (recorded,) = store.usage_totals()
        assert recorded.day in (before, after)

    @pytest.mark.parametrize(
        ("since", "until", "days"),
        [
            (None, None, ["2025-01-30", "2025-01-31", "2025-02-01"]),
            ("2025-01-31", None, ["2025-01-31", "2025-02-01"]),
            (None, "2025-01-31", ["2025-01-30", "2025-01-31"]),
            ("2025-01-31", "2025-01-31", ["2025-01-31"]),
            ("2025-01-01", "2025-01-30", ["2025-01-30"]),
            ("2025-02-02", None, []),
            ("2025-02-01", "2025-01-30", []),
        ],
    )
    def test_date_filters_are_inclusive(
        self, store: Store, since: str | None, until: str | None, days: list[str]
    ) -> None:
        for number, at in enumerate([FEB01, JAN30, JAN31]):
            assert use(store, f"resp_{number}", at=at)
        assert [r.day for r in store.usage_totals(since=since, until=until)] == days

    def test_missing_names_round_trip_as_none_and_sort_first(self, store: Store) -> None:
        assert use(store, "resp_1", key_name=None, team=None, model=None)
        assert use(store, "resp_2", key_name="", team="", model="")
        assert use(store, "resp_3", team=None)
        assert use(store, "resp_4")
        assert use(store, "resp_5", model=None)
        assert store.usage_totals() == [
            row(responses=2, tokens=(20, 10), key_name=None, team=None, model=None),
            row(team=None),
            row(model=None),
            row(),
        ]

    def test_names_with_separators_stay_apart(self, store: Store) -> None:
        assert use(store, "resp_1", key_name="a|b", team='"t",', model="m:1")
        assert use(store, "resp_2", key_name="a", team="b|t", model="m:1")
        assert store.usage_totals() == [
            row(key_name="a|b", team='"t",', model="m:1"),
            row(key_name="a", team="b|t", model="m:1"),
        ]

    def test_an_id_is_counted_again_once_its_marker_expired(self, store: Store) -> None:
        assert use(store, "resp_short", ttl_s=0.15)
        assert use(store, "resp_long", ttl_s=60)
        time.sleep(0.25)
        assert use(store, "resp_short")
        assert not use(store, "resp_long")
        assert store.usage_totals() == [row(responses=3, tokens=(30, 15))]

    def test_racing_threads_count_a_response_once(self, store: Store) -> None:
        won: list[bool] = []
        start = threading.Barrier(20)

        def worker() -> None:
            start.wait()
            won.append(use(store, "resp_race"))

        run_threads(worker, 20)
        assert len(won) == 20 and won.count(True) == 1
        assert store.usage_totals() == [row()]

    @pytest.mark.slow
    def test_processes_count_each_response_once(self, backend: Backend) -> None:
        children = [spawn_usage(backend, responses=40) for _ in range(2)]
        assert sum(finish(child) for child in children) == 40
        assert backend.store.usage_totals() == [row(responses=40, tokens=(400, 200))]

    def test_other_handle_sees_the_totals_and_the_markers(self, backend: Backend) -> None:
        assert use(backend.store, "resp_1")
        with backend.open() as other:
            assert other.usage_totals() == [row()]
            assert not use(other, "resp_1")

    @pytest.mark.parametrize(
        ("changes", "message"),
        [
            ({"tokens": (-1, 5)}, "input_tokens must be a whole number"),
            ({"tokens": (1.5, 5)}, "input_tokens must be a whole number"),
            ({"cost_nano_usd": -1}, "cost_nano_usd must be a whole number"),
            ({"ttl_s": 0}, "ttl_s must be a positive number"),
            ({"ttl_s": math.inf}, "ttl_s must be a positive number"),
        ],
    )
    def test_invalid_records_are_refused(self, store: Store, changes: dict[str, t.Any], message: str) -> None:
        with pytest.raises(ValueError, match=message):
            use(store, "resp_1", **changes)
        assert store.usage_totals() == []
        assert use(store, "resp_1"), "a refused record leaves no marker behind"

    def test_spend_is_charged_per_minute_day_and_month_once_per_response(self, store: Store) -> None:
        charges = ("key:ci", "team:search")
        noon = utc("2025-01-31T12:00:30")
        assert use(store, "resp_1", tokens=(10, 5), charges=charges, at=noon)
        assert not use(store, "resp_1", tokens=(10, 5), charges=charges, at=noon)  # replayed: not again
        assert use(store, "resp_2", tokens=(1, 1), charges=("team:search",), at=noon + 60)  # next minute
        assert use(store, "resp_3", tokens=(2, 2), charges=("team:search",), at=utc("2025-01-01T08:00"))
        assert use(store, "resp_4", tokens=(7, 0), cost_nano_usd=None, charges=charges, at=noon)  # unpriced
        spent = store.spend(["key:ci", "team:search", "key:nobody"], now=noon + 65)
        assert spent["key:ci"] == Spend(
            tokens_minute=0, tokens_day=22, tokens_month=22, cost_day=7, cost_month=7
        )
        assert spent["team:search"] == Spend(
            tokens_minute=2, tokens_day=24, tokens_month=28, cost_day=14, cost_month=21
        )
        assert spent["key:nobody"] == Spend()
        assert store.spend(["key:ci"], now=noon)["key:ci"].tokens_minute == 22
        assert store.spend(["key:ci"], now=utc("2025-02-01T00:00"))["key:ci"] == Spend()
        assert store.spend([], now=noon) == {}

    def test_other_handle_sees_the_spend(self, backend: Backend) -> None:
        assert use(backend.store, "resp_1", charges=("key:ci",), at=time.time())
        with backend.open() as other:
            assert other.spend(["key:ci"])["key:ci"].tokens_day == 15

    @pytest.mark.parametrize(
        "day", ["2025-1-31", "20250131", "2025-02-30", "2025-01-31T00:00", "yesterday", ""]
    )
    @pytest.mark.parametrize("bound", ["since", "until"])
    def test_days_must_be_real_dates(self, store: Store, bound: str, day: str) -> None:
        with pytest.raises(ValueError, match=f"{bound} must be a date written YYYY-MM-DD"):
            store.usage_totals(**{bound: day})


class TestKeys:
    def test_keys_round_trip_and_list_by_name_then_age(self, backend: Backend) -> None:
        store = backend.store
        later = KeyRecord("b" * 64, "alice", "red", "wxyz", '{"rpm":5}', T0 + 10, T0 + 100, None)
        first = KeyRecord("a" * 64, "alice", "red", "abcd", "{}", T0, None, None)
        other = KeyRecord("c" * 64, "bob", "blue", "0000", "{}", T0 - 5, None, T0 + 1)
        for record in (later, first, other):
            store.put_key(record)
        assert store.get_key("a" * 64) == first
        assert store.get_key("f" * 64) is None
        assert store.list_keys() == [first, later, other]
        store.put_key(replace(first, revoked_at=T0 + 50))
        with backend.open() as again:
            assert again.get_key("a" * 64) == replace(first, revoked_at=T0 + 50)
        assert [first.usable(T0), later.usable(T0 + 99), later.usable(T0 + 100), other.usable(T0)] == [
            True,
            True,
            False,
            False,
        ]

    def test_the_audit_log_keeps_lines_in_order(self, backend: Backend) -> None:
        lines = [{"audit": "key_created", "name": "alice", "n": n} for n in range(3)]
        for line in lines:
            backend.store.add_audit(line)
        with backend.open() as again:
            assert again.audit_log() == lines


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

    def test_sqlite_moves_the_totals_of_an_earlier_release_once(self, tmp_path: Path) -> None:
        path = tmp_path / "state.db"
        with sqlite3.connect(path) as old:  # the table as releases before upstreams and tiers wrote it
            old.execute(
                "CREATE TABLE usage_totals (day TEXT NOT NULL, team TEXT NOT NULL, key_name TEXT NOT NULL,"
                " model TEXT NOT NULL, responses INTEGER NOT NULL, input_tokens INTEGER NOT NULL,"
                " output_tokens INTEGER NOT NULL, total_tokens INTEGER NOT NULL,"
                " PRIMARY KEY (day, team, key_name, model)) WITHOUT ROWID"
            )
            old.execute(
                "INSERT INTO usage_totals VALUES ('2025-01-31', 'search', 'ci', 'gpt-4o', 2, 20, 10, 30)"
            )
        old.close()
        for _ in range(2):  # a second opening finds nothing left to move
            with SQLiteStore(path) as store:
                assert store.usage_totals() == [row(responses=2, tokens=(20, 10), cost_nano_usd=0)]
        with SQLiteStore(path) as store:
            assert use(store, "resp_1")
            assert store.usage_totals() == [row(responses=3, tokens=(30, 15), cost_nano_usd=7)]

    def test_redis_reads_the_totals_of_an_earlier_release(self, redis_server: str) -> None:
        prefix = f"test:{uuid.uuid4().hex}:"
        with RedisStore(redis_server, prefix=prefix) as store:
            fields = {
                f'{name}|["ci","search","gpt-4o"]': n
                for name, n in (
                    ("responses", 2),
                    ("input_tokens", 20),
                    ("output_tokens", 10),
                    ("total_tokens", 30),
                )
            }
            store._client.hset(f"{prefix}usage:day:2025-01-31", mapping=t.cast(t.Any, fields))
            store._client.zadd(f"{prefix}usage:days", {"2025-01-31": 20250131})
            assert use(store, "resp_1")
            assert store.usage_totals() == [row(responses=3, tokens=(30, 15), cost_nano_usd=7)]

    def test_sqlite_purge_forgets_usage_markers_but_keeps_totals(self, tmp_path: Path) -> None:
        with SQLiteStore(tmp_path / "state.db") as store:
            assert use(store, "resp_1", ttl_s=5)
            assert store.purge_expired(now=time.time() + 3600) == 1
            assert store.usage_totals() == [row()]
            assert use(store, "resp_1")

    def test_sqlite_usage_that_fails_half_way_leaves_nothing(self, tmp_path: Path) -> None:
        """The marker, the day's totals and the spend are one statement: a failure in the last
        (injected: the spend table refuses rows) undoes the first two, so a retry counts it once."""
        path = tmp_path / "state.db"
        with SQLiteStore(path) as store:
            with sqlite3.connect(path) as admin:
                admin.execute(
                    "CREATE TRIGGER refuse BEFORE INSERT ON spend BEGIN SELECT RAISE(ABORT, 'disk full'); END"
                )
            with pytest.raises(StoreError, match="could not record token usage: disk full") as info:
                use(store, "resp_1", charges=("key:ci",))
            assert_sentence(str(info.value))
            assert store.usage_totals() == []
            with sqlite3.connect(path) as admin:
                admin.execute("DROP TRIGGER refuse")
            assert use(store, "resp_1", charges=("key:ci",))
            assert not use(store, "resp_1", charges=("key:ci",))
            assert store.usage_totals() == [row()]
            assert store.spend(["key:ci"], now=JAN31)["key:ci"].tokens_day == 15

    @pytest.mark.parametrize(
        "write",
        [
            pytest.param(lambda store: use(store, "resp_1"), id="usage"),
            pytest.param(lambda store: store.acquire_slot("k", 1, "a", 30), id="slot"),
            pytest.param(lambda store: store.hit_rate("k", 1).allowed, id="rate"),
        ],
    )
    def test_sqlite_one_statement_writes_do_not_wait_for_the_process_transactions(
        self, tmp_path: Path, write: t.Callable[[Store], bool]
    ) -> None:
        """A transaction of several statements (a purge) holds the process's write lock while its
        thread wins the GIL back after each; a usage, a slot or a rate window's count is one
        statement and never waits for that lock (held here by another thread)."""
        with SQLiteStore(tmp_path / "state.db", busy_timeout=0.5) as store:
            held, done = threading.Event(), threading.Event()

            def hold() -> None:
                with store._write_lock:
                    held.set()
                    done.wait(10)

            holder = threading.Thread(target=hold)
            holder.start()
            try:
                assert held.wait(10)
                started = time.monotonic()
                assert write(store)
                assert time.monotonic() - started < 0.5
            finally:
                done.set()
                holder.join(10)

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

    def test_sqlite_connections_do_not_grow_with_the_threads(self, tmp_path: Path) -> None:
        """A worker holding thousands of streams has a thread for each: a connection per thread
        cost some 140 KB each. Every SQLite connection opens the file once, so the process's
        descriptors on it count the connections."""
        path = tmp_path / "state.db"
        together = threading.Barrier(40)

        def worker() -> None:
            name = f"resp_{threading.get_ident()}"
            store.put_response(record(name), ttl_s=60)
            assert store.get_response(name) is not None
            together.wait(10)  # every thread alive, each having written and read
            opened.append(sum(1 for fd in Path("/proc/self/fd").iterdir() if _names(fd, path)))
            together.wait(10)

        opened: list[int] = []
        with SQLiteStore(path) as store:
            run_threads(worker, 40)
        assert len(opened) == 40
        assert 1 <= max(opened) <= CONNECTIONS  # taken by whichever thread asks

    def test_sqlite_waits_for_a_connection_when_all_are_taken(self, tmp_path: Path) -> None:
        with SQLiteStore(tmp_path / "state.db", busy_timeout=0.5) as store:
            taken = [store._connection("hold a connection") for _ in range(CONNECTIONS)]
            for block in taken:
                block.__enter__()
            with pytest.raises(StoreError, match=f"kept its {CONNECTIONS} connections busy for 1 s") as info:
                store.get_response("resp_1")
            assert_sentence(str(info.value))
            back = threading.Timer(0.2, taken.pop().__exit__, (None, None, None))
            back.start()
            started = time.monotonic()
            assert store.get_response("resp_1") is None  # on the connection given back
            assert 0.1 < time.monotonic() - started < 1.0
            back.join()
            for block in taken:
                block.__exit__(None, None, None)

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
                lambda: use(store, "resp_1"),
                lambda: store.usage_totals(),
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


def _names(fd: Path, path: Path) -> bool:
    """Whether the descriptor ``fd`` (under ``/proc/self/fd``) is open on ``path`` itself."""
    try:
        return Path(os.readlink(fd)) == path
    except OSError:  # closed since it was listed
        return False


def spawn_hits(backend: Backend, key: str, *, hits: int, limit: int) -> subprocess.Popen[str]:
    """A separate Python process that counts ``hits`` requests against ``key`` and prints how many passed."""
    argv = [backend.kind, backend.target, backend.prefix, key, str(hits), str(limit), repr(T0 + 1)]
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


_USAGE_CHILD = textwrap.dedent(
    """
    import sys
    from wsgi_proxy.store.base import UsageEntry
    from wsgi_proxy.wire.usage import Usage
    kind, target, prefix, responses, at = sys.argv[1:]
    if kind == "sqlite":
        from wsgi_proxy.store.sqlite import SQLiteStore as Backend
        store = Backend(target)
    else:
        from wsgi_proxy.store.redis_store import RedisStore as Backend
        store = Backend(target, prefix=prefix)
    with store:
        print(
            sum(
                store.record_usage(
                    UsageEntry(
                        f"resp_{n}", key_name="ci", team="search", model="gpt-4o", upstream=None,
                        service_tier=None, usage=Usage(input_tokens=10, output_tokens=5, total_tokens=15),
                        cost_nano_usd=7,
                    ),
                    at=float(at),
                )
                for n in range(int(responses))
            )
        )
    """
)


def spawn_usage(backend: Backend, *, responses: int) -> subprocess.Popen[str]:
    """A separate Python process that records ``resp_0`` onwards and prints how many it counted first."""
    argv = [backend.kind, backend.target, backend.prefix, str(responses), repr(JAN31)]
    return subprocess.Popen(
        [sys.executable, "-c", _USAGE_CHILD, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(child: subprocess.Popen[str]) -> int:
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    return int(out)


class TestReadiness:
    """``ping`` says whether requests' writes would land, not merely whether something answers."""

    def test_a_full_sqlite_database_is_not_ready(self, tmp_path: Path) -> None:
        with SQLiteStore(tmp_path / "state.db") as store:
            assert store.ping()
            conn = store._idle.get_nowait()  # used by one thread, the store opened one connection:
            assert store._idle.empty()  # cap its pages
            store._idle.put(conn)
            (pages,) = conn.execute("PRAGMA page_count").fetchone()
            conn.execute(f"PRAGMA max_page_count = {pages}")
            with pytest.raises(StoreError, match="database or disk is full"):
                for n in range(10_000):
                    store.put_response(record(f"resp_{n}", team="x" * 500), ttl_s=60)
            assert not store.ping()  # the heartbeat row would still fit: what failed is remembered
            store._failed_at = time.monotonic() - store.FAILURE_MEMORY_S  # as if 5 s went by...
            conn.execute(f"PRAGMA max_page_count = {pages * 1000}")  # ...and the disk was freed
            assert store.ping()

    @pytest.mark.parametrize("remove", ["file", "directory"])
    def test_a_deleted_sqlite_file_is_not_ready(self, tmp_path: Path, remove: str) -> None:
        directory = tmp_path / "state"
        directory.mkdir()
        with SQLiteStore(directory / "state.db") as store:
            assert store.ping()
            if remove == "file":
                for path in directory.iterdir():
                    path.unlink()
            else:
                shutil.rmtree(directory)
            assert not store.ping()  # the open file still takes writes, which nobody will ever read

    def test_a_redis_that_refuses_writes_is_not_ready(self, redis_server: str) -> None:
        import redis

        admin = redis.Redis.from_url(redis_server)
        with RedisStore(redis_server, prefix=f"test:{uuid.uuid4().hex}:") as store:
            assert store.ping()
            admin.config_set("maxmemory", "1")
            admin.config_set("maxmemory-policy", "noeviction")
            try:
                assert not store.ping()
            finally:
                admin.config_set("maxmemory", "0")
            store._failed_at = time.monotonic() - store.FAILURE_MEMORY_S
            assert store.ping()
        admin.close()
