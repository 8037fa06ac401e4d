"""Standard Webhooks signatures and webhook events as pure functions, checked against the official
SDK's own verification; and the configuration of the fan-out."""

from __future__ import annotations

import base64
import time
import typing as t
from pathlib import Path

import pytest
from openai import OpenAI

from wsgi_proxy.config import ConfigError
from wsgi_proxy.config.file import load_config_file
from wsgi_proxy.wire.webhooks import Event, SignatureRejected, event_of, sign, verify

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789").decode()
BODY = b'{"id":"evt_1","object":"event","created_at":1,"type":"response.completed","data":{"id":"resp_1"}}'


def _headers(
    webhook_id: str = "wh_1", timestamp: int | None = None, signature: str | None = None
) -> dict[str, str]:
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature or sign(SECRET, webhook_id, timestamp, BODY),
    }


@pytest.mark.parametrize("secret", [SECRET, "a-plain-secret"])
def test_what_is_signed_here_the_sdk_accepts(secret: str) -> None:
    now = int(time.time())
    headers = {
        "webhook-id": "wh_1",
        "webhook-timestamp": str(now),
        "webhook-signature": sign(secret, "wh_1", now, BODY),
    }
    event = OpenAI(api_key="unused").webhooks.unwrap(BODY, headers, secret=secret)
    assert event.type == "response.completed"
    assert verify(secret, headers.get, BODY, now) == "wh_1"


def _resigned_without_version() -> dict[str, str]:
    headers = _headers()
    return {**headers, "webhook-signature": headers["webhook-signature"][3:]}


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (lambda: {**_headers(), "webhook-signature": "v1,AAAA"}, "no signature matches"),
        (lambda: {**_headers(), "webhook-id": "wh_2"}, "no signature matches"),  # signed for another id
        (lambda: _headers(timestamp=int(time.time()) - 301), "more than 300 s away"),
        (lambda: _headers(timestamp=int(time.time()) + 301), "more than 300 s away"),
        (lambda: {**_headers(), "webhook-timestamp": "soon"}, "not a number of seconds"),
        (lambda: {k: v for k, v in _headers().items() if k != "webhook-signature"}, "is missing"),
        (lambda: {**_headers(), "webhook-id": "a b"}, "not an id"),
        (_resigned_without_version, "no signature matches"),  # a signature without its v1,
    ],
    ids=["bad", "other_id", "old", "future", "timestamp", "missing", "id", "unversioned"],
)
def test_what_does_not_hold_is_rejected_saying_why(
    headers: t.Callable[[], dict[str, str]], message: str
) -> None:
    # The headers are made when the test runs: a timestamp made at collection would age meanwhile.
    with pytest.raises(SignatureRejected, match=message):
        verify(SECRET, headers().get, BODY, time.time())


def test_one_of_several_signatures_is_enough_and_a_changed_body_is_not() -> None:
    headers = _headers()
    headers["webhook-signature"] = "v1,AAAA " + headers["webhook-signature"]
    assert verify(SECRET, headers.get, BODY, time.time()) == "wh_1"
    with pytest.raises(SignatureRejected):
        verify(SECRET, headers.get, BODY + b" ", time.time())


@pytest.mark.parametrize(
    ("body", "event"),
    [
        (BODY, Event("response.completed", "resp_1")),
        (b'{"type":"batch.completed","data":{"id":"batch_1"}}', Event("batch.completed", "batch_1")),
        (b'{"type":"eval.run.failed","data":{}}', Event("eval.run.failed", None)),
        (b'{"type":"x","data":{"id":"a b"}}', Event("x", None)),  # not an id: nobody's
        (b'{"type":"x","data":{"id":7}}', Event("x", None)),
        (b'{"data":{"id":"resp_1"}}', None),
        (b"[1]", None),
        (b"not json", None),
    ],
)
def test_event_of(body: bytes, event: Event | None) -> None:
    assert event_of(body) == event


UPSTREAM = (
    '[[upstreams]]\nname = "main"\nurl = "https://api.openai.com/v1"\napi_key_env = "UP"\n'
    'webhook_secret_env = "UP_HOOKS"\n'
)
KEY = '[[keys]]\nname = "k"\nteam = "t"\nsha256 = "' + "0" * 64 + '"\n'


@pytest.mark.parametrize(
    ("teams", "env", "message"),
    [
        (
            '[teams.t]\nwebhook_url = "https://t.example/hooks"\n',
            {},
            "give webhook_url and webhook_secret_env together",
        ),
        (
            '[teams.t]\nwebhook_url = "ftp://t"\nwebhook_secret_env = "T"\n',
            {"T": SECRET},
            "teams.t.webhook_url",
        ),
        (
            '[teams.t]\nwebhook_url = "https://t.example"\nwebhook_secret_env = "T"\n',
            {},
            "names the environment variable T",
        ),
        ("[teams.t]\n", {"UP_HOOKS": "whsec_not*base64"}, "UP_HOOKS starts with whsec_ but is not base64"),
    ],
)
def test_webhook_settings_are_checked_with_one_sentence(
    tmp_path: Path, teams: str, env: dict[str, str], message: str
) -> None:
    from wsgi_proxy.config import GatewayConfig, ProxySettings

    path = tmp_path / "gateway.toml"
    path.write_text(UPSTREAM + teams + KEY)
    environ = {"UP": "sk-up", "UP_HOOKS": SECRET, **env}
    with pytest.raises(ConfigError, match=message.replace("(", "\\(")):
        load_config_file(path, environ)
        GatewayConfig.from_settings(
            ProxySettings(config=path, store_url=f"sqlite:///{tmp_path / 's.db'}"), environ
        )


def test_the_secrets_never_show_in_the_configs_repr(tmp_path: Path) -> None:
    from wsgi_proxy.config import GatewayConfig, ProxySettings

    path = tmp_path / "gateway.toml"
    path.write_text(
        UPSTREAM + '[teams.t]\nwebhook_url = "https://t.example"\nwebhook_secret_env = "T"\n' + KEY
    )
    environ: t.Mapping[str, str] = {"UP": "sk-up", "UP_HOOKS": SECRET, "T": "whsec_dGVhbS1zZWNyZXQtY2FuYXJ5"}
    config = GatewayConfig.from_settings(
        ProxySettings(config=path, store_url=f"sqlite:///{tmp_path / 's.db'}"), environ
    )
    assert config.webhooks.teams["t"].url == "https://t.example"
    assert "dGVhbS1zZWNyZXQtY2FuYXJ5" not in repr(config) and SECRET not in repr(config)
