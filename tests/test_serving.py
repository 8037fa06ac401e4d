"""The gunicorn worker hook: the heartbeat counts the worker's progress (a fake gthread worker, and
gunicorn's own class), and the cycle collector walks the heap less often."""

from __future__ import annotations

import gc
import threading
import time
import typing as t
from types import SimpleNamespace

import pytest
from gunicorn.workers.gthread import ThreadWorker  # type: ignore[import-untyped]

from wsgi_proxy.web import serving
from wsgi_proxy.web.serving import FULL_COLLECTION_EVERY, _keep_heartbeat, collect_less_often


class _Tmp:
    def __init__(self) -> None:
        self.beats = 0

    def notify(self) -> None:
        self.beats += 1


class _Worker:
    """What the hook touches of gunicorn's ThreadWorker: its loop's steps, its heartbeat file."""

    def __init__(self, timeout: int) -> None:
        self.cfg = SimpleNamespace(timeout=timeout)
        self.tmp = _Tmp()
        self.accepted = 0

    def accept(self, listener: object) -> None:
        self.accepted += 1

    def finish_request(self, conn: object, fs: object) -> None:
        pass

    def notify(self) -> None:
        self.tmp.notify()


def _beats_while(worker: _Worker, step: t.Callable[[], object], seconds: float) -> int:
    before = worker.tmp.beats
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        step()
        time.sleep(0.05)
    return worker.tmp.beats - before


def test_a_loop_that_progresses_keeps_beating_even_between_its_turns() -> None:
    worker = _Worker(timeout=6)  # a beat every second
    _keep_heartbeat(worker)
    assert _beats_while(worker, lambda: worker.accept(None), 2.5) >= 2  # accepts alone: no turn ended
    assert worker.accepted > 10  # the wrapped method still does its work


def test_a_stuck_loop_gets_no_beat_so_gunicorn_still_kills_it() -> None:
    worker = _Worker(timeout=6)
    _keep_heartbeat(worker)
    worker.finish_request(None, None)
    time.sleep(1.2)  # the beat for that step
    assert _beats_while(worker, lambda: None, 2.5) == 0


def _spin(seconds: float) -> None:
    """Use the CPU for ``seconds``, as a worker's threads do while thousands of clients leave."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_a_starved_loop_in_a_busy_worker_keeps_beating_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serving, "STARVED_LOOP_TIMEOUTS", 1 / 3)  # 2 s at a timeout of 6 s
    worker = _Worker(timeout=6)  # a beat every second
    _keep_heartbeat(worker)
    worker.finish_request(None, None)  # the loop's last step, beaten for at ~1 s
    time.sleep(1.2)
    assert _beats_while(worker, lambda: _spin(0.05), 1.5) >= 1  # at ~2 s: starved, not stuck
    time.sleep(0.8)  # past the beat at ~3 s, the loop's step 2 s old
    assert _beats_while(worker, lambda: _spin(0.05), 2.5) == 0  # stuck too long


def test_gunicorns_gthread_worker_gets_the_heartbeat() -> None:
    worker = ThreadWorker.__new__(ThreadWorker)  # what the hook wraps, without a process to run
    worker.cfg, worker.tmp = SimpleNamespace(timeout=30), _Tmp()
    _keep_heartbeat(worker)
    assert {"accept", "finish_request", "notify"} <= vars(worker).keys()


def test_a_worker_of_another_kind_is_left_alone() -> None:
    worker = SimpleNamespace(cfg=SimpleNamespace(timeout=30), tmp=_Tmp(), notify=lambda: None)
    threads = threading.active_count()
    _keep_heartbeat(worker)
    assert threading.active_count() == threads and not hasattr(worker, "accept")


def test_the_worker_freezes_what_it_built_and_considers_full_collections_less_often() -> None:
    thresholds = gc.get_threshold()
    try:
        collect_less_often()
        assert gc.get_freeze_count() > 1000  # the modules and objects loaded so far
        assert gc.get_threshold() == (*thresholds[:2], FULL_COLLECTION_EVERY)
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1  # garbage made afterwards is still collected
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
