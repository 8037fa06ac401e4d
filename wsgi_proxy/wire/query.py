"""Raw query strings, edited without being rebuilt: every other parameter keeps its exact bytes."""

from __future__ import annotations

from urllib.parse import unquote_plus

__all__ = ["replace_param"]


def replace_param(query: bytes, name: str, value: bytes | None, *, first: bool = False) -> bytes:
    """``query`` with every ``name`` parameter dropped and ``name=value`` added (unless ``value`` is None).

    Keys are compared decoded (``api%2Dversion`` is ``api-version``); ``value`` must already be
    percent-encoded. The new pair goes last, or first with ``first=True``.
    """
    kept = [p for p in query.split(b"&") if p and unquote_plus(p.split(b"=", 1)[0].decode("latin-1")) != name]
    if value is None:
        return b"&".join(kept)
    pair = name.encode("ascii") + b"=" + value
    return b"&".join([pair, *kept] if first else [*kept, pair])
