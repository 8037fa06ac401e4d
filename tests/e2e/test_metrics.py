"""Prometheus metrics under gunicorn: the values of every worker add up in one scrape."""

from __future__ import annotations

import json
import typing as t

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from wsgi_proxy.simulator import Simulator

from .conftest import CLIENT_KEY, Proxy, start_proxy

pytestmark = pytest.mark.e2e

TOKEN = "scrape-token-e2e"


@pytest.fixture(scope="module")
def metered(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Proxy]:
    tmp = tmp_path_factory.mktemp("metered")
    proxy = start_proxy(
        tmp,
        simulator.base_url,
        env={"WSGI_PROXY_METRICS_TOKEN": TOKEN, "PROMETHEUS_MULTIPROC_DIR": str(tmp / "prom")},
    )
    yield proxy
    proxy.server.stop()


def _samples(proxy: Proxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(
        proxy.root_url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5
    ).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def test_metrics_add_up_across_two_workers(metered: Proxy) -> None:
    assert requests.get(metered.root_url + "/metrics", timeout=5).status_code == 401
    before = _samples(metered)
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
    sent = 0
    while sent < 200 and (sent < 24 or len(_create_pids(metered)) < 2):
        # A new connection each time, so that both workers take some.
        body = {"model": "gpt-4o-mini", "input": "count me", "stream": sent % 2 == 0}
        answer = requests.post(metered.base_url + "/responses", json=body, headers=auth, timeout=10)
        assert answer.status_code == 200
        answer.close()
        sent += 1
    assert len(_create_pids(metered)) == 2  # both workers served creates...
    after = _samples(metered)
    created = _total(after, "wsgi_proxy_requests_total", route="create", status="200") - _total(
        before, "wsgi_proxy_requests_total", route="create", status="200"
    )
    assert created == sent  # ...and one scrape counted them all
    assert (
        _total(after, "wsgi_proxy_events_total") - _total(before, "wsgi_proxy_events_total") > sent // 2 * 5
    )
    assert _total(after, "wsgi_proxy_time_to_first_event_seconds_count") >= sent // 2
    assert _total(after, "wsgi_proxy_open_streams") == 0


def _create_pids(proxy: Proxy) -> set[int]:
    lines = [json.loads(line) for line in proxy.log().splitlines() if line.startswith("{")]
    return {line["pid"] for line in lines if line["route"] == "create"}
