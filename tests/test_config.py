"""Settings: environment variables, app.config keys, and start-up failures that name the setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from wsgi_proxy.config import ConfigError, ProxySettings
from wsgi_proxy.config.gateway import GatewayConfig

CANARY = "sk-CANARY-config-123"

# What pydantic adds to its own messages: none of it belongs in an operator-facing sentence.
NOISE = ["validation error", "errors.pydantic.dev", "For further information", "input_value", "type=", "\n"]


def _load_error(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> ConfigError:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        ProxySettings.load()
    return info.value


def _assert_clean(error: ConfigError) -> None:
    message = str(error)
    for noise in NOISE:
        assert noise not in message
    assert CANARY not in message
    assert "CANARY" not in message
    # Raised `from None`: no chained pydantic traceback under the operator's sentence.
    assert error.__cause__ is None and error.__suppress_context__


def test_load_defaults_pass_through() -> None:
    settings = ProxySettings.load()
    assert settings.upstream_url == "https://api.openai.com/v1"
    assert settings.upstream_api_key is None
    assert settings.api_keys == ()
    assert settings.pass_through


@pytest.mark.parametrize(
    ("raw", "keys"),
    [
        ("client-key-1-00000000", ["client-key-1-00000000"]),
        ("client-key-1-00000000,client-key-2-00000000", ["client-key-1-00000000", "client-key-2-00000000"]),
        (
            " client-key-1-00000000 , client-key-2-00000000 ,, client-key-3-00000000 ,",
            ["client-key-1-00000000", "client-key-2-00000000", "client-key-3-00000000"],
        ),
        (
            "client-key-1-00000000,\tclient-key-2-00000000\n",
            ["client-key-1-00000000", "client-key-2-00000000"],
        ),
        (
            '["client-key-1-00000000", "client-key-2-00000000"]',
            ["client-key-1-00000000", "client-key-2-00000000"],
        ),
    ],
)
def test_load_api_keys_comma_split_and_stripped(
    monkeypatch: pytest.MonkeyPatch, raw: str, keys: list[str]
) -> None:
    monkeypatch.setenv("WSGI_PROXY_API_KEYS", raw)
    monkeypatch.setenv("WSGI_PROXY_UPSTREAM_API_KEY", "sk-up")
    settings = ProxySettings.load()
    assert [k.get_secret_value() for k in settings.api_keys] == keys
    assert not settings.pass_through


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"OPENAI_API_KEY": "sk-openai"}, "sk-openai"),
        ({"WSGI_PROXY_UPSTREAM_API_KEY": "sk-wsgi"}, "sk-wsgi"),
        ({"OPENAI_API_KEY": "sk-openai", "WSGI_PROXY_UPSTREAM_API_KEY": "sk-wsgi"}, "sk-wsgi"),
    ],
    ids=["openai_fallback", "prefixed", "prefixed_wins"],
)
def test_load_upstream_key_sources(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WSGI_PROXY_API_KEYS", "client-key-0123456789")
    settings = ProxySettings.load()
    assert settings.upstream_api_key is not None
    assert settings.upstream_api_key.get_secret_value() == expected


@pytest.mark.parametrize("value", ["", "   "])
def test_load_blank_upstream_key_is_unset(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("WSGI_PROXY_UPSTREAM_API_KEY", value)
    assert ProxySettings.load().pass_through


def test_load_unprefixed_upstream_api_key_variable_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only WSGI_PROXY_UPSTREAM_API_KEY and OPENAI_API_KEY may supply the gateway's key.
    monkeypatch.setenv("UPSTREAM_API_KEY", CANARY)
    monkeypatch.setenv("upstream_api_key", CANARY)
    assert ProxySettings.load().upstream_api_key is None


def test_keyword_upstream_key_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSGI_PROXY_UPSTREAM_API_KEY", "sk-env")
    settings = ProxySettings(upstream_api_key=SecretStr("sk-kw"), allow_anonymous=True)
    assert settings.upstream_api_key is not None
    assert settings.upstream_api_key.get_secret_value() == "sk-kw"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WSGI_PROXY_UPSTREAM_URL", "ftp://upstream.test/v1"),
        ("WSGI_PROXY_UPSTREAM_URL", "upstream.test/v1"),
        ("WSGI_PROXY_UPSTREAM_URL", "https://"),
        ("WSGI_PROXY_UPSTREAM_URL", f"https://upstream.test/v1?key={CANARY}"),
        ("WSGI_PROXY_UPSTREAM_URL", f"https://upstream.test/v1#{CANARY}"),
        ("WSGI_PROXY_CONNECT_TIMEOUT", CANARY),
        ("WSGI_PROXY_CONNECT_TIMEOUT", "0"),
        ("WSGI_PROXY_CONNECT_TIMEOUT", "-1"),
        ("WSGI_PROXY_READ_TIMEOUT", "soon"),
        ("WSGI_PROXY_READ_TIMEOUT", "0"),
        ("WSGI_PROXY_POOL_SIZE", "0"),
        ("WSGI_PROXY_POOL_SIZE", "1.5"),
        ("WSGI_PROXY_MAX_REQUEST_BYTES", "10"),
        ("WSGI_PROXY_MAX_REQUEST_BYTES", "lots"),
        ("WSGI_PROXY_MAX_EVENT_BYTES", "1023"),
        ("WSGI_PROXY_ALLOW_ANONYMOUS", CANARY),
        ("WSGI_PROXY_WATCH_DISCONNECTS", "maybe"),
    ],
)
def test_load_invalid_value_names_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    error = _load_error(monkeypatch, {name: value})
    message = str(error)
    assert message.startswith(f"{name} is invalid: ")
    assert message.count(name) >= 2  # named, and named again in what to do
    _assert_clean(error)


def test_load_upstream_key_without_client_keys_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    error = _load_error(monkeypatch, {"WSGI_PROXY_UPSTREAM_API_KEY": CANARY})
    message = str(error)
    assert "WSGI_PROXY_API_KEYS" in message
    assert "WSGI_PROXY_ALLOW_ANONYMOUS" in message
    assert message.endswith(".")
    _assert_clean(error)


def test_load_openai_api_key_without_client_keys_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    error = _load_error(monkeypatch, {"OPENAI_API_KEY": CANARY})
    assert "WSGI_PROXY_API_KEYS" in str(error)
    _assert_clean(error)


@pytest.mark.parametrize("value", ["true", "1", "yes", "TRUE"])
def test_load_allow_anonymous_serves_without_client_keys(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("WSGI_PROXY_UPSTREAM_API_KEY", CANARY)
    monkeypatch.setenv("WSGI_PROXY_ALLOW_ANONYMOUS", value)
    settings = ProxySettings.load()
    assert settings.allow_anonymous
    assert settings.api_keys == ()
    assert not settings.pass_through


def test_load_client_keys_without_upstream_key_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    error = _load_error(monkeypatch, {"WSGI_PROXY_API_KEYS": CANARY})
    message = str(error)
    assert "WSGI_PROXY_API_KEYS" in message
    assert "WSGI_PROXY_UPSTREAM_API_KEY" in message
    _assert_clean(error)


def test_load_from_app_config_mapping() -> None:
    config = {
        "WSGI_PROXY_UPSTREAM_URL": "http://upstream.test/v1/",
        "WSGI_PROXY_READ_TIMEOUT": 30,
        "WSGI_PROXY_UPSTREAM_API_KEY": CANARY,
        "WSGI_PROXY_API_KEYS": "client-key-aaaaaaaa, client-key-bbbbbbbb",
        "WSGI_PROXY_UPSTREAM_ORGANIZATION": "org-1",
        "SECRET_KEY": "flask's own",
        "TESTING": True,
        "connect_timeout": 2,
    }
    settings = ProxySettings.load(config)
    assert settings.upstream_url == "http://upstream.test/v1"
    assert settings.read_timeout == 30
    assert settings.connect_timeout == 2
    assert settings.upstream_organization == "org-1"
    assert settings.upstream_api_key is not None
    assert settings.upstream_api_key.get_secret_value() == CANARY
    assert [k.get_secret_value() for k in settings.api_keys] == ["client-key-aaaaaaaa", "client-key-bbbbbbbb"]


def test_load_mapping_overrides_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSGI_PROXY_READ_TIMEOUT", "99")
    monkeypatch.setenv("WSGI_PROXY_CONNECT_TIMEOUT", "7")
    settings = ProxySettings.load({"WSGI_PROXY_READ_TIMEOUT": "12"})
    assert (settings.read_timeout, settings.connect_timeout) == (12, 7)


def test_load_invalid_mapping_value_names_variable() -> None:
    with pytest.raises(ConfigError) as info:
        ProxySettings.load({"WSGI_PROXY_POOL_SIZE": CANARY})
    assert str(info.value).startswith("WSGI_PROXY_POOL_SIZE is invalid: ")
    _assert_clean(info.value)


def test_settings_frozen() -> None:
    settings = ProxySettings.load()
    with pytest.raises(ValueError, match="frozen"):
        settings.read_timeout = 1


def test_secrets_never_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSGI_PROXY_UPSTREAM_API_KEY", CANARY)
    monkeypatch.setenv("WSGI_PROXY_API_KEYS", f"{CANARY}-client,{CANARY}-other")
    settings = ProxySettings.load()
    for text in (repr(settings), str(settings), repr(settings.model_dump())):
        assert "CANARY" not in text


def test_api_version_without_azure_kind_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSGI_PROXY_UPSTREAM_API_VERSION", "2025-04-01-preview")
    with pytest.raises(ConfigError, match="WSGI_PROXY_UPSTREAM_KIND=azure"):
        ProxySettings.load()


@pytest.mark.parametrize("bad", ["2025 04", "v1?x=1", "a" * 65])
def test_malformed_api_version_names_the_variable(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("WSGI_PROXY_UPSTREAM_KIND", "azure")
    monkeypatch.setenv("WSGI_PROXY_UPSTREAM_API_VERSION", bad)
    with pytest.raises(ConfigError, match="WSGI_PROXY_UPSTREAM_API_VERSION"):
        ProxySettings.load()


def test_upstream_headers_from_json_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSGI_PROXY_UPSTREAM_HEADERS", '{"X-Vendor": "abc"}')
    assert ProxySettings.load().upstream_headers == {"X-Vendor": "abc"}


# --- secrets in the configuration --------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["http://user:pass@upstream.test/v1", "https://sk-secret@upstream.test/v1", "http://:pw@u.test/v1"]
)
def test_an_upstream_url_with_credentials_is_refused(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    error = _load_error(monkeypatch, {"WSGI_PROXY_UPSTREAM_URL": url})
    message = str(error)
    assert "WSGI_PROXY_UPSTREAM_URL" in message and "credentials" in message
    assert url not in message and url.split("//")[1].split("@")[0] + "@" not in message


def test_a_trailing_newline_in_the_upstream_key_is_not_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSGI_PROXY_UPSTREAM_API_KEY", "sk-upstream-from-a-file\n")
    monkeypatch.setenv("WSGI_PROXY_API_KEYS", "client-key-0123456789")
    settings = ProxySettings.load()
    assert settings.upstream_api_key is not None
    assert settings.upstream_api_key.get_secret_value() == "sk-upstream-from-a-file"


@pytest.mark.parametrize(
    ("keys", "says"),
    [
        ("x", "fewer than 16 characters"),
        ("client-key-0123456789,short", "key 2 has fewer than 16 characters"),
        ("client-key-0123456789,client-key-0123456789", "the same key is given twice"),
    ],
    ids=["one_character", "second_short", "twice"],
)
def test_weak_or_repeated_client_keys_are_refused(
    monkeypatch: pytest.MonkeyPatch, keys: str, says: str
) -> None:
    error = _load_error(monkeypatch, {"WSGI_PROXY_UPSTREAM_API_KEY": "sk-up", "WSGI_PROXY_API_KEYS": keys})
    assert "WSGI_PROXY_API_KEYS" in str(error) and says in str(error)
    assert "client-key-0123456789" not in str(error)


@pytest.mark.parametrize(
    ("kind", "chosen", "expected"),
    [
        ("openai", None, "native"),
        ("azure", None, "off"),
        ("openai-compatible", None, "off"),
        ("openai-compatible", "native", "native"),
        ("openai", "off", "off"),
    ],
)
def test_an_upstreams_websocket_mode_defaults_by_its_kind(
    kind: str, chosen: str | None, expected: str
) -> None:
    settings = ProxySettings.load(
        {"upstream_url": "http://127.0.0.1:9/v1", "upstream_kind": kind, "upstream_websockets": chosen}
    )
    (upstream,) = GatewayConfig.from_settings(settings, {}).upstreams
    assert upstream.websockets == expected


@pytest.mark.parametrize("value", ["0", "-1", "2", "fast"])
def test_a_bad_gil_switch_interval_stops_gunicorn_with_one_sentence(value: str) -> None:
    env = {
        **os.environ,
        "WSGI_PROXY_GIL_SWITCH_INTERVAL": value,
        "WSGI_PROXY_UPSTREAM_URL": "http://127.0.0.1:9/v1",
        "WSGI_PROXY_UPSTREAM_API_KEY": "sk-upstream",
        "WSGI_PROXY_API_KEYS": "sk-client-key-of-the-test",
    }
    conf = Path(__file__).resolve().parents[1] / "gunicorn.conf.py"
    done = subprocess.run(
        [sys.executable, "-c", f"import runpy; runpy.run_path({str(conf)!r})"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr == (
        "wsgi-proxy: WSGI_PROXY_GIL_SWITCH_INTERVAL must be seconds above 0, at most 1 (e.g. 0.1).\n"
    )
