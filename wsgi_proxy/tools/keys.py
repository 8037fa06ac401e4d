"""``wsgi-proxy keys``: client keys kept in the store, made, listed, rotated and revoked without
editing the configuration file or restarting anything.

A key is a name in a team, with its own limits and budgets, and one or more secrets. The store
keeps each secret only as its SHA-256 digest and its last four characters; the secret is printed
once, when it is made. Rotating makes a new secret for the same name (so its limits, budgets and
usage carry on) and lets the old ones live for a grace period. Every change is written as one
JSON audit line, to standard error and to the store's audit log (``wsgi-proxy keys audit``).
"""

from __future__ import annotations

import datetime
import getpass
import json
import re
import secrets
import socket
import sys
import time
import typing as t
from dataclasses import replace

from pydantic import ValidationError

from ..config.file import KeyLimits
from ..config.gateway import key_digest
from ..store import KeyRecord, Store

__all__ = [
    "KEY_PREFIX",
    "audit_line",
    "create_key",
    "parse_duration",
    "parse_moment",
    "render_keys",
    "revoke_key",
    "rotate_key",
]

#: Stored keys start with this, so that a leaked one is recognised for what it is.
KEY_PREFIX = "sk-wp-"
#: What ``keys list`` writes before a secret's last four characters, and ``keys revoke --hint`` reads.
_HINT_SHOWN = "..."

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, option: str) -> float:
    """Seconds from ``90s``, ``15m``, ``12h`` or ``30d``; ValueError naming ``option`` otherwise."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"{option} must be a duration such as 90s, 15m, 12h or 30d, not {text!r}.")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_moment(text: str, option: str) -> float:
    """A unix time from a UTC date or date and time (``2027-01-31``, ``2027-01-31T12:00``)."""
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{option} must be a UTC date or date and time such as 2027-01-31 or 2027-01-31T12:00,"
            f" not {text!r}."
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def _iso(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.datetime.fromtimestamp(at, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def audit_line(event: str, record: KeyRecord, **extra: t.Any) -> dict[str, t.Any]:
    """The audit line of ``event`` on ``record``: who did what to which key, never its secret."""
    return {
        "ts": round(time.time(), 3),
        "audit": event,
        "name": record.name,
        "team": record.team,
        "hint": record.hint,
        "expires_at": _iso(record.expires_at),
        **extra,
        "by": getpass.getuser(),
        "host": socket.gethostname(),
    }


def _audit(store: Store, line: dict[str, t.Any]) -> None:
    store.add_audit(line)
    print(json.dumps(line, separators=(",", ":")), file=sys.stderr)


def _secret(record_of: t.Callable[[str, str], KeyRecord], store: Store) -> tuple[str, KeyRecord]:
    """A new secret and its record (made by ``record_of(digest, hint)``), stored."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    record = record_of(key_digest(secret).hex(), secret[-4:])
    store.put_key(record)
    return secret, record


def check_limits(limits: t.Mapping[str, t.Any]) -> str:
    """The JSON of a key's own limits, checked as the configuration file checks a key's."""
    try:
        return KeyLimits.model_validate(limits).model_dump_json(exclude_none=True)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ValueError(f"--{where.replace('_', '-')}: {message}.") from None


