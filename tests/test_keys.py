"""``wsgi-proxy keys`` against a real SQLite store: secrets shown once and stored as digests only,
rotation keeping the identity, revocation, audit lines; and the parsing of its options."""

from __future__ import annotations

import json
import time
import typing as t
from pathlib import Path

import pytest

from wsgi_proxy.config.gateway import key_digest
from wsgi_proxy.store.sqlite import SQLiteStore
from wsgi_proxy.tools.cli import main
from wsgi_proxy.tools.keys import KEY_PREFIX, parse_duration, parse_moment


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("12h", 43200), ("30d", 2_592_000), ("1.5h", 5400)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text, "--grace") == seconds


@pytest.mark.parametrize("text", ["", "10", "1w", "-5m", "0s", "h"])
def test_a_bad_duration_names_its_option(text: str) -> None:
    with pytest.raises(ValueError, match="--grace must be a duration such as 90s"):
        parse_duration(text, "--grace")


@pytest.mark.parametrize(
    ("text", "iso"),
    [
        ("2027-01-31", "2027-01-31T00:00:00+00:00"),
        ("2027-01-31T12:30", "2027-01-31T12:30:00+00:00"),
        ("2027-01-31T12:30+02:00", "2027-01-31T10:30:00+00:00"),
    ],
)
def test_parse_moment_is_utc_unless_told(text: str, iso: str) -> None:
    import datetime

    at = parse_moment(text, "--expires")
    assert datetime.datetime.fromtimestamp(at, tz=datetime.UTC).isoformat() == iso


def test_a_bad_moment_names_its_option() -> None:
    with pytest.raises(ValueError, match="--expires must be a UTC date"):
        parse_moment("next week", "--expires")


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    """A configuration file with teams red and blue, a file key named ``filed``, and its store."""
    store = tmp_path / "state.db"
    SQLiteStore(store).close()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'store_url = "sqlite:///{store}"\nkeys_in_store = true\n'
        '[[upstreams]]\nname = "main"\nurl = "https://api.openai.com/v1"\napi_key_env = "UP"\n'
        "[teams.red]\n[teams.blue]\n"
        '[[keys]]\nname = "filed"\nteam = "red"\nsha256 = "' + "0" * 64 + '"\n'
    )
    return config, store


def keys(
    capsys: pytest.CaptureFixture[str], config: Path, *argv: str
) -> tuple[int, str, list[dict[str, t.Any]]]:
    """Run ``wsgi-proxy keys``: its status, standard output, and the audit lines on standard error."""
    status = main(["keys", *argv[:1], "--config", str(config), *argv[1:]])
    out, err = capsys.readouterr()
    audit = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    if status == 0:
        assert all(line.startswith("{") for line in err.splitlines()), err
    return status, out, audit


def test_create_prints_the_secret_once_and_stores_only_its_digest(
    capsys: pytest.CaptureFixture[str], setup: tuple[Path, Path]
) -> None:
    config, store_path = setup
    status, out, audit = keys(
        capsys, config, "create", "alice", "--team", "red", "--tokens-per-day", "5000", "--rpm", "10"
    )
    assert status == 0
    secret = out.strip()
    assert secret.startswith(KEY_PREFIX) and len(secret) >= 40
    with SQLiteStore(store_path) as store:
        (record,) = store.list_keys()
    assert (record.name, record.team, record.hint) == ("alice", "red", secret[-4:])
    assert record.digest == key_digest(secret).hex()
    assert json.loads(record.limits) == {"rpm": 10, "tokens_per_day": 5000}
    for path in store_path.parent.iterdir():  # the database and its WAL
        assert secret.encode() not in path.read_bytes()
    assert [line["audit"] for line in audit] == ["key_created"]
    assert audit[0]["name"] == "alice" and secret not in json.dumps(audit) and audit[0]["by"]
    _, listing, _ = keys(capsys, config, "list")
    assert secret not in listing and secret[-4:] in listing and "active" in listing


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["create", "bob", "--team", "green"],
            "The team 'green' is not in the configuration file (its teams: blue, red)",
        ),
        (["create", "filed", "--team", "red"], "The configuration file already has a key named 'filed'"),
        (["create", "bad name", "--team", "red"], "The key name 'bad name' must be 1 to 64 letters"),
        (
            ["create", "bob", "--team", "red", "--rpm", "0"],
            "--rpm: Input should be greater than or equal to 1.",
        ),
        (["create", "bob", "--team", "red", "--expires", "2001-01-01"], "The expiry is in the past"),
        (["create", "bob", "--team", "red", "--expires-in", "soon"], "--expires-in must be a duration"),
        (["rotate", "nobody"], "The store has no key named 'nobody'"),
        (["revoke", "nobody"], "The store has no key named 'nobody'"),
    ],
)
def test_mistakes_are_one_sentence_and_exit_2(
    capsys: pytest.CaptureFixture[str], setup: tuple[Path, Path], argv: list[str], message: str
) -> None:
    status = main(["keys", argv[0], "--config", str(setup[0]), *argv[1:]])
    out, err = capsys.readouterr()
    assert (status, out) == (2, "")
    assert err.startswith(f"wsgi-proxy: {message}") and err.endswith(".\n") and "Traceback" not in err


def test_a_name_in_the_store_is_rotated_not_made_twice(
    capsys: pytest.CaptureFixture[str], setup: tuple[Path, Path]
) -> None:
    config, _ = setup
    assert keys(capsys, config, "create", "alice", "--team", "red")[0] == 0
    status, _, _ = keys(capsys, config, "create", "alice", "--team", "blue")
    assert status == 2


