"""What a gunicorn worker serving the proxy needs: the hook that ``gunicorn.conf.py`` installs.

A host app served with a gunicorn configuration of its own gets the same behaviour by calling
:func:`prepare_worker` from its ``post_worker_init`` hook.
"""

from __future__ import annotations

import functools
import gc
import sys
import threading
import time
import typing as t

from ..gateway.watchdog import drain_when

__all__ = ["FULL_COLLECTION_EVERY", "GIL_SWITCH_INTERVAL", "collect_less_often", "prepare_worker"]

GIL_SWITCH_INTERVAL = 0.1
"""Seconds a worker's thread may hold the GIL while others wait (Python's default: 0.005).

A worker's threads mostly wait on sockets and hold the GIL briefly, so the default's forced switches
only churn: with 10,000 open streams on two workers they took the CPU per stream from 5 to 11 ms,
first bytes from 20 ms to 5 s (p50), events from 7 ms to 1 s late (p50), and got workers killed by
the heartbeat; 0.02 s was as bad, 0.05 s and 0.5 s as good as 0.1 s (``benchmarks/ramp.py``, the
README's sizing). The cost: a thread busy with the CPU (a large body's JSON) keeps others waiting
this long. ``gunicorn.conf.py`` takes ``WSGI_PROXY_GIL_SWITCH_INTERVAL`` instead when it is set.
"""


def prepare_worker(worker: t.Any, *, switch_interval: float = GIL_SWITCH_INTERVAL) -> None:
    """Make a gthread worker hold thousands of streams and stop well (gunicorn's
    ``post_worker_init`` hook).

    - Its threads take ``switch_interval`` turns of the GIL (:data:`GIL_SWITCH_INTERVAL`).
    - Python's cycle collector walks the whole heap less often (:func:`collect_less_often`).

    - On SIGTERM, SIGHUP or ``max_requests``, open streams are ended deliberately instead of by a
      SIGKILL: background streams at once, so that their clients resume (``starting_after``) on
      another worker, other streams shortly before ``graceful_timeout``.
    - It accepts a connection only while one of its threads is free. gthread accepts up to
      ``worker_connections`` and queues what its threads cannot take yet; a stream or a WebSocket
      session holds its thread for its whole life, so a connection queued behind full threads
      waited for as long as they lasted, while another worker had threads idle (62 of 10,000
      WebSocket sessions never answered in ``benchmarks/ramp.py``). Now it stays in the kernel's
      queue, for whichever worker frees a thread first.
    - Once the worker stops accepting, it closes its copies of the listening sockets. Without that
      a stopping gunicorn (SIGTERM) kept them open through the whole drain, and the kernel queued
      new connections that nobody would accept: they hung, then were reset. Now they are refused at
      once, or, while other workers or a new generation hold the sockets (SIGHUP, a recycled
      worker), served by those.
    - The heartbeat that gunicorn's master watches counts the worker's progress (its event loop's
      steps, and for a while the CPU its threads use), not only the loop's turns
      (:func:`_keep_heartbeat`), so that thousands of clients leaving at once no longer get a busy
      worker killed with every other stream on it.
    """
    sys.setswitchinterval(switch_interval)
    collect_less_often()
    drain_when(lambda: not worker.alive, grace=worker.cfg.graceful_timeout)
    _keep_heartbeat(worker)
    set_accept_enabled = getattr(worker, "set_accept_enabled", None)
    if set_accept_enabled is None:  # not gunicorn's gthread worker of 24.1 or later
        return
    held = _threads_held(worker)
    threads = worker.cfg.threads

    def accept_while_a_thread_is_free(enabled: bool) -> None:
        if enabled and held is not None and held() >= threads:
            enabled = False  # the next connection would wait for a thread here: another worker's
        set_accept_enabled(enabled)
        if not enabled and not worker.alive:  # not a full worker pausing, a stopping one
            for listener in worker.sockets:
                listener.close()

    worker.set_accept_enabled = accept_while_a_thread_is_free
    if held is None:
        return
    accept = worker.accept

    def accept_and_pause_when_full(listener: t.Any) -> None:
        accept(listener)
        if held() >= threads:  # gthread's loop only looks again once worker_connections are reached
            worker.set_accept_enabled(False)

    worker.accept = accept_and_pause_when_full


def _threads_held(worker: t.Any) -> t.Callable[[], int] | None:
    """How many of a gthread worker's connections hold one of its threads or wait for one: all it
    counts but the idle keep-alive ones and (gunicorn 25) those still waiting for their request."""
    if not hasattr(worker, "nr_conns") or not hasattr(worker, "keepalived_conns"):
        return None  # not the gthread worker this was written for

    def held() -> int:
        return int(worker.nr_conns) - len(worker.keepalived_conns) - len(getattr(worker, "pending_conns", ()))

    return held