def create_key(
    store: Store,
    name: str,
    team: str,
    *,
    teams: t.Collection[str],
    file_keys: t.Collection[str],
    limits: t.Mapping[str, t.Any],
    expires_at: float | None,
) -> str:
    """Make key ``name`` in ``team``; returns its secret (shown once). ValueError for a name that is
    taken (in the file, or in the store with a usable secret), an unknown team or bad limits."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"The key name {name!r} must be 1 to 64 letters, digits, '_', '.' or '-'.")
    if team not in teams:
        known = ", ".join(sorted(teams)) or "none"
        raise ValueError(
            f"The team {team!r} is not in the configuration file (its teams: {known}); add it there first."
        )
    if name in file_keys:
        raise ValueError(f"The configuration file already has a key named {name!r}: choose another name.")
    now = time.time()
    if any(r.name == name for r in store.list_keys()):
        raise ValueError(
            f"The store already has a key named {name!r}: rotate it (wsgi-proxy keys rotate {name}),"
            " or choose another name."
        )
    if expires_at is not None and expires_at <= now:
        raise ValueError("The expiry is in the past: give a later one.")
    checked = check_limits(limits)
    secret, record = _secret(
        lambda digest, hint: KeyRecord(digest, name, team, hint, checked, now, expires_at), store
    )
    _audit(store, audit_line("key_created", record, limits=json.loads(checked)))
    return secret


def _usable(store: Store, name: str, now: float) -> list[KeyRecord]:
    records = [r for r in store.list_keys() if r.name == name]
    if not records:
        raise ValueError(f"The store has no key named {name!r}; see wsgi-proxy keys list.")
    return [r for r in records if r.usable(now)]


def rotate_key(store: Store, name: str, *, grace_s: float, expires_at: float | None) -> str:
    """A new secret for ``name`` (same team, limits, budgets and usage); its other usable secrets
    expire ``grace_s`` seconds from now (or sooner, if they already would). Returns the secret."""
    now = time.time()
    usable = _usable(store, name, now)
    if not usable:
        raise ValueError(
            f"The key {name!r} has no usable secret left (all revoked or expired): create a new key."
        )
    if expires_at is not None and expires_at <= now:
        raise ValueError("The expiry is in the past: give a later one.")
    newest = usable[-1]
    secret, record = _secret(
        lambda digest, hint: replace(newest, digest=digest, hint=hint, created_at=now, expires_at=expires_at),
        store,
    )
    ends = now + grace_s
    for old in usable:
        if old.expires_at is None or old.expires_at > ends:
            store.put_key(replace(old, expires_at=ends))
    _audit(store, audit_line("key_rotated", record, grace_s=grace_s, old_hints=[r.hint for r in usable]))
    return secret


def revoke_key(store: Store, name: str, *, hint: str | None) -> int:
    """Revoke the usable secrets of ``name`` (only the one ending in ``hint`` when given, bare or as
    ``keys list`` shows it: ``...`` and the last four); returns how many were revoked."""
    now = time.time()
    hint = hint.removeprefix(_HINT_SHOWN) if hint is not None else None
    chosen = [r for r in _usable(store, name, now) if hint is None or r.hint == hint]
    if not chosen:
        which = f" ending in {hint!r}" if hint else ""
        raise ValueError(f"The key {name!r} has no usable secret{which} to revoke; see wsgi-proxy keys list.")
    for record in chosen:
        revoked = replace(record, revoked_at=now)
        store.put_key(revoked)
        _audit(store, audit_line("key_revoked", revoked))
    return len(chosen)


def _state(record: KeyRecord, now: float) -> str:
    if record.revoked_at is not None:
        return f"revoked {_iso(record.revoked_at)}"
    if record.expires_at is not None and record.expires_at <= now:
        return f"expired {_iso(record.expires_at)}"
    if record.expires_at is not None:
        return f"active until {_iso(record.expires_at)}"
    return "active"


def render_keys(records: t.Sequence[KeyRecord], fmt: str, now: float) -> str:
    """The stored keys as an aligned table or JSON (never a secret or a digest)."""
    rows = [
        {
            "name": r.name,
            "team": r.team,
            "hint": _HINT_SHOWN + r.hint,
            "created": _iso(r.created_at),
            "state": _state(r, now),
            "limits": json.loads(r.limits),
        }
        for r in records
    ]
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    header = ["name", "team", "secret", "created", "state", "limits"]
    lines = [header] + [
        [
            row["name"],
            row["team"],
            row["hint"],
            row["created"] or "",
            row["state"],
            json.dumps(row["limits"]) if row["limits"] else "-",
        ]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    out.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(out) + "\n"
