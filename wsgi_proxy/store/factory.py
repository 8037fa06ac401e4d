"""Open the store a URL names: an SQLite file (the default) or a Redis server."""

from __future__ import annotations

import os
import re
from urllib.parse import unquote

from .base import Store, StoreError, redact_url
from .sqlite import SQLiteStore

__all__ = ["check_store", "open_store"]

_ACCEPTED = (
    "sqlite:///absolute/path.db, sqlite:relative/path.db, a bare file path,"
    " or redis://[:password@]host[:port][/db] (rediss:// for TLS)"
)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def open_store(url: str, *, create: bool = True) -> Store:
    """Open the store named by ``url``; raise :class:`StoreError` for a form that is not accepted.

    ``sqlite:///absolute/path.db``, ``sqlite:relative/path.db`` or a bare path open an
    :class:`~wsgi_proxy.store.sqlite.SQLiteStore` (created if missing); ``redis://`` and
    ``rediss://`` URLs open a :class:`~wsgi_proxy.store.redis_store.RedisStore`, which needs the
    ``redis`` extra. A password in ``url`` never appears in an error message.

    :param create: False to refuse an SQLite file that does not exist yet, for tools that only
        read a gateway's store and would otherwise report on a new, empty file after a typo.
    """
    text = url.strip()
    if not text:
        raise StoreError(f"The store URL is empty; set it to one of {_ACCEPTED}.")
    match = _SCHEME.match(text)
    if match is None:
        return _open_sqlite(text, text, create)
    scheme = match.group(1).lower()
    rest = text[match.end() :]
    text = f"{scheme}:{rest}"  # schemes are case-insensitive, redis-py's parser is not
    if scheme == "sqlite":
        return _open_sqlite(text, _sqlite_path(text, rest), create)
    if scheme in ("redis", "rediss") and rest.startswith("//"):
        return _open_redis(text)
    raise StoreError(f"The store URL {redact_url(text)} is not supported; use one of {_ACCEPTED}.")


def _sqlite_path(url: str, rest: str) -> str:
    """The file path of an ``sqlite:`` URL (``rest`` is what follows the scheme)."""
    if rest.startswith("//"):
        # sqlite:///abs/path.db (and SQLAlchemy's sqlite:////abs/path.db) name an absolute path;
        # anything between the slashes would be a host, which a file has not.
        if not rest.startswith("///"):
            raise StoreError(
                f"The store URL {url} names a host, which an SQLite file cannot have; write"
                " sqlite:///absolute/path.db (three slashes) or sqlite:relative/path.db."
            )
        path = "/" + rest.lstrip("/")
    else:
        path = rest
    path = unquote(path)
    if not path.strip("/"):
        raise StoreError(f"The store URL {url} names no file; write sqlite:///absolute/path.db.")
    if path == ":memory:" or "?" in path:
        raise StoreError(
            f"The store URL {url} is not a plain file path: an in-memory database or query options cannot"
            " be shared by the gateway's threads and workers, so give a file such as"
            " sqlite:///var/lib/wsgi-proxy/state.db."
        )
    return path


def _open_sqlite(url: str, path: str, create: bool) -> Store:
    if not create and not os.path.isfile(path):
        raise StoreError(
            f"The store URL {url} names the SQLite file {os.path.abspath(path)}, which does not exist;"
            " check the path, or name the store the gateway writes to."
        )
    return SQLiteStore(path)


def _open_redis(url: str) -> Store:
    try:
        from .redis_store import RedisStore
    except ImportError as exc:
        if exc.name != "redis":
            raise
        raise StoreError(
            f"The store URL {redact_url(url)} needs the redis package, which is not installed; install"
            " wsgi-proxy[redis] (pip install 'wsgi-proxy[redis]')."
        ) from None
    return RedisStore(url)


def check_store(url: str) -> None:
    """Open the store once and close it: what the workers will do, before any of them starts.

    An SQLite store whose directory is missing or read-only is refused here with a sentence
    (:class:`StoreError`), instead of failing in every worker. A Redis store is not dialled: a
    server that is down at start-up is what readiness (``/readyz``) reports.
    """
    if url.strip().lower().startswith(("redis:", "rediss:")):
        return
    open_store(url).close()
