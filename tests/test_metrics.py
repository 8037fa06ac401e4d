"""Prometheus metrics: values, buckets and labels in one process, and sums across real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import typing as t
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, values
from prometheus_client.parser import text_string_to_metric_families

from wsgi_proxy.config import ConfigError
from wsgi_proxy.observe.metrics import (
    FIRST_EVENT_BUCKETS,
    MULTIPROC_ENV,
    REQUEST_BUCKETS,
    Metrics,
    mark_worker_dead,
    prepare_multiprocess_dir,
)

REPO = Path(__file__).resolve().parent.parent

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(autouse=True)
def _no_multiprocess_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start each test in-process; whatever a test sets is undone afterwards."""
    for name in (MULTIPROC_ENV, MULTIPROC_ENV.lower()):
        # setenv first, so that monkeypatch restores the original state (set or not) at teardown.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    # Metrics installs a value class in prometheus_client; put the original one back afterwards.
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)


def samples(metrics: Metrics) -> Samples:
    """Every sample of ``render()``, by name and sorted labels."""
    text, _ = metrics.render()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def bucket_bounds(found: Samples, name: str) -> list[float]:
    return sorted({float(dict(labels)["le"]) for n, labels in found if n == name + "_bucket"})


class TestInProcess:
    def test_requests_are_counted_by_route_method_status_upstream(self) -> None:
        metrics = Metrics()
        metrics.request_finished(route="create", method="POST", status=200, upstream="default", seconds=0.1)
        metrics.request_finished(route="create", method="POST", status=200, upstream="default", seconds=0.2)
        metrics.request_finished(route="retrieve", method="GET", status=404, upstream="azure", seconds=0.01)
        metrics.request_finished(route="models", method="GET", status=401, upstream=None, seconds=0.001)
        found = samples(metrics)
        name = "wsgi_proxy_requests_total"
        assert value(found, name, route="create", method="POST", status="200", upstream="default") == 2
        assert value(found, name, route="retrieve", method="GET", status="404", upstream="azure") == 1
        assert value(found, name, route="models", method="GET", status="401", upstream="none") == 1
        label_sets = {labels for n, labels in found if n == name}
        assert {tuple(k for k, _ in labels) for labels in label_sets} == {
            ("method", "route", "status", "upstream")
        }
        assert len(label_sets) == 3

    def test_request_seconds_fall_into_buckets_from_1ms_to_10min(self) -> None:
        metrics = Metrics()
        for seconds in (0.0005, 0.002, 0.3, 120.0, 900.0):
            metrics.request_finished(
                route="create", method="POST", status=200, upstream="default", seconds=seconds
            )
        found = samples(metrics)
        name = "wsgi_proxy_request_seconds"
        assert bucket_bounds(found, name) == [*REQUEST_BUCKETS, float("inf")]
        assert REQUEST_BUCKETS[0] == 0.001 and REQUEST_BUCKETS[-1] == 600.0

        def bucket(le: str) -> float:
            return value(found, name + "_bucket", route="create", upstream="default", le=le)

        assert bucket("0.001") == 1
        assert bucket("0.0025") == 2
        assert bucket("0.5") == 3
        assert bucket("120.0") == 4
        assert bucket("600.0") == 4
        assert bucket("+Inf") == 5
        assert value(found, name + "_count", route="create", upstream="default") == 5
        assert value(found, name + "_sum", route="create", upstream="default") == pytest.approx(1020.3025)

    def test_time_to_first_event_has_buckets_from_10ms_to_120s(self) -> None:
        metrics = Metrics()
        metrics.first_event(route="create", upstream="default", seconds=0.7)
        metrics.first_event(route="create", upstream="default", seconds=45.0)
        found = samples(metrics)
        name = "wsgi_proxy_time_to_first_event_seconds"
        assert bucket_bounds(found, name) == [*FIRST_EVENT_BUCKETS, float("inf")]
        assert FIRST_EVENT_BUCKETS[0] == 0.01 and FIRST_EVENT_BUCKETS[-1] == 120.0
        assert value(found, name + "_bucket", route="create", upstream="default", le="1.0") == 1
        assert value(found, name + "_bucket", route="create", upstream="default", le="60.0") == 2
        assert value(found, name + "_count", route="create", upstream="default") == 2

    def test_open_streams_gauge_goes_up_and_down(self) -> None:
        metrics = Metrics()
        assert value(samples(metrics), "wsgi_proxy_open_streams") == 0
        metrics.stream_opened()
        metrics.stream_opened()
        assert value(samples(metrics), "wsgi_proxy_open_streams") == 2
        metrics.stream_closed()
        assert value(samples(metrics), "wsgi_proxy_open_streams") == 1
        metrics.stream_closed()
        assert value(samples(metrics), "wsgi_proxy_open_streams") == 0

    def test_events_and_bytes_add_up_per_batch(self) -> None:
        metrics = Metrics()
        metrics.events_forwarded(events=3, nbytes=450)
        metrics.events_forwarded(events=1, nbytes=50)
        found = samples(metrics)
        assert value(found, "wsgi_proxy_events_total") == 4
        assert value(found, "wsgi_proxy_bytes_total") == 500

    def test_resumes_errors_and_rate_limits_are_labelled(self) -> None:
        metrics = Metrics()
        metrics.resumed(upstream="default")
        metrics.resumed(upstream=None)
        metrics.upstream_error(upstream="default", kind="timeout")
        metrics.upstream_error(upstream="default", kind="timeout")
        metrics.upstream_error(upstream="azure", kind="stream_interrupted")
        metrics.rate_limited(limit="rpm")
        metrics.rate_limited(limit="streams")
        metrics.rate_limited(limit="streams")
        found = samples(metrics)
        assert value(found, "wsgi_proxy_resumes_total", upstream="default") == 1
        assert value(found, "wsgi_proxy_resumes_total", upstream="none") == 1
        assert value(found, "wsgi_proxy_upstream_errors_total", upstream="default", kind="timeout") == 2
        assert (
            value(found, "wsgi_proxy_upstream_errors_total", upstream="azure", kind="stream_interrupted") == 1
        )
        assert value(found, "wsgi_proxy_rate_limited_total", limit="rpm") == 1
        assert value(found, "wsgi_proxy_rate_limited_total", limit="streams") == 2

    def test_render_uses_the_classic_text_format(self) -> None:
        text, content_type = Metrics().render()
        assert content_type == "text/plain; version=0.0.4; charset=utf-8"
        assert b"# TYPE wsgi_proxy_requests_total counter" in text
        assert b"# TYPE wsgi_proxy_open_streams gauge" in text

    def test_two_instances_in_one_process_do_not_clash(self) -> None:
        first, second = Metrics(), Metrics()
        first.request_finished(route="create", method="POST", status=200, upstream="default", seconds=0.1)
        first.stream_opened()
        found_first, found_second = samples(first), samples(second)
        labels = {"route": "create", "method": "POST", "status": "200", "upstream": "default"}
        assert value(found_first, "wsgi_proxy_requests_total", **labels) == 1
        assert value(found_second, "wsgi_proxy_requests_total", **labels) == 0
        assert value(found_first, "wsgi_proxy_open_streams") == 1
        assert value(found_second, "wsgi_proxy_open_streams") == 0

    def test_a_given_registry_is_used(self) -> None:
        registry = CollectorRegistry()
        metrics = Metrics(registry)
        metrics.rate_limited(limit="rpm")
        assert metrics.registry is registry
        assert registry.get_sample_value("wsgi_proxy_rate_limited_total", {"limit": "rpm"}) == 1

    def test_no_files_are_written_without_the_variable(self, tmp_path: Path) -> None:
        metrics = Metrics()
        metrics.request_finished(route="create", method="POST", status=200, upstream="default", seconds=0.1)
        assert metrics.multiprocess_dir is None
        assert list(tmp_path.iterdir()) == []

    def test_mark_worker_dead_does_nothing(self) -> None:
        mark_worker_dead(os.getpid())


