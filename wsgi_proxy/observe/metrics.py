"""Prometheus metrics of one proxy: requests, latencies, open streams, upstream errors, rate limits,
usage and cost.

Under gunicorn every worker is a process of its own, so in-memory counters would each describe one
worker only, and a scrape would see whichever worker answered it. prometheus_client's *multiprocess
mode* has every process write its values to files in one shared directory instead, and
:meth:`Metrics.render` adds them up. The mode is on when ``PROMETHEUS_MULTIPROC_DIR`` names a
directory **at the moment a** :class:`Metrics` **is created**, so it must be set before the app is
created, in the gunicorn master, so that every worker inherits it:

- ``on_starting`` (or the import of gunicorn.conf.py) calls :func:`prepare_multiprocess_dir`,
  which creates the directory, empties it of a previous run's files and exports the variable;
- ``child_exit`` calls :func:`mark_worker_dead`, so that a dead worker's open streams stop counting.

Without the variable the metrics live in the process that created them, which is right for a
single process (the Flask development server, tests) and wrong for several gunicorn workers.

Every label value comes from a small fixed set (route names, HTTP methods and status codes, the
configured upstream and team names, error kinds, usage counters), so the number of series stays
bounded.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import threading
import typing as t

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from ..config.prices import usd
from ..config.settings import ConfigError
from ..wire.usage import Usage

__all__ = [
    "FIRST_EVENT_BUCKETS",
    "MULTIPROC_ENV",
    "Metrics",
    "REQUEST_BUCKETS",
    "mark_worker_dead",
    "prepare_multiprocess_dir",
]

#: The variable that turns multiprocess mode on (prometheus_client's own name for it).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Seconds a whole request takes: from a cached 1 ms answer to a 10-minute reasoning stream.
REQUEST_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip

#: Seconds until a stream's first event: from 10 ms to a reasoning model's two silent minutes.
FIRST_EVENT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)

# The classic text format that generate_latest writes. prometheus_client's CONTENT_TYPE_LATEST names
# it in 0.20 but names the 1.0.0 format from 0.22 on, so it is spelled out here.
_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_M = t.TypeVar("_M", bound=MetricWrapperBase)

# prometheus_client chooses where values are kept (memory or per-process files) once, at import, from
# the environment, through the module-level `values.ValueClass` that every new series is built with.
# gunicorn's master imports this package (and so prometheus_client) while reading gunicorn.conf.py,
# possibly before the variable is set, and its workers inherit that choice through fork(). So each
# Metrics picks the class itself, from the variable as it is when the Metrics is created, and
# reinstates it whenever it creates a series. The lock keeps two Metrics from interleaving that.
# Reentrant: a relay abandoned without close() is finished by the garbage collector, which can run
# while this thread already holds the lock (seen in tests: a deadlock with a plain Lock).
_value_class_lock = threading.RLock()
# One file-backed class per directory: two classes would each map this process's files separately
# and overwrite each other's entries.
_file_value_classes: dict[str, type[t.Any]] = {}


def _multiprocess_dir() -> str | None:
    """The shared directory if multiprocess mode is on, else None; a blank variable counts as unset."""
    directory = os.environ.get(MULTIPROC_ENV, "").strip()
    return os.path.abspath(directory) if directory else None


def _value_class(directory: str | None) -> type[t.Any]:
    """prometheus_client's value class that keeps values in memory, or in files in ``directory``."""
    if directory is None:
        return values.MutexValue
    with _value_class_lock:
        chosen = _file_value_classes.get(directory)
        if chosen is None:
            current = values.ValueClass
            if getattr(current, "_multiprocess", False) and current not in _file_value_classes.values():
                # prometheus_client made it at import, from the variable that names this directory.
                chosen = current
            else:
                chosen = values.MultiProcessValue()  # type: ignore[no-untyped-call]
            _file_value_classes[directory] = chosen
        return chosen


