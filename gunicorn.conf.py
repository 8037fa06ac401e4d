"""gunicorn settings for wsgi-proxy: `gunicorn -c gunicorn.conf.py` from the repository root.

Every value can be overridden on the command line (`-b 0.0.0.0:8000`, `-w 4`, `--threads 200`), and
the main ones by the WSGI_PROXY_* variables read below. The proxy's own settings (upstream URL,
keys, timeouts) are WSGI_PROXY_* variables too; they are validated here, before any worker starts,
so a mistake stops the server with one sentence instead of a traceback per worker.
"""

import os
import sys
import tempfile

from wsgi_proxy.config import ConfigError, GatewayConfig, ProxySettings
from wsgi_proxy.store import StoreError, check_store
from wsgi_proxy.web.serving import GIL_SWITCH_INTERVAL

try:
    _store_url = GatewayConfig.from_settings(ProxySettings.load()).store_url
    if _store_url is not None:
        check_store(_store_url)  # a missing or read-only directory stops here, not in every worker
except (ConfigError, StoreError) as exc:
    sys.stderr.write(f"wsgi-proxy: {exc}\n")
    sys.exit(2)

# Prometheus metrics from every worker add up through files in one directory (multiprocess mode).
# The variable must be set here, in the master, before any worker creates the app; without it a
# scrape would see one worker only. An operator may choose the directory (it is emptied at start).
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="wsgi-proxy-metrics-")


def on_starting(server):  # type: ignore[no-untyped-def]
    """Once per master start (not on reload): clear a previous run's metric files."""
    from wsgi_proxy.observe.metrics import prepare_multiprocess_dir

    prepare_multiprocess_dir(os.environ["PROMETHEUS_MULTIPROC_DIR"])


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    """A dead worker's open streams stop counting; its totals stay."""
    from wsgi_proxy.observe.metrics import mark_worker_dead

    mark_worker_dead(worker.pid)


# The app: the standalone factory. A host app is served with `gunicorn -c gunicorn.conf.py host:app`.
wsgi_app = "wsgi_proxy:create_app()"

# Loopback by default, so that nothing is exposed by accident; use -b 0.0.0.0:8000 behind a load balancer.
bind = os.environ.get("WSGI_PROXY_BIND", "127.0.0.1:8000")

# gthread: plain threads, no monkey-patching, no asyncio. Each open stream holds one thread for its
# whole life (a background stream can last many minutes), so threads, not workers, bound the number
# of concurrent streams: workers x threads. An open stream costs about 72 KB of RSS (71 KB measured by
# benchmarks/capacity.py; a thread's 8 MiB stack is virtual), and threads are only created when needed.
worker_class = "gthread"
workers = int(os.environ.get("WSGI_PROXY_WORKERS", "2"))  # >= 2: one can restart while the other serves
threads = int(os.environ.get("WSGI_PROXY_THREADS", "500"))
# Each thread may hold one upstream connection: a smaller pool would open (and discard, with a
# warning) a connection per request beyond it. The workers read it when they build the app.
os.environ.setdefault("WSGI_PROXY_POOL_SIZE", str(max(threads, 1)))

# Sockets one worker accepts: every busy thread plus idle keep-alive connections. gthread keeps at most
# worker_connections - threads idle connections, so leave room above `threads`.
worker_connections = threads + 500
keepalive = 5  # seconds an idle client connection is kept between requests

# How long a worker's thread may keep the GIL while others wait for it (Python's default: 5 ms; why
# 0.1 s: wsgi_proxy.web.serving.GIL_SWITCH_INTERVAL). post_worker_init below hands it to the workers.
try:
    _switch_interval = float(os.environ.get("WSGI_PROXY_GIL_SWITCH_INTERVAL", str(GIL_SWITCH_INTERVAL)))
    if not 0 < _switch_interval <= 1:
        raise ValueError
except ValueError:
    sys.stderr.write(
        "wsgi-proxy: WSGI_PROXY_GIL_SWITCH_INTERVAL must be seconds above 0, at most 1 (e.g. 0.1).\n"
    )
    sys.exit(2)

# In gthread, `timeout` is the worker heartbeat, not a request limit: long streams are not killed by it.
timeout = 30
# On SIGTERM/SIGHUP, how long open streams may run on before the worker is stopped. Streams cut then
# end without a clean terminator, so clients see an error and can resume with starting_after.
graceful_timeout = int(os.environ.get("WSGI_PROXY_GRACEFUL_TIMEOUT", "30"))

# The proxy writes one JSON line per request to stdout itself (streams when they end); gunicorn's
# own access log is off unless asked for. Errors and the proxy's warnings go to stderr.
accesslog = os.environ.get("WSGI_PROXY_ACCESS_LOG") or None
# gunicorn's default format, without %(u)s: that is the user name of Basic auth, a client's key.
access_log_format = '%(h)s %(l)s - %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'
errorlog = "-"
loglevel = os.environ.get("WSGI_PROXY_LOG_LEVEL", "info")

# No max_requests by default: a recycled worker ends its open streams (background ones are resumable;
# see post_worker_init below and the README's sizing section).
max_requests = 0

# gunicorn 24+ opens a control socket at ~/.gunicorn/gunicorn.ctl; several instances on one host
# would fight over it and the proxy does not use it.
control_socket_disable = True


def post_worker_init(worker):  # type: ignore[no-untyped-def]
    """Take the GIL switch interval above; end open streams deliberately on SIGTERM, SIGHUP or
    max_requests, and refuse new connections at once while draining (see
    wsgi_proxy.web.serving.prepare_worker)."""
    from wsgi_proxy.web.serving import prepare_worker

    prepare_worker(worker, switch_interval=_switch_interval)