# --- multiprocess mode -------------------------------------------------------------------------

# A worker: records `requests` requests and `streams` open streams, prints its pid and exits.
# PROMETHEUS_MULTIPROC_DIR is in its environment from the start, as under gunicorn.
_WORKER = textwrap.dedent(
    """
    import os, sys
    from wsgi_proxy.observe.metrics import Metrics

    requests, streams = int(sys.argv[1]), int(sys.argv[2])
    metrics = Metrics()
    for _ in range(requests):
        metrics.request_finished(route="create", method="POST", status=200, upstream="default", seconds=0.05)
    metrics.events_forwarded(events=10 * requests, nbytes=1000 * requests)
    for _ in range(streams):
        metrics.stream_opened()
    print(os.getpid())
    """
)


def run_workers(directory: Path, *jobs: tuple[int, int]) -> list[int]:
    """Run one process per ``(requests, streams)`` job, all at once; return their pids."""
    env = {**os.environ, MULTIPROC_ENV: str(directory)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(requests), str(streams)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for requests, streams in jobs
    ]
    pids = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        pids.append(int(out))
    return pids


@pytest.fixture
def shared_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    monkeypatch.setenv(MULTIPROC_ENV, str(directory))
    return directory


CREATE_200 = {"route": "create", "method": "POST", "status": "200", "upstream": "default"}


