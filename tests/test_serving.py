"""The gunicorn worker hook: the heartbeat counts the event loop's progress (a fake gthread worker),
and the cycle collector walks the heap less often."""

from __future__ import annotations

import gc
import threading
import time
import typing as t
from types import SimpleNamespace

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
