"""Webhook fan-out through real gunicorn: the test plays OpenAI (it signs events with the upstream's
secret and retries as OpenAI does) and two tenants' endpoints, which verify what they get with the
official SDK's ``webhooks.unwrap`` and their own secrets."""

from __future__ import annotations

import base64
import http.server
import json
import os
import threading
import time
import typing as t

import openai
import pytest
import requests
from openai import OpenAI

from wsgi_proxy.simulator import Simulator
from wsgi_proxy.wire.webhooks import sign

from .conftest import Proxy, simulator_fixture, start_red_and_blue

pytestmark = pytest.mark.e2e

KEYS = {"RED_KEY": "sk-red-hooks-0123456789abcdef", "BLUE_KEY": "sk-blue-hooks-0123456789abcdef"}


def _secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


SECRETS = {
    "UPSTREAM_HOOKS": _secret(),
    "RED_HOOKS": _secret(),
    "BLUE_HOOKS": _secret(),
    "OPS_HOOKS": _secret(),
}


class Endpoint:
    """A tenant's webhook endpoint on loopback: what it received, and how many calls to fail first."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.fail_next = 0
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if endpoint.fail_next:
                    endpoint.fail_next -= 1
                    self.send_response(500)
                else:
                    endpoint.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: t.Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def endpoints() -> t.Iterator[dict[str, Endpoint]]:
    made = {name: Endpoint() for name in ("red", "blue", "ops")}
    yield made
    for endpoint in made.values():
        endpoint.close()


simulator = simulator_fixture(delay_ms=1, words=3)


@pytest.fixture(scope="module")
def gateway(
    simulator: Simulator, endpoints: dict[str, Endpoint], tmp_path_factory: pytest.TempPathFactory
) -> t.Iterator[Proxy]:
    directory = tmp_path_factory.mktemp("webhooks")
    proxy, _ = start_red_and_blue(
        directory,
        simulator.base_url,
        KEYS,
        red=f'webhook_url = "{endpoints["red"].url}"\nwebhook_secret_env = "RED_HOOKS"\n',
        extra=f'[operator_webhook]\nwebhook_url = "{endpoints["ops"].url}"\nwebhook_secret_env = "OPS_HOOKS"\n',
        env=SECRETS,
        upstream_extra='webhook_secret_env = "UPSTREAM_HOOKS"\n',
    )
    yield proxy
    proxy.server.stop()


def _event(kind: str, object_id: str) -> bytes:
    payload = {
        "id": "evt_" + os.urandom(8).hex(),
        "object": "event",
        "created_at": int(time.time()),
        "type": kind,
    }
    return json.dumps({**payload, "data": {"id": object_id}}).encode()


def _send(
    proxy: Proxy, body: bytes, *, webhook_id: str | None = None, secret: str = SECRETS["UPSTREAM_HOOKS"]
) -> requests.Response:
    """POST one webhook as OpenAI does, signed with ``secret``."""
    webhook_id = webhook_id or "wh_" + os.urandom(8).hex()
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, webhook_id, timestamp, body),
    }
    return requests.post(proxy.base_url + "/webhooks/main", data=body, headers=headers, timeout=30)


def _unwrap(endpoint: Endpoint, secret: str) -> t.Any:
    headers, body = endpoint.received[-1]
    return OpenAI(api_key="unused").webhooks.unwrap(body, headers, secret=secret)


def test_an_event_goes_to_the_team_that_owns_the_response_and_unwraps_with_its_secret(
    gateway: Proxy, endpoints: dict[str, Endpoint]
) -> None:
    with OpenAI(base_url=gateway.base_url, api_key=KEYS["RED_KEY"], max_retries=0) as red:
        response = red.responses.create(model="gpt-4o-mini", input="hook me", background=True)
    body = _event("response.completed", response.id)
    before = {name: len(e.received) for name, e in endpoints.items()}
    answer = _send(gateway, body)
    assert answer.status_code == 200 and answer.json() == {"delivered": True}
    assert [len(e.received) - before[n] for n, e in endpoints.items()] == [1, 0, 0]  # red only
    event = _unwrap(endpoints["red"], SECRETS["RED_HOOKS"])  # the team's own secret, the SDK unchanged
    assert (event.type, event.data.id) == ("response.completed", response.id)
    assert endpoints["red"].received[-1][1] == body  # the same bytes
    with pytest.raises(openai.InvalidWebhookSignatureError):  # not with OpenAI's, nor another team's
        _unwrap(endpoints["red"], SECRETS["UPSTREAM_HOOKS"])


def test_a_forged_webhook_is_a_400_and_nothing_is_delivered(
    gateway: Proxy, endpoints: dict[str, Endpoint]
) -> None:
    before = sum(len(e.received) for e in endpoints.values())
    forged = _send(gateway, _event("response.completed", "resp_x"), secret=_secret())
    assert forged.status_code == 400 and forged.json()["error"]["code"] == "invalid_signature"
    stale = requests.post(
        gateway.base_url + "/webhooks/main",
        data=b"{}",
        headers={
            "webhook-id": "wh_1",
            "webhook-timestamp": str(int(time.time()) - 3600),
            "webhook-signature": "v1,AAAA",
        },
        timeout=10,
    )
    assert stale.status_code == 400 and "more than 300 s away" in stale.json()["error"]["message"]
    unknown = requests.post(gateway.base_url + "/webhooks/nowhere", data=b"{}", timeout=10)
    assert unknown.status_code == 404
    assert sum(len(e.received) for e in endpoints.values()) == before


def test_a_failed_delivery_is_retried_by_the_sender_and_delivered_once(
    gateway: Proxy, endpoints: dict[str, Endpoint]
) -> None:
    with OpenAI(base_url=gateway.base_url, api_key=KEYS["RED_KEY"], max_retries=0) as red:
        response = red.responses.create(model="gpt-4o-mini", input="retry me")
    body = _event("response.completed", response.id)
    red_endpoint = endpoints["red"]
    red_endpoint.fail_next = 2
    before = len(red_endpoint.received)
    statuses = []
    for _ in range(5):  # OpenAI retries a non-2xx answer, with backoff
        status = _send(gateway, body, webhook_id="wh_retry_" + response.id).status_code
        statuses.append(status)
        if status == 200:
            break
    assert statuses == [502, 502, 200]
    assert len(red_endpoint.received) == before + 1
    again = _send(gateway, body, webhook_id="wh_retry_" + response.id)  # a late duplicate
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert len(red_endpoint.received) == before + 1  # idempotent on webhook-id


def test_events_of_objects_no_team_is_known_to_own_go_to_the_operator(
    gateway: Proxy, endpoints: dict[str, Endpoint]
) -> None:
    with OpenAI(base_url=gateway.base_url, api_key=KEYS["BLUE_KEY"], max_retries=0) as blue:
        blues = blue.responses.create(model="gpt-4o-mini", input="blue has no webhook_url")
    before = {name: len(e.received) for name, e in endpoints.items()}
    for kind, object_id in (
        ("batch.completed", "batch_unknown_to_the_gateway"),
        ("fine_tuning.job.succeeded", "ftjob_abc"),
        ("response.completed", blues.id),  # blue owns it but has no webhook_url
    ):
        assert _send(gateway, _event(kind, object_id)).status_code == 200
    assert [len(e.received) - before[n] for n, e in endpoints.items()] == [0, 0, 3]
    event = _unwrap(endpoints["ops"], SECRETS["OPS_HOOKS"])
    assert event.type == "response.completed"
    line = next(line for line in reversed(gateway.access_lines()) if line["route"] == "webhook")
    assert (line["status"], line["team"], line["upstream"]) == (200, "blue", "main")
    for secret in SECRETS.values():
        assert secret not in gateway.log()
