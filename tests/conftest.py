"""Unit-tier fixtures: a clean environment, an app factory, a mocked upstream and a Redis server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import typing as t

import pytest
import responses
from flask import Flask

from wsgi_proxy import ProxySettings, create_app
from wsgi_proxy.tools.launch import free_port

UPSTREAM = "http://upstream.test/v1"

# Read once at import: _clean_environ removes every WSGI_PROXY_* variable before each test.
REQUIRE_REDIS = os.environ.get("WSGI_PROXY_REQUIRE_REDIS") == "1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """End-to-end tests run gunicorn and the simulator as processes: they belong to the slow tier."""
    for item in items:
        if item.get_closest_marker("e2e") is not None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings must come from the test, never from the developer's shell."""
    for name in list(os.environ):
        if name.startswith("WSGI_PROXY_") or name == "OPENAI_API_KEY":
            monkeypatch.delenv(name)


@pytest.fixture
def make_app() -> t.Callable[..., Flask]:
    """Build a standalone proxy app from keyword settings (upstream defaults to ``UPSTREAM``)."""

    def factory(**settings: t.Any) -> Flask:
        settings.setdefault("upstream_url", UPSTREAM)
        app = create_app(ProxySettings(**settings))
        app.testing = True
        return app

    return factory


@pytest.fixture
def mocked() -> t.Iterator[responses.RequestsMock]:
    """The upstream, played by ``responses``; unmatched requests raise ConnectionError."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[str]:
    """A throwaway ``redis-server`` on a free loopback port, without persistence; yields its URL.

    Skips when the binary is missing, unless ``WSGI_PROXY_REQUIRE_REDIS=1`` (as CI sets) makes
    that a failure.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        message = (
            "redis-server is not installed: apt-get install redis-server to run the Redis contract tests"
        )
        if REQUIRE_REDIS:
            pytest.fail(f"{message} (WSGI_PROXY_REQUIRE_REDIS=1 makes them mandatory)")
        pytest.skip(message)
    log_path = tmp_path_factory.mktemp("redis") / "redis.log"
    for _ in range(3):  # another process may take the free port before redis-server binds it
        port = free_port()
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if _wait_for_pong(process, port, timeout=10.0):
            break
        _stop(process)
    else:
        pytest.fail(f"redis-server did not start:\n{log_path.read_text(errors='replace')}")
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(process)


def _wait_for_pong(process: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    """Wait until the server on ``port`` answers PING; False if it exits or stays silent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return True
        except OSError:
            pass
        time.sleep(0.02)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop ``process`` by its PID: SIGTERM, then SIGKILL if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