def test_rotate_keeps_the_identity_and_gives_the_old_secret_a_grace_period(
    capsys: pytest.CaptureFixture[str], setup: tuple[Path, Path]
) -> None:
    config, store_path = setup
    _, old, _ = keys(capsys, config, "create", "alice", "--team", "red", "--usd-per-day", "2.5")
    before = time.time()
    status, new, audit = keys(capsys, config, "rotate", "alice", "--grace", "10m")
    assert status == 0 and new.strip() != old.strip()
    with SQLiteStore(store_path) as store:
        first, second = store.list_keys()
    assert (first.hint, second.hint) == (old.strip()[-4:], new.strip()[-4:])
    assert (second.name, second.team, second.limits) == (first.name, first.team, first.limits)
    assert first.expires_at is not None and before + 600 <= first.expires_at <= time.time() + 600
    assert second.expires_at is None and first.usable(time.time()) and second.usable(time.time())
    assert (
        audit[0]["audit"] == "key_rotated"
        and audit[0]["grace_s"] == 600
        and audit[0]["old_hints"] == [first.hint]
    )


def test_revoke_ends_every_secret_or_the_one_named(
    capsys: pytest.CaptureFixture[str], setup: tuple[Path, Path]
) -> None:
    config, store_path = setup
    keys(capsys, config, "create", "alice", "--team", "red")
    _, new, _ = keys(capsys, config, "rotate", "alice")
    status, _, audit = keys(capsys, config, "revoke", "alice", "--hint", "..." + new.strip()[-4:])
    assert status == 0 and [line["hint"] for line in audit] == [new.strip()[-4:]]
    with SQLiteStore(store_path) as store:
        usable = [r.hint for r in store.list_keys() if r.usable(time.time())]
    assert len(usable) == 1 and usable[0] != new.strip()[-4:]
    status, _, audit = keys(capsys, config, "revoke", "alice")
    assert status == 0 and len(audit) == 1
    assert keys(capsys, config, "revoke", "alice")[0] == 2  # nothing usable is left
    _, listing, _ = keys(capsys, config, "list", "--format", "json")
    assert [row["state"].split()[0] for row in json.loads(listing)] == ["revoked", "revoked"]
    _, log, _ = keys(capsys, config, "audit")
    assert [json.loads(line)["audit"] for line in log.splitlines()] == [
        "key_created",
        "key_rotated",
        "key_revoked",
        "key_revoked",
    ]


@pytest.mark.parametrize("written", ["...-a_b", "--hint=-a_b", "--hint=...-a_b"])
def test_a_hint_that_begins_with_a_dash_is_taken_as_keys_list_shows_it(
    capsys: pytest.CaptureFixture[str],
    setup: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    written: str,
) -> None:
    """One secret in 64 ends in four characters that begin with ``-``, which alone would be
    taken for an option."""
    config, _ = setup
    monkeypatch.setattr("secrets.token_urlsafe", lambda n: "x" * 39 + "-a_b")
    keys(capsys, config, "create", "alice", "--team", "red")
    argv = ["--hint", written] if written.startswith(".") else [written]
    status, _, audit = keys(capsys, config, "revoke", "alice", *argv)
    assert status == 0 and [line["hint"] for line in audit] == ["-a_b"]


def test_a_key_the_store_cannot_check_is_refused_with_a_503_not_let_in(tmp_path: Path) -> None:
    from wsgi_proxy.config.file import TeamEntry
    from wsgi_proxy.errors import StoreUnavailable
    from wsgi_proxy.gateway.keys import StoredKeys
    from wsgi_proxy.store import KeyRecord

    store = SQLiteStore(tmp_path / "state.db")
    secret = KEY_PREFIX + "x" * 43
    store.put_key(KeyRecord(key_digest(secret).hex(), "alice", "red", "xxxx", "{}", time.time()))
    stored = StoredKeys(store, {"red": TeamEntry()}, ttl=0.0, file_keys=["filed"])
    identity = stored.identity(key_digest(secret))
    assert identity is not None and (identity.key_name, identity.team) == ("alice", "red")
    store.close()  # the store is gone: what it said can no longer be checked
    with pytest.raises(StoreUnavailable):
        stored.identity(key_digest(secret))


@pytest.mark.parametrize(
    ("record", "why"),
    [
        (dict(team="green"), "a team the file does not have"),
        (dict(name="filed"), "the name of a key of the file"),
        (dict(limits='{"rpm": 0}'), "limits that do not validate"),
        (dict(revoked_at=1.0), "revoked"),
        (dict(expires_at=1.0), "expired"),
    ],
)
def test_a_stored_key_that_cannot_be_trusted_is_refused(
    tmp_path: Path, record: dict[str, t.Any], why: str
) -> None:
    from wsgi_proxy.config.file import TeamEntry
    from wsgi_proxy.gateway.keys import StoredKeys
    from wsgi_proxy.store import KeyRecord

    with SQLiteStore(tmp_path / "state.db") as store:
        secret = KEY_PREFIX + "y" * 43
        values: dict[str, t.Any] = {"name": "alice", "team": "red", "limits": "{}", "revoked_at": None}
        values["expires_at"] = None
        values |= record
        store.put_key(KeyRecord(key_digest(secret).hex(), hint="yyyy", created_at=time.time(), **values))
        stored = StoredKeys(store, {"red": TeamEntry()}, ttl=0.0, file_keys=["filed"])
        assert stored.identity(key_digest(secret)) is None, why
