"""End-to-end fixtures: the simulator as upstream, the proxy under real gunicorn, the OpenAI SDK.

Everything binds to 127.0.0.1 on free ports and is stopped by its fixture; a failing test prints
the proxy's log.
"""

from __future__ import annotations

import json
import time
import typing as t
from dataclasses import dataclass
from pathlib import Path

import pytest
from openai import OpenAI

from wsgi_proxy.simulator import Simulator, SimulatorConfig
from wsgi_proxy.store import UsageRow, open_store
from wsgi_proxy.tools.launch import ServerProcess, free_port, gunicorn_argv

REPO = Path(__file__).resolve().parents[2]
GUNICORN_CONF = REPO / "gunicorn.conf.py"

# Canaries: if either string ever shows up where it must not, a test fails.
UPSTREAM_KEY = "sk-up-7Qe4Lw9Zr2Xc5Vb8Nm1Kj6Hg3"
CLIENT_KEY = "sk-cl-P0oI9uY8tR7eW6qA5sD4fG3h"


@dataclass(eq=False)  # each one is itself: the failure report collects them by identity
class Proxy:
    """A running proxy: its base URL (ending in the API prefix) and its process."""

    base_url: str
    root_url: str
    server: ServerProcess

    def client(self, api_key: str = CLIENT_KEY, **kwargs: t.Any) -> OpenAI:
        return OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=30, **kwargs)

    def log(self) -> str:
        return self.server.log()

    def access_lines(self) -> list[dict[str, t.Any]]:
        """The JSON lines the proxy logged, one per request."""
        return [json.loads(line) for line in self.log().splitlines() if line.startswith('{"ts"')]


def usage_rows(
    store_url: str, responses: int, where: t.Callable[[UsageRow], bool] = bool, timeout: float = 10.0
) -> list[UsageRow]:
    """The store's usage rows that ``where`` keeps, once they count ``responses`` responses: usage
    is recorded as an answer ends, a moment after the client has read it."""
    store = open_store(store_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            rows = [row for row in store.usage_totals() if where(row)]
            if sum(row.responses for row in rows) >= responses or time.monotonic() > deadline:
                return rows
            time.sleep(0.02)
    finally:
        store.close()


def start_proxy(
    tmp_dir: Path,
    upstream_url: str | None,
    *,
    env: t.Mapping[str, str] | None = None,
    app: str | None = None,
    prefix: str = "/v1",
    ready_path: str = "/healthz",
    extra: t.Sequence[str] = (),
) -> Proxy:
    """Start ``gunicorn -c gunicorn.conf.py`` on a free loopback port in front of ``upstream_url``."""
    port = free_port()
    settings = {"WSGI_PROXY_UPSTREAM_URL": upstream_url} if upstream_url is not None else {}
    if upstream_url is not None:  # the single-upstream shorthand; None: a WSGI_PROXY_CONFIG file in env
        settings["WSGI_PROXY_UPSTREAM_API_KEY"] = UPSTREAM_KEY
        settings["WSGI_PROXY_API_KEYS"] = f"sk-other-client-key,{CLIENT_KEY}"
    settings |= {
        "WSGI_PROXY_WORKERS": "2",
        "WSGI_PROXY_THREADS": "40",
        "WSGI_PROXY_GRACEFUL_TIMEOUT": "2",
        "WSGI_PROXY_LOG_LEVEL": "debug",
    }
    settings.update(env or {})
    server = ServerProcess(
        gunicorn_argv(f"127.0.0.1:{port}", config=GUNICORN_CONF, app=app, extra=extra),
        ready_url=f"http://127.0.0.1:{port}{ready_path}",
        env=settings,
        cwd=tmp_dir,
        log_path=tmp_dir / "proxy.log",
    )
    server.start()
    root = f"http://127.0.0.1:{port}"
    proxy = Proxy(base_url=root + prefix, root_url=root, server=server)
    _STARTED.append(proxy)
    return proxy


def start_red_and_blue(
    directory: Path,
    upstream_url: str,
    keys: t.Mapping[str, str],
    *,
    extra: str = "",
    env: t.Mapping[str, str] | None = None,
    red: str = "",
    upstream_extra: str = "",
) -> tuple[Proxy, str]:
    """A config-file gateway in front of ``upstream_url`` (the upstream ``main``) for two teams, red
    and blue (keys named ``red`` and ``blue``, read from ``RED_KEY`` and ``BLUE_KEY`` in ``keys``),
    with a SQLite store, ``upstream_extra`` TOML inside the upstream's entry, ``red`` TOML inside
    ``[teams.red]`` and ``extra`` TOML after them; returns it and its store's URL."""
    store_url = f"sqlite:///{directory / 'state.db'}"
    path = directory / "gateway.toml"
    path.write_text(
        f'store_url = "{store_url}"\n'
        f'[[upstreams]]\nname = "main"\nurl = "{upstream_url}"\napi_key_env = "UPSTREAM_KEY"\n{upstream_extra}'
        f"[teams.red]\n{red}[teams.blue]\n"
        '[[keys]]\nname = "red"\nteam = "red"\nkey_env = "RED_KEY"\n'
        '[[keys]]\nname = "blue"\nteam = "blue"\nkey_env = "BLUE_KEY"\n' + extra
    )
    settings = {"WSGI_PROXY_CONFIG": str(path), "UPSTREAM_KEY": UPSTREAM_KEY, **keys, **(env or {})}
    return start_proxy(directory, None, env=settings), store_url


def start_background(client: OpenAI, k: int, **metadata: str) -> tuple[str, list[int]]:
    """Create a background stream, read events 0..k, then drop the connection."""
    stream = client.responses.create(
        model="gpt-4o-mini", input="resume me", background=True, stream=True, metadata=metadata or None
    )
    numbers: list[int] = []
    response_id = ""
    for event in stream:
        numbers.append(event.sequence_number)
        if event.type == "response.created":
            response_id = event.response.id
        if event.sequence_number == k:
            break
    stream.close()
    return response_id, numbers


def simulator_fixture(*, delay_ms: float = 5, words: int = 12) -> t.Any:
    """A module's ``simulator`` fixture: the simulator with these pacing options, for its tests."""

    @pytest.fixture(scope="module", name="simulator")
    def fixture() -> t.Iterator[Simulator]:
        sim = Simulator(config=SimulatorConfig(api_key=UPSTREAM_KEY, delay_ms=delay_ms, words=words)).start()
        yield sim
        sim.stop()

    return fixture


simulator = simulator_fixture()


@pytest.fixture(scope="module")
def proxy(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Proxy]:
    running = start_proxy(tmp_path_factory.mktemp("proxy"), simulator.base_url)
    yield running
    running.server.stop()


@pytest.fixture
def client(proxy: Proxy) -> t.Iterator[OpenAI]:
    with proxy.client() as sdk:
        yield sdk


_STARTED: list[Proxy] = []
"""Every proxy :func:`start_proxy` made in this session, so that a failing test shows the logs of
those it made itself, not only of its ``proxy`` fixture."""
_FIRST_STARTED = pytest.StashKey[int]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_FIRST_STARTED] = len(_STARTED)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> t.Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and call.when == "call":
        given = [value for value in getattr(item, "funcargs", {}).values() if isinstance(value, Proxy)]
        made = _STARTED[item.stash.get(_FIRST_STARTED, len(_STARTED)) :]
        for running in dict.fromkeys(given + made):
            report.sections.append(
                (f"log of the proxy at {running.root_url} (last 4000 chars)", running.log()[-4000:])
            )
    return report