class Metrics:
    """Prometheus metrics of one proxy; works across gunicorn workers (multiprocess mode) when
    ``PROMETHEUS_MULTIPROC_DIR`` is set, and in-process otherwise.

    The mode is read once, here: set the variable before the app (and so this object) is created.
    In multiprocess mode every value is written to this process's files in the shared directory,
    whatever ``registry`` is, and :meth:`render` reports the sum over all the files, this process's
    and its sibling workers' alike. Two instances in one process then add to the same series: that
    is the process's total, which is what a scrape of the workers wants.

    :param registry: where the metrics are registered; by default a fresh private one, never
        prometheus_client's global ``REGISTRY``, so that two apps (or tests) in one process never
        clash with "Duplicated timeseries". In multiprocess mode, expose them through
        :meth:`render`, not through ``registry``, which sees this process's values only.
    :raises ConfigError: if ``PROMETHEUS_MULTIPROC_DIR`` is set but is not a directory.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.multiprocess_dir = _multiprocess_dir()
        """The directory shared by the workers, or None when the values live in this process only."""
        if self.multiprocess_dir is not None and not os.path.isdir(self.multiprocess_dir):
            raise ConfigError(
                f"{MULTIPROC_ENV} is set to {self.multiprocess_dir!r}, which is not a directory: create it"
                " (prepare_multiprocess_dir does, from gunicorn's on_starting hook) or unset"
                f" {MULTIPROC_ENV}."
            )
        self.registry = registry if registry is not None else CollectorRegistry()
        """The registry the metric objects are registered in."""
        self._values = _value_class(self.multiprocess_dir)
        self._children: dict[tuple[int, tuple[str, ...]], t.Any] = {}
        reg = self.registry
        with _installed(self._values):
            self._requests = Counter(
                "wsgi_proxy_requests_total",
                "Requests answered, by route, method, HTTP status and upstream.",
                ("route", "method", "status", "upstream"),
                registry=reg,
            )
            self._request_seconds = Histogram(
                "wsgi_proxy_request_seconds",
                "Seconds from a request's arrival to the end of its answer (of the whole stream).",
                ("route", "upstream"),
                buckets=REQUEST_BUCKETS,
                registry=reg,
            )
            self._first_event_seconds = Histogram(
                "wsgi_proxy_time_to_first_event_seconds",
                "Seconds from a streaming request's arrival to its first event.",
                ("route", "upstream"),
                buckets=FIRST_EVENT_BUCKETS,
                registry=reg,
            )
            # livesum: the sum over the workers alive now; a dead worker's streams are gone with it.
            self._open_streams = Gauge(
                "wsgi_proxy_open_streams",
                "Event streams being relayed now.",
                multiprocess_mode="livesum",
                registry=reg,
            )
            self._events = Counter("wsgi_proxy_events_total", "SSE events relayed to clients.", registry=reg)
            self._bytes = Counter("wsgi_proxy_bytes_total", "Bytes of event streams relayed.", registry=reg)
            self._resumes = Counter(
                "wsgi_proxy_resumes_total",
                "Broken background streams re-opened upstream, by upstream.",
                ("upstream",),
                registry=reg,
            )
            self._upstream_errors = Counter(
                "wsgi_proxy_upstream_errors_total",
                "Failures to get or relay an upstream answer, by upstream and kind.",
                ("upstream", "kind"),
                registry=reg,
            )
            self._open_websockets = Gauge(
                "wsgi_proxy_open_websockets",
                "Client WebSocket connections being relayed now.",
                multiprocess_mode="livesum",
                registry=reg,
            )
            self._websocket_frames = Counter(
                "wsgi_proxy_websocket_frames_total",
                "WebSocket messages relayed, by direction (in: from clients, out: to clients).",
                ("direction",),
                registry=reg,
            )
            self._websocket_errors = Counter(
                "wsgi_proxy_websocket_errors_total",
                "Error frames sent to WebSocket clients (the proxy's and the upstream's), by code.",
                ("code",),
                registry=reg,
            )
            self._affinity_failovers = Counter(
                "wsgi_proxy_affinity_failovers_total",
                "Calls of a session pinned to an upstream served by another, because the pinned one failed.",
                ("upstream",),
                registry=reg,
            )
            self._rate_limited = Counter(
                "wsgi_proxy_rate_limited_total",
                "Requests refused by a limit: rpm, streams, tpm, or a budget's kind (tokens_per_day, ...).",
                ("limit",),
                registry=reg,
            )
            self._usage = Counter(
                "wsgi_proxy_usage_total",
                "Tokens and tool calls of finished responses (each counted once), by team, upstream and"
                " counter (input_tokens, cached_input_tokens, reasoning_tokens, web_search_calls, ...).",
                ("team", "upstream", "counter"),
                registry=reg,
            )
            self._cost = Counter(
                "wsgi_proxy_usage_cost_usd_total",
                "What finished responses cost in US dollars, by team and upstream (priced models only).",
                ("team", "upstream"),
                registry=reg,
            )

    def request_finished(
        self, *, route: str, method: str, status: int, upstream: str | None, seconds: float
    ) -> None:
        """Count one answered request and observe its duration.

        :param route: the route's name, one of a small fixed set.
        :param status: the HTTP status sent to the client.
        :param upstream: the upstream that answered, or None if none was involved.
        :param seconds: from the request's arrival to the end of its answer.
        """
        name = _upstream(upstream)
        self._labels(self._requests, route, method, str(status), name).inc()
        self._labels(self._request_seconds, route, name).observe(seconds)

    def first_event(self, *, route: str, upstream: str | None, seconds: float) -> None:
        """Observe the time a stream took to deliver its first event."""
        self._labels(self._first_event_seconds, route, _upstream(upstream)).observe(seconds)

    def stream_opened(self) -> None:
        """Count one more stream being relayed."""
        self._open_streams.inc()

    def stream_closed(self) -> None:
        """Count one stream fewer; call it exactly once per :meth:`stream_opened`."""
        self._open_streams.dec()

    def events_forwarded(self, *, events: int, nbytes: int) -> None:
        """Count one batch of relayed events and their bytes (two increments, no lookups)."""
        self._events.inc(events)
        self._bytes.inc(nbytes)

    def resumed(self, *, upstream: str | None) -> None:
        """Count one re-opened background stream."""
        self._labels(self._resumes, _upstream(upstream)).inc()

    def upstream_error(self, *, upstream: str | None, kind: str) -> None:
        """Count one upstream failure of ``kind``: the ``code`` of the error the proxy answered with
        (``upstream_timeout``, ``upstream_unavailable``, ``upstream_protocol_error``,
        ``upstream_credentials_rejected``), or ``stream_aborted`` for a stream cut after its start."""
        self._labels(self._upstream_errors, _upstream(upstream), kind).inc()

    def websocket_opened(self) -> None:
        self._open_websockets.inc()

    def websocket_closed(self) -> None:
        """One client connection fewer; call it exactly once per :meth:`websocket_opened`."""
        self._open_websockets.dec()

    def websocket_frame(self, direction: t.Literal["in", "out"]) -> None:
        self._labels(self._websocket_frames, direction).inc()

    def websocket_error(self, code: str) -> None:
        """Count one error frame by its error code (OpenAI's and the proxy's: a small set); a code an
        upstream made up that does not look like one is counted as ``other``."""
        self._labels(self._websocket_errors, code if _ERROR_CODE.fullmatch(code) else "other").inc()

    def affinity_failover(self, *, upstream: str) -> None:
        """Count one call that left the upstream its session is pinned to."""
        self._labels(self._affinity_failovers, _upstream(upstream)).inc()

    def rate_limited(self, *, limit: str) -> None:
        """Count one request refused by ``limit`` (``rpm``, ``streams``, ``tpm`` or a budget's kind)."""
        self._labels(self._rate_limited, limit).inc()

    def used(self, *, team: str | None, upstream: str, usage: Usage, cost_nano_usd: int | None) -> None:
        """Count what one finished response used (once per response) and what it cost."""
        team_label = _upstream(team)
        for counter, value in usage.counts().items():
            if value:
                self._labels(self._usage, team_label, upstream, counter).inc(value)
        if cost_nano_usd:
            self._labels(self._cost, team_label, upstream).inc(usd(cost_nano_usd))

    def render(self) -> tuple[bytes, str]:
        """The exposition text for a scrape, and its content type.

        In multiprocess mode it sums the files of every process in the directory, through a fresh
        registry holding only a ``MultiProcessCollector``; otherwise it renders :attr:`registry`.
        """
        if self.multiprocess_dir is None:
            return generate_latest(self.registry), _CONTENT_TYPE
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry), _CONTENT_TYPE

    def _labels(self, metric: _M, *labelvalues: str) -> _M:
        key = (id(metric), labelvalues)
        child = self._children.get(key)  # the fast path: no lock once a series exists
        if child is None:
            # A new child series is built with whatever value class is installed: install this object's.
            with _installed(self._values):
                child = self._children[key] = metric.labels(*labelvalues)
        return t.cast(_M, child)


