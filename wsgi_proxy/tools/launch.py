"""Start and stop a gunicorn-served proxy as a child process (the demo, tests and benchmarks use it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import typing as t
from pathlib import Path

import requests

__all__ = ["NGINX_LOCATION", "ServerProcess", "free_port", "gunicorn_argv", "nginx_server"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gunicorn_argv(
    bind: str,
    *,
    app: str | None = None,
    config: str | Path | None = None,
    workers: int = 1,
    threads: int = 32,
    extra: t.Sequence[str] = (),
) -> list[str]:
    """The command line of gunicorn serving ``app`` on ``bind`` with gthread workers.

    With ``config`` the file's settings apply and only ``bind`` (and ``app`` if given) override
    them; without it, ``workers`` and ``threads`` are passed explicitly.
    """
    argv = [sys.executable, "-m", "gunicorn"]
    if config is not None:
        argv += ["-c", str(config), "-b", bind]
    else:
        argv += ["-k", "gthread", "-w", str(workers), "--threads", str(threads), "-b", bind]
        argv += ["--graceful-timeout", "3", "--keep-alive", "5"]
    argv += list(extra)
    if app is not None:
        argv.append(app)
    elif config is None:
        argv.append("wsgi_proxy:create_app()")
    return argv


#: The README's nginx ``http``-level map: WebSocket upgrades get ``Connection: upgrade``, every other
#: request an empty Connection header (keep-alive to gunicorn).
NGINX_HTTP = """
    map $http_upgrade $connection_upgrade { default upgrade; "" ""; }
"""

#: The README's nginx location block for the proxy, as the tests and benchmarks run it.
NGINX_LOCATION = """
        proxy_pass http://wsgi_proxy;
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $connection_upgrade;
        proxy_set_header Host $host;
        proxy_buffering off;
        proxy_read_timeout 3600s;
        proxy_send_timeout 3600s;
        client_max_body_size 64m;
"""


def nginx_server(port: int, upstream_port: int, directory: Path) -> ServerProcess:
    """nginx in the foreground on ``port`` in front of a proxy on ``upstream_port``, its files in
    ``directory``: the README's deployment, with its timeouts for slow clients."""
    config = directory / "nginx.conf"
    config.write_text(
        f"""
daemon off;
user root;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    client_header_timeout 10s;
    client_body_timeout 10s;
{NGINX_HTTP}    upstream wsgi_proxy {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{{NGINX_LOCATION}        }}
    }}
}}
"""
    )
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return ServerProcess(
        [nginx, "-c", str(config), "-p", str(directory)],
        ready_url=f"http://127.0.0.1:{port}/healthz",
        cwd=directory,
        log_path=directory / "nginx.log",
    )


class ServerProcess:
    """A server child process: started, probed until ready, stopped by its PID.

    :param argv: the command line.
    :param ready_url: polled until it answers 200.
    :param env: extra environment variables (added to this process's environment).
    :param cwd: the working directory (a fresh temporary one by default, so no stray
        ``gunicorn.conf.py`` is picked up).
    :param log_path: where stdout and stderr go (a temporary file by default).
    """

    def __init__(
        self,
        argv: t.Sequence[str],
        *,
        ready_url: str,
        env: t.Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        log_path: str | Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.ready_url = ready_url
        self.env = dict(os.environ) | dict(env or {})
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if cwd is None or log_path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="wsgi-proxy-")
            scratch = Path(self._tmp.name)
        self.cwd = Path(cwd) if cwd is not None else scratch
        self.log_path = Path(log_path) if log_path is not None else scratch / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "the server was not started"
        return self.process.pid

    def start(self, timeout: float = 30.0) -> ServerProcess:
        """Start the process and wait until ``ready_url`` answers 200; raise with the log if not."""
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.ready_url, timeout=1).status_code == 200:
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the server did not become ready within {timeout:.0f} s:\n{self.log()}")

    def log(self) -> str:
        """Everything the server wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signum)

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop the process (SIGTERM, then SIGKILL after ``timeout``); return its exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait(timeout)
        return self.process.returncode

    def close(self) -> None:
        """Stop the process and remove the temporary directory it was given, if any."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
