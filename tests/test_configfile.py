"""The configuration file: each mistake is one sentence naming the key, never a traceback."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from wsgi_proxy.config import ConfigError, ProxySettings
from wsgi_proxy.config.file import load_config_file
from wsgi_proxy.config.gateway import GatewayConfig
from wsgi_proxy.tools.cli import main

UPSTREAM = '[[upstreams]]\nname = "main"\nurl = "https://api.openai.com/v1"\napi_key_env = "UP_KEY"\n'
KEY = '[teams.t]\n[[keys]]\nname = "k"\nteam = "t"\nsha256 = "' + hashlib.sha256(b"x").hexdigest() + '"\n'
ENV = {"UP_KEY": "sk-upstream-secret-canary"}


def _load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> object:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return load_config_file(path, ENV if env is None else env)


def test_a_valid_file_loads(tmp_path: Path) -> None:
    config = _load(tmp_path, UPSTREAM + KEY)
    assert config is not None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[[upstreams]\nname=", "is not valid TOML"),
        ("", "at upstreams: Field required"),
        (UPSTREAM.replace('"main"', '"bad name!"') + KEY, "upstreams[0] (name 'bad name!').name"),
        (UPSTREAM.replace("https://api.openai.com/v1", "ftp://x") + KEY, "upstreams[0] (name 'main').url"),
        (UPSTREAM + 'kind = "gemini"\n' + KEY, "upstreams[0] (name 'main').kind"),
        (UPSTREAM + 'api_version = "2025-04-01"\n' + KEY, "api_version is only for kind"),
        (
            UPSTREAM + "colour = 1\n" + KEY,
            "upstreams[0] (name 'main').colour: Extra inputs are not permitted",
        ),
        (UPSTREAM + UPSTREAM + KEY, "upstream names must be unique"),
        (UPSTREAM + KEY + '[[models]]\nname = "m"\nupstream = "nowhere"\n', "unknown upstream 'nowhere'"),
        (UPSTREAM + KEY + '[[models]]\nname = "m"\n', "give either upstream"),
        (
            UPSTREAM + KEY + '[[models]]\nname = "m"\nroutes = [{ upstream = "main", weight = 0 }]\n',
            "models[0] (name 'm').routes[0].weight",
        ),
        (UPSTREAM + KEY.replace('team = "t"', 'team = "other"'), "unknown team 'other'"),
        (UPSTREAM + KEY.replace('sha256 = "', 'sha256 = "zz'), "keys[0] (name 'k').sha256"),
        (UPSTREAM + KEY + 'key_env = "K"\n', "not both"),
        (UPSTREAM, "defines no [[keys]]"),
        (
            UPSTREAM + '[[upstreams]]\nname = "open"\nurl = "http://x/v1"\n' + KEY,
            "upstream 'open' has no api_key_env, but the file defines [[keys]]",
        ),
        (UPSTREAM + KEY + "[teams.t2]\nrpm = 0\n", "teams.t2.rpm"),
        (UPSTREAM + KEY + '[prices."m"]\ninput = -1\n', "prices.m.input: Input should be greater than"),
        (UPSTREAM + KEY + '[prices."m"]\noutput = 1\n', "prices.m.input: Field required"),
        (UPSTREAM + KEY + '[prices."m"]\ninput = 1\ncolour = 2\n', "prices.m.colour: Extra inputs"),
        (
            UPSTREAM
            + '[upstreams.prices."m"]\ninput = 1\n[upstreams.prices."m".tiers.flex]\ninput = "x"\n'
            + KEY,
            "upstreams[0] (name 'main').prices.m.tiers.flex.input",
        ),
    ],
)
def test_each_mistake_is_one_sentence_naming_the_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    message = str(info.value)
    assert expected in message
    assert message.endswith("start again.") or message.endswith("change the file.")
    assert "Traceback" not in message and "pydantic" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_prices_go_over_the_defaults_and_an_upstreams_over_the_files(tmp_path: Path) -> None:
    text = (
        UPSTREAM
        + '[upstreams.prices."gpt-4o"]\ninput = 1.0\n'
        + KEY
        + '[prices."gpt-4o-mini"]\ninput = 3.0\n[prices."gpt-4o"]\ninput = 2.0\n'
    )
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    settings = ProxySettings(config=path, store_url="sqlite:///" + str(tmp_path / "s.db"))
    prices = GatewayConfig.from_settings(settings, ENV).prices
    assert [
        getattr(prices.price(model, "main", None), "input", None) for model in ("gpt-4o", "gpt-4o-mini", "o3")
    ] == [
        1.0,  # the upstream's
        3.0,  # the file's
        2.0,  # the dated defaults'
    ]
    assert getattr(prices.price("gpt-4o", "elsewhere", None), "input", None) == 2.0


def test_unset_secret_variable_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="UP_KEY at upstreams\\[0\\] \\(name 'main'\\).api_key_env"):
        _load(tmp_path, UPSTREAM + KEY, env={})


def test_secret_values_never_appear_in_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, UPSTREAM + KEY + "[teams.t2]\nrpm = -1\n")
    assert ENV["UP_KEY"] not in str(info.value)


def test_config_file_with_single_upstream_variables_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WSGI_PROXY_CONFIG", str(tmp_path / "gateway.toml"))
    monkeypatch.setenv("WSGI_PROXY_API_KEYS", "client-key-aaaaaaaa,client-key-bbbbbbbb")
    with pytest.raises(ConfigError, match="WSGI_PROXY_API_KEYS would be ignored"):
        ProxySettings.load()


def test_check_config_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    good = tmp_path / "good.toml"
    good.write_text(UPSTREAM + KEY)
    bad = tmp_path / "bad.toml"
    bad.write_text(UPSTREAM)
    monkeypatch.setenv("UP_KEY", "sk-x")
    assert main(["check-config", str(good)]) == 0
    assert "is valid: 1 upstream, 0 model routes, 1 team, 1 key" in capsys.readouterr().out
    assert main(["check-config", str(bad)]) == 2
    assert "defines no [[keys]]" in capsys.readouterr().err


def _two_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: str, second: str) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(
        '[[upstreams]]\nname = "u"\nurl = "http://u.test/v1"\napi_key_env = "UP"\n'
        "[teams.red]\n[teams.blue]\n"
        '[[keys]]\nname = "alice"\nteam = "red"\nkey_env = "ALICE"\n'
        '[[keys]]\nname = "bob"\nteam = "blue"\nkey_env = "BOB"\n'
    )
    monkeypatch.setenv("UP", "sk-up")
    monkeypatch.setenv("ALICE", first)
    monkeypatch.setenv("BOB", second)
    return path


def test_the_same_key_in_two_teams_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsgi_proxy.config import GatewayConfig, ProxySettings

    path = _two_keys(tmp_path, monkeypatch, "sk-shared-key-0123456", "sk-shared-key-0123456")
    with pytest.raises(ConfigError, match="'alice' and 'bob' are the same key") as info:
        GatewayConfig.from_settings(ProxySettings(config=path))
    assert "sk-shared" not in str(info.value)


def test_a_short_key_in_the_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsgi_proxy.config import GatewayConfig, ProxySettings

    path = _two_keys(tmp_path, monkeypatch, "sk-alice-key-0123456", "b")
    with pytest.raises(ConfigError, match=r"'bob' \(BOB\) has fewer than 16 characters"):
        GatewayConfig.from_settings(ProxySettings(config=path))


def test_an_upstream_url_with_credentials_in_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text('allow_anonymous = true\n[[upstreams]]\nname = "u"\nurl = "https://me:pw@u.test/v1"\n')
    with pytest.raises(ConfigError, match=r"upstreams\[0\].*credentials") as info:
        load_config_file(path)
    assert "pw@" not in str(info.value)


@pytest.mark.parametrize("where", ["missing", "not_a_directory"])
def test_check_config_refuses_a_store_the_workers_could_not_open(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    directory = tmp_path / "no-such-dir" if where == "missing" else blocker
    path = tmp_path / "gw.toml"
    path.write_text(
        f'allow_anonymous = true\nstore_url = "sqlite:///{directory}/state.db"\n'
        '[[upstreams]]\nname = "u"\nurl = "http://u.test/v1"\n'
    )
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wsgi-proxy: The SQLite store at ") and "could not be created" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_the_default_store_is_a_private_file_in_a_private_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import stat
    import tempfile

    from wsgi_proxy.config import GatewayConfig, ProxySettings
    from wsgi_proxy.store import check_store

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = tmp_path / "gw.toml"
    path.write_text('allow_anonymous = true\n[[upstreams]]\nname = "u"\nurl = "http://u.test/v1"\n')
    saved = os.umask(0o022)  # the common default: files readable by everyone unless made otherwise
    try:
        url = GatewayConfig.from_settings(ProxySettings(config=path)).store_url
        assert url == f"sqlite:///{tmp_path}/wsgi-proxy-{os.getuid()}/state.db"
        check_store(url)
    finally:
        os.umask(saved)
    directory = tmp_path / f"wsgi-proxy-{os.getuid()}"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "state.db").stat().st_mode) == 0o600


def test_a_default_store_directory_open_to_others_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import tempfile

    from wsgi_proxy.config import GatewayConfig, ProxySettings

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / f"wsgi-proxy-{os.getuid()}").mkdir(mode=0o777)
    os.chmod(tmp_path / f"wsgi-proxy-{os.getuid()}", 0o777)  # another user could have made it so
    path = tmp_path / "gw.toml"
    path.write_text('allow_anonymous = true\n[[upstreams]]\nname = "u"\nurl = "http://u.test/v1"\n')
    with pytest.raises(ConfigError, match="not a directory of this user's alone"):
        GatewayConfig.from_settings(ProxySettings(config=path))


@pytest.mark.parametrize("variable", ["WSGI_PROXY_READ_TIMEOUT", "WSGI_PROXY_CONNECT_TIMEOUT"])
def test_timeouts_of_the_variables_are_refused_with_a_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    path = tmp_path / "gw.toml"
    path.write_text('allow_anonymous = true\n[[upstreams]]\nname = "u"\nurl = "http://u.test/v1"\n')
    monkeypatch.setenv("WSGI_PROXY_CONFIG", str(path))
    monkeypatch.setenv(variable, "20")
    with pytest.raises(ConfigError, match=f"{variable} would be ignored: .*read_timeout\\) in the file"):
        ProxySettings.load()


def test_an_upstream_names_its_websocket_mode(tmp_path: Path) -> None:
    azure = '[[upstreams]]\nname = "az"\nkind = "azure"\nurl = "https://az.example/openai/v1"\n'
    azure += 'api_key_env = "UP_KEY"\nwebsockets = "native"\n'
    path = tmp_path / "gateway.toml"
    path.write_text('store_url = "sqlite:///' + str(tmp_path / "s.db") + '"\n' + UPSTREAM + azure + KEY)
    config = GatewayConfig.from_settings(ProxySettings(config=path), ENV)
    assert [(u.name, u.websockets) for u in config.upstreams] == [("main", "native"), ("az", "native")]
    path.write_text(UPSTREAM + azure.replace('"native"', '"sometimes"') + KEY)
    with pytest.raises(ConfigError, match="websockets"):
        GatewayConfig.from_settings(ProxySettings(config=path), ENV)
