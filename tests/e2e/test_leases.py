"""Concurrent-stream slots are leases: kept while a stream lives, freed soon after its worker dies."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import typing as t
from pathlib import Path

import pytest
import requests

from wsgi_proxy.simulator import Simulator

from .conftest import UPSTREAM_KEY, Proxy, start_proxy

pytestmark = pytest.mark.e2e

KEY = "sk-lease-team-key"
LEASE_TTL = 3.0


@pytest.fixture
def gateway(simulator: Simulator, tmp_path: Path) -> t.Iterator[Proxy]:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'store_url = "sqlite:///{tmp_path / "state.db"}"\n'
        f'[[upstreams]]\nname = "sim"\nurl = "{simulator.base_url}"\napi_key_env = "SIM_KEY"\n'
        "[teams.one]\nmax_streams = 1\n"
        f'[[keys]]\nname = "k"\nteam = "one"\nsha256 = "{hashlib.sha256(KEY.encode()).hexdigest()}"\n'
    )
    env = {
        "WSGI_PROXY_CONFIG": str(config),
        "SIM_KEY": UPSTREAM_KEY,
        "WSGI_PROXY_STREAM_LEASE_TTL": str(LEASE_TTL),
        "WSGI_PROXY_WORKERS": "1",
    }
    proxy = start_proxy(tmp_path, None, env=env)
    yield proxy
    proxy.server.stop()


def _open_stream(proxy: Proxy) -> requests.Response:
    """A background stream that stays open and silent for a minute after its first events."""
    body = {
        "model": "gpt-4o-mini",
        "input": "hold a slot",
        "stream": True,
        "background": True,
        "metadata": {"sim_gap_at": "3", "sim_gap_s": "60"},
    }
    return requests.post(
        proxy.base_url + "/responses",
        data=json.dumps(body),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        stream=True,
        timeout=10,
    )


def _worker(master: int) -> int:
    (child,) = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(child)


def test_a_slot_outlives_its_ttl_while_the_stream_lives_and_frees_after_a_kill(gateway: Proxy) -> None:
    first = _open_stream(gateway)
    assert first.status_code == 200
    assert first.raw.read1(65536)  # the stream is open and relaying
    time.sleep(LEASE_TTL * 2.5)  # well past the TTL: only the refreshes keep the slot taken
    refused = _open_stream(gateway)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"

    worker = _worker(gateway.server.pid)
    os.kill(worker, signal.SIGKILL)  # no release, no finally: only the lease's expiry frees the slot
    killed_at = time.monotonic()
    first.close()
    answers = []
    while time.monotonic() - killed_at < LEASE_TTL * 6:
        try:
            answer = _open_stream(gateway)
        except requests.ConnectionError:  # the replacement worker is still starting
            time.sleep(0.2)
            continue
        answers.append(answer.status_code)
        answer.close()
        if answer.status_code == 200:
            break
        time.sleep(0.2)
    assert answers and answers[-1] == 200, answers  # the dead worker's slot expired on its own
    assert _worker(gateway.server.pid) != worker
    print(f"slot free {time.monotonic() - killed_at:.1f} s after kill -9, lease TTL {LEASE_TTL} s: {answers}")
