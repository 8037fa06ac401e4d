"""Keys kept in the store, through two gunicorn workers: made with ``wsgi-proxy keys`` while the
gateway runs, rotated with a grace period and revoked, each change honoured by both workers within
``WSGI_PROXY_KEY_CACHE_TTL``; the identity (name, budgets, usage) carries across rotations."""

from __future__ import annotations

import subprocess
import sys
import time
import typing as t
from pathlib import Path

import pytest
import requests

from wsgi_proxy.simulator import Simulator

from .conftest import UPSTREAM_KEY, Proxy, simulator_fixture, start_proxy, usage_rows

pytestmark = pytest.mark.e2e

TTL = 0.5
FILE_KEY = "sk-file-key-0123456789abcdef"


simulator = simulator_fixture(delay_ms=1, words=3)


@pytest.fixture(scope="module")
def gateway(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[tuple[Proxy, Path]]:
    directory = tmp_path_factory.mktemp("keys")
    config = directory / "gateway.toml"
    config.write_text(
        f'store_url = "sqlite:///{directory / "state.db"}"\nkeys_in_store = true\n'
        f'[[upstreams]]\nname = "main"\nurl = "{simulator.base_url}"\napi_key_env = "UPSTREAM_KEY"\n'
        "[teams.red]\ntokens_per_month = 1000000\n"
        '[[keys]]\nname = "filed"\nteam = "red"\nkey_env = "FILE_KEY"\n'
    )
    env = {
        "WSGI_PROXY_CONFIG": str(config),
        "UPSTREAM_KEY": UPSTREAM_KEY,
        "FILE_KEY": FILE_KEY,
        "WSGI_PROXY_KEY_CACHE_TTL": str(TTL),
    }
    proxy = start_proxy(directory, None, env=env)
    yield proxy, config
    proxy.server.stop()


def _keys(config: Path, *argv: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "wsgi_proxy", "keys", argv[0], "--config", str(config), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _statuses(proxy: Proxy, secret: str, times: int = 12) -> list[int]:
    """The status of ``times`` creates, each on a new connection (so that both workers answer)."""
    out = []
    for _ in range(times):
        with requests.Session() as session:
            answer = session.post(
                proxy.base_url + "/responses",
                json={"model": "gpt-4o-mini", "input": "hello"},
                headers={"Authorization": f"Bearer {secret}", "Connection": "close"},
                timeout=10,
            )
        out.append(answer.status_code)
    return out


def _on_both_workers(proxy: Proxy, secret: str, status: int) -> int:
    """How many creates on fresh connections it took until both workers had answered ``secret``, each
    answer ``status``. The kernel may hand a dozen connections in a row to one worker, so a fixed
    number would not prove that the other one honours the change."""
    seen = len(proxy.access_lines())
    for sent in range(1, 61):
        assert _statuses(proxy, secret, 1) == [status]
        if len({line["pid"] for line in proxy.access_lines()[seen:] if line["status"] == status}) == 2:
            return sent
    raise AssertionError(f"60 connections in a row went to one worker; the other never answered {status}")


def test_a_stored_key_is_made_rotated_and_revoked_while_both_workers_serve(
    gateway: tuple[Proxy, Path],
) -> None:
    proxy, config = gateway
    assert _statuses(proxy, FILE_KEY, 2) == [200, 200]  # the file's keys work alongside

    first = _keys(config, "create", "alice", "--team", "red", "--tokens-per-day", "100000")
    served = _on_both_workers(proxy, first, 200)  # both workers take the new key

    second = _keys(config, "rotate", "alice", "--grace", "3s")
    assert _statuses(proxy, first, 4) == [200] * 4  # within its grace period
    assert _statuses(proxy, second, 4) == [200] * 4
    time.sleep(3 + TTL + 0.2)
    _on_both_workers(proxy, first, 401)  # past it, on every worker
    assert _statuses(proxy, second, 2) == [200, 200]

    # One identity across the rotation: its usage is counted under one name.
    served += 4 + 4 + 2  # the grace period's creates with both secrets, and the new secret's after it
    rows = usage_rows(f"sqlite:///{config.parent / 'state.db'}", served, lambda row: row.key_name == "alice")
    assert sum(row.responses for row in rows) == served and {row.team for row in rows} == {"red"}

    _keys(config, "revoke", "alice")
    time.sleep(TTL + 0.3)  # each worker trusts what it read for at most TTL: then every one refuses it
    _on_both_workers(proxy, second, 401)
    audit = [line for line in _keys(config, "audit").splitlines()]
    assert [line.split('"audit":"')[1].split('"')[0] for line in audit] == [
        "key_created",
        "key_rotated",
        "key_revoked",
    ]


def test_an_expired_key_is_refused(gateway: tuple[Proxy, Path]) -> None:
    proxy, config = gateway
    secret = _keys(config, "create", "brief", "--team", "red", "--expires-in", "2s")
    assert _statuses(proxy, secret, 2) == [200, 200]
    time.sleep(2.1)
    assert _statuses(proxy, secret, 4) == [401] * 4  # at once: expiry is checked on every request


def test_an_unknown_key_is_a_401(gateway: tuple[Proxy, Path]) -> None:
    proxy, _ = gateway
    answer = requests.post(
        proxy.base_url + "/responses",
        json={"model": "gpt-4o-mini", "input": "x"},
        headers={"Authorization": "Bearer sk-wp-not-a-key-at-all-0000000000000"},
        timeout=10,
    )
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