@pytest.mark.slow
class TestMultiprocess:
    def test_the_values_of_two_processes_are_summed(self, shared_dir: Path) -> None:
        run_workers(shared_dir, (3, 0), (4, 0))
        found = samples(Metrics())
        assert value(found, "wsgi_proxy_requests_total", **CREATE_200) == 7
        histogram = "wsgi_proxy_request_seconds"
        assert value(found, histogram + "_count", route="create", upstream="default") == 7
        assert value(found, histogram + "_bucket", route="create", upstream="default", le="0.05") == 7
        assert value(found, histogram + "_bucket", route="create", upstream="default", le="0.025") == 0
        assert value(found, "wsgi_proxy_events_total") == 70
        assert value(found, "wsgi_proxy_bytes_total") == 7000

    def test_this_process_is_counted_too(self, shared_dir: Path) -> None:
        # prometheus_client was imported here before the variable was set: Metrics still uses files.
        metrics = Metrics()
        assert metrics.multiprocess_dir == str(shared_dir)
        metrics.request_finished(route="create", method="POST", status=200, upstream="default", seconds=0.1)
        assert any(shared_dir.glob(f"*_{os.getpid()}.db"))
        run_workers(shared_dir, (2, 0))
        assert value(samples(metrics), "wsgi_proxy_requests_total", **CREATE_200) == 3

    def test_open_streams_sum_the_live_workers(self, shared_dir: Path) -> None:
        metrics = Metrics()
        metrics.stream_opened()
        first, second = run_workers(shared_dir, (1, 2), (1, 3))
        assert value(samples(metrics), "wsgi_proxy_open_streams") == 6
        mark_worker_dead(first)
        found = samples(metrics)
        assert value(found, "wsgi_proxy_open_streams") == 4
        # What the dead worker served stays counted.
        assert value(found, "wsgi_proxy_requests_total", **CREATE_200) == 2
        mark_worker_dead(second)
        metrics.stream_closed()
        assert value(samples(metrics), "wsgi_proxy_open_streams") == 0

    def test_in_process_mode_returns_when_the_variable_is_unset(
        self, shared_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        Metrics().request_finished(route="create", method="POST", status=200, upstream="default", seconds=0.1)
        files = sorted(shared_dir.iterdir())
        monkeypatch.delenv(MULTIPROC_ENV)
        local = Metrics()
        local.request_finished(route="create", method="POST", status=503, upstream="default", seconds=0.1)
        local.stream_opened()
        assert sorted(shared_dir.iterdir()) == files
        found = samples(local)
        assert value(found, "wsgi_proxy_requests_total", **CREATE_200) == 0
        assert value(found, "wsgi_proxy_requests_total", **{**CREATE_200, "status": "503"}) == 1

    def test_a_missing_directory_is_a_config_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path / "missing"))
        with pytest.raises(ConfigError, match="not a directory"):
            Metrics()


class TestPrepareMultiprocessDir:
    def test_without_a_path_or_the_variable_it_is_off(self) -> None:
        assert prepare_multiprocess_dir(None) is None
        assert MULTIPROC_ENV not in os.environ

    def test_creates_the_directory_and_exports_it(self, tmp_path: Path) -> None:
        directory = tmp_path / "a" / "prometheus"
        assert prepare_multiprocess_dir(str(directory)) == str(directory)
        assert directory.is_dir()
        assert os.environ[MULTIPROC_ENV] == str(directory)

    def test_empties_stale_db_files_only(self, shared_dir: Path) -> None:
        run_workers(shared_dir, (1, 1))
        (shared_dir / "notes.txt").write_text("kept")
        assert any(shared_dir.glob("*.db"))
        assert prepare_multiprocess_dir(None) == str(shared_dir)
        assert [p.name for p in shared_dir.iterdir()] == ["notes.txt"]
        found = samples(Metrics())
        assert value(found, "wsgi_proxy_requests_total", **CREATE_200) == 0
        assert value(found, "wsgi_proxy_open_streams") == 0

    def test_a_path_wins_over_the_variable(self, shared_dir: Path, tmp_path: Path) -> None:
        other = tmp_path / "other"
        assert prepare_multiprocess_dir(str(other)) == str(other)
        assert os.environ[MULTIPROC_ENV] == str(other)

    def test_a_file_in_the_way_is_a_config_error(self, tmp_path: Path) -> None:
        blocker = tmp_path / "file"
        blocker.write_text("")
        with pytest.raises(ConfigError, match="not a directory"):
            prepare_multiprocess_dir(str(blocker))


def test_names_are_what_dashboards_expect() -> None:
    text, _ = Metrics().render()
    families: set[str] = {f.name for f in text_string_to_metric_families(text.decode())}
    expected: t.Final = {
        "wsgi_proxy_requests",
        "wsgi_proxy_request_seconds",
        "wsgi_proxy_time_to_first_event_seconds",
        "wsgi_proxy_open_streams",
        "wsgi_proxy_events",
        "wsgi_proxy_bytes",
        "wsgi_proxy_resumes",
        "wsgi_proxy_upstream_errors",
        "wsgi_proxy_rate_limited",
    }
    assert expected <= families


def test_websocket_metrics_count_sockets_frames_and_error_codes() -> None:
    metrics = Metrics()
    metrics.websocket_opened()
    metrics.websocket_frame("in")
    metrics.websocket_frame("out")
    metrics.websocket_frame("out")
    metrics.websocket_error("previous_response_not_found")
    metrics.websocket_error("Made Up <code> " * 9)
    text = metrics.render()[0].decode()
    assert "wsgi_proxy_open_websockets 1.0" in text
    assert 'wsgi_proxy_websocket_frames_total{direction="out"} 2.0' in text
    assert 'wsgi_proxy_websocket_errors_total{code="previous_response_not_found"} 1.0' in text
    assert 'wsgi_proxy_websocket_errors_total{code="other"} 1.0' in text
    metrics.websocket_closed()
    assert "wsgi_proxy_open_websockets 0.0" in metrics.render()[0].decode()