#: How many collections of the middle generation come before a full one is considered (Python's: 10).
FULL_COLLECTION_EVERY = 200


def collect_less_often() -> None:
    """Keep the cycle collector's full collections, which hold the GIL for as long as they walk every
    object the worker holds, from stalling thousands of open streams again and again.

    An open stream holds some 145 tracked objects in this worker (Flask's, requests', gunicorn's and
    ours; ~130 in the floor forwarder): a full collection takes ~0.2 ms per open stream, 0.7-1.1 s at
    5,000, with every stream's events waiting. Python starts one each time the long-lived heap
    grows by a quarter, so opening 5,000 streams cost a worker ten of them, 9 s in all
    (``benchmarks/ramp.py``, with the collections timed by ``gc.callbacks``). What the process built
    before it served (modules, the app, its configuration) lives as long as the process, so it is
    frozen out of every collection (call this once serving starts: :func:`prepare_worker` does in
    each worker, the simulator in its own process); and a full collection is considered after
    :data:`FULL_COLLECTION_EVERY` collections of the middle generation instead of 10, i.e. once
    ~1.4 million surviving allocations have been made: none while 5,000 streams open. At 50 there
    were two, of 0.3 s and 0.7-1.1 s, and 10,000 streams' events while they opened were 110-855 ms
    late at p99 (nine runs), 36-137 ms at 200 (nine). The cost is cyclic garbage kept longer, and a stream
    leaves it only young: the young generations' collections took ~7 objects per stream, full ones
    ~100 objects in all after 5,000 streams per worker had come and gone.
    """
    gc.freeze()
    young, middle, _full = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


#: How many heartbeat timeouts the event loop may go without a step while the worker keeps busy
#: (:data:`BUSY_CPU_SHARE`): its loop is starved of the GIL then, not stuck.
STARVED_LOOP_TIMEOUTS = 10

#: The share of a core a worker uses between two beats that makes it busy: an idle one, thousands of
#: sessions waiting on their sockets, uses well under 1%; thousands leaving at once keep it near 100%.
BUSY_CPU_SHARE = 0.1


class _Progress:
    """How many steps the worker's event loop has finished (a lost increment does not matter)."""

    steps = 0


def _keep_heartbeat(worker: t.Any) -> None:
    """Tell gunicorn's master the worker is alive while it makes progress.

    gthread's loop touches the heartbeat once per turn, and one turn (waiting on its sockets,
    accepting connections, finishing requests) needs the GIL several times. When thousands of
    sessions end together, thousands of threads want the GIL too, each for some ten calls that let
    go of it, and the loop starves: with 5,000 WebSocket sessions leaving a worker it went 4-10 s
    without a step, and no session's request returned to gunicorn for 15 s, all of them advancing
    together (a trace of this thread, ``benchmarks/ramp.py``); the master killed workers that were
    working, with every other stream on them. A thread of its own now touches the heartbeat every
    ``timeout / 6`` seconds if, since the last time, the loop finished a step (an accept, a
    request's end, a turn), or the worker was busy (:data:`BUSY_CPU_SHARE`) while the loop's last
    step is less than :data:`STARVED_LOOP_TIMEOUTS` timeouts old. A worker whose loop is stuck
    while it idles, or stuck that long, still gets killed; so does one whose threads keep even
    this one from the GIL for a whole timeout.
    """
    tmp, timeout = getattr(worker, "tmp", None), getattr(worker.cfg, "timeout", 0)
    steps = ("accept", "finish_request", "notify")
    if tmp is None or not timeout or not all(callable(getattr(worker, name, None)) for name in steps):
        return  # not the gthread worker this was written for
    progress = _Progress()

    def counted(method: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
        @functools.wraps(method)
        def step(*args: t.Any, **kwargs: t.Any) -> t.Any:
            try:
                return method(*args, **kwargs)
            finally:
                progress.steps += 1

        return step

    for name in steps:
        setattr(worker, name, counted(getattr(worker, name)))

    def beat() -> None:
        steps, cpu, then = progress.steps, time.process_time(), time.monotonic()
        loop_moved_at = then
        while True:
            time.sleep(max(1.0, timeout / 6))
            now, used = time.monotonic(), time.process_time()
            moved, busy = progress.steps != steps, used - cpu >= BUSY_CPU_SHARE * (now - then)
            steps, cpu, then = progress.steps, used, now
            if moved:
                loop_moved_at = now
            if moved or (busy and now - loop_moved_at < STARVED_LOOP_TIMEOUTS * timeout):
                tmp.notify()

    threading.Thread(target=beat, name="wsgi-proxy-heartbeat", daemon=True).start()
