"""What a gunicorn worker serving the proxy needs: the hook that ``gunicorn.conf.py`` installs.

A host app served with a gunicorn configuration of its own gets the same behaviour by calling
:func:`prepare_worker` from its ``post_worker_init`` hook.
"""

from __future__ import annotations

import functools
import threading
import time
import typing as t

from ..gateway.watchdog import drain_when

__all__ = ["prepare_worker"]


def prepare_worker(worker: t.Any) -> None:
    """Make a gthread worker stop well (gunicorn's ``post_worker_init`` hook).

    - On SIGTERM, SIGHUP or ``max_requests``, open streams are ended deliberately instead of by a
      SIGKILL: background streams at once, so that their clients resume (``starting_after``) on
      another worker, other streams shortly before ``graceful_timeout``.
    - Once the worker stops accepting, it closes its copies of the listening sockets. Without that
      a stopping gunicorn (SIGTERM) kept them open through the whole drain, and the kernel queued
      new connections that nobody would accept: they hung, then were reset. Now they are refused at
      once, or, while other workers or a new generation hold the sockets (SIGHUP, a recycled
      worker), served by those.
    - The heartbeat that gunicorn's master watches counts the event loop's progress, not only its
      turns (:func:`_keep_heartbeat`), so that thousands of clients leaving at once no longer get
      a busy worker killed with every other stream on it.
    """
    drain_when(lambda: not worker.alive, grace=worker.cfg.graceful_timeout)
    _keep_heartbeat(worker)
    set_accept_enabled = getattr(worker, "set_accept_enabled", None)
    if set_accept_enabled is None:  # not gunicorn's gthread worker of 24.1 or later
        return

    def stop_accepting_for_good(enabled: bool) -> None:
        set_accept_enabled(enabled)
        if not enabled and not worker.alive:  # not a full worker pausing, a stopping one
            for listener in worker.sockets:
                listener.close()

    worker.set_accept_enabled = stop_accepting_for_good


class _Progress:
    """How many steps the worker's event loop has finished (a lost increment does not matter)."""

    steps = 0


def _keep_heartbeat(worker: t.Any) -> None:
    """Tell gunicorn's master the worker is alive while its event loop makes progress.

    gthread's loop touches the heartbeat once per turn, and one turn (accepting connections, each
    of which may start a thread, and finishing requests) needs the GIL many times. When thousands
    of streams end together, thousands of threads want the GIL too, and a turn took more than
    gunicorn's ``timeout``: the master killed a worker that was working (seen at 10,000 streams on
    two workers, ``benchmarks/ramp.py``). A thread of its own now touches the heartbeat every few
    seconds, but only if the loop finished an accept, a request's end or a turn since the last
    time: a loop that is truly stuck still gets the worker killed.
    """
    tmp, timeout = getattr(worker, "tmp", None), getattr(worker.cfg, "timeout", 0)
    steps = [name for name in ("accept", "finish_request", "notify") if callable(getattr(worker, name, None))]
    if tmp is None or not timeout or len(steps) < 3:  # not the gthread worker this was written for
        return
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
        seen = progress.steps
        while True:
            time.sleep(max(1.0, timeout / 6))
            if progress.steps != seen:
                seen = progress.steps
                tmp.notify()

    threading.Thread(target=beat, name="wsgi-proxy-heartbeat", daemon=True).start()
