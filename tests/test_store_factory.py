"""open_store: which URL opens which backend, and the sentences for the ones it refuses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from wsgi_proxy.store import Store, StoreError, open_store
from wsgi_proxy.store.redis_store import RedisStore
from wsgi_proxy.store.sqlite import SQLiteStore


@pytest.mark.parametrize(
    ("url", "relative"),
    [
        ("sqlite:///{dir}/a.db", False),
        ("sqlite:////{dir}/a.db", False),  # SQLAlchemy's spelling of an absolute path
        ("SQLITE:///{dir}/a.db", False),
        ("  sqlite:///{dir}/a.db  ", False),
        ("sqlite:///{dir}/with%20space.db", False),
        ("{dir}/a.db", False),
        ("sqlite:a.db", True),
        ("sqlite:sub/../a.db", True),
        ("a.db", True),
        ("./a.db", True),
    ],
)
def test_sqlite_forms(url: str, relative: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    with open_store(
        url.format(dir=str(tmp_path).lstrip("/") if url.startswith("sqlite:") else tmp_path)
    ) as store:
        assert isinstance(store, SQLiteStore)
        assert store.path.is_absolute() is not relative
        assert store.path.resolve().parent == tmp_path.resolve()
        assert store.ping()


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://localhost",
        "redis://:s3cretpass@redis.internal:6380/2",
        "redis://user:s3cretpass@redis.internal/0",
        "rediss://redis.internal:6380/0",
        "REDIS://localhost",
    ],
)
def test_redis_forms_open_without_connecting(url: str) -> None:
    with open_store(url) as store:
        assert isinstance(store, RedisStore)
        assert "s3cretpass" not in repr(store) and "s3cretpass" not in store.url


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("", "The store URL is empty"),
        ("   ", "The store URL is empty"),
        ("memcached://cache:11211", "is not supported"),
        ("postgres://app:s3cretpass@db/state", "is not supported"),
        ("redis:localhost", "is not supported"),
        ("sqlite://host/a.db", "names a host"),
        ("sqlite:", "names no file"),
        ("sqlite:///", "names no file"),
        ("sqlite::memory:", "not a plain file path"),
        ("sqlite:///tmp/a.db?mode=ro", "not a plain file path"),
        ("redis://:s3cretpass@localhost:notaport/0", "is invalid"),
        ("redis://:s3cretpass@localhost/notadb", "is invalid"),
    ],
)
def test_refused_forms(url: str, fragment: str) -> None:
    with pytest.raises(StoreError) as caught:
        open_store(url)
    message = str(caught.value)
    assert fragment in message
    assert message[:1].isupper() and message.endswith("."), message
    assert "s3cretpass" not in message


def test_unsupported_scheme_names_the_accepted_forms() -> None:
    with pytest.raises(StoreError, match=r"sqlite:///absolute/path\.db.*redis://"):
        open_store("mongodb://db")


def test_missing_redis_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # makes `import redis` fail
    monkeypatch.delitem(sys.modules, "wsgi_proxy.store.redis_store")
    with pytest.raises(StoreError, match=r"install wsgi-proxy\[redis\]") as caught:
        open_store("redis://:s3cretpass@localhost/0")
    assert "s3cretpass" not in str(caught.value)


def test_open_store_returns_the_interface(tmp_path: Path) -> None:
    with open_store(str(tmp_path / "a.db")) as store:
        assert isinstance(store, Store)