@contextlib.contextmanager
def _installed(cls: type[t.Any]) -> t.Iterator[None]:
    """Hold the lock with ``cls`` as prometheus_client's value class, while series are created."""
    with _value_class_lock:
        values.ValueClass = cls
        yield


_ERROR_CODE = re.compile(r"[a-z0-9_.]{1,64}")


def _upstream(name: str | None) -> str:
    """A label for an optional name (an upstream, a team): ``none`` when there is none."""
    return "none" if name is None else name


def mark_worker_dead(pid: int) -> None:
    """Forget the live gauges of the worker process ``pid`` (for gunicorn's ``child_exit`` hook).

    Its counters and histograms stay, as they should: what it served was served. Without
    multiprocess mode this does nothing.
    """
    directory = _multiprocess_dir()
    if directory is not None:
        mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def prepare_multiprocess_dir(path: str | None) -> str | None:
    """Make the multiprocess directory ready for a new run (for gunicorn's ``on_starting`` hook).

    The directory is ``path`` if given, else ``PROMETHEUS_MULTIPROC_DIR``. It is created if
    missing and emptied of the ``*.db`` files of a previous run (whose counters would otherwise be
    added to this run's), and ``PROMETHEUS_MULTIPROC_DIR`` is set to its absolute path, so that the
    workers forked afterwards inherit it.

    :return: the directory's absolute path, or None if neither names one (multiprocess mode off).
    :raises ConfigError: if the path exists but is not a directory.
    """
    directory = (path or "").strip() or _multiprocess_dir()
    if directory is None:
        return None
    directory = os.path.abspath(directory)
    try:
        os.makedirs(directory, exist_ok=True)
    except FileExistsError:
        raise ConfigError(
            f"The Prometheus multiprocess directory {directory!r} exists but is not a directory: point"
            f" {MULTIPROC_ENV} at a directory of its own."
        ) from None
    for stale in glob.glob(os.path.join(directory, "*.db")):
        with contextlib.suppress(FileNotFoundError):  # another process may remove it first
            os.remove(stale)
    os.environ[MULTIPROC_ENV] = directory
    return directory
