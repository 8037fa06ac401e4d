"""What a gunicorn worker serving the proxy needs: the hook that ``gunicorn.conf.py`` installs.

A host app served with a gunicorn configuration of its own gets the same behaviour by calling
:func:`prepare_worker` from its ``post_worker_init`` hook.
"""

from __future__ import annotations

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
    """
    drain_when(lambda: not worker.alive, grace=worker.cfg.graceful_timeout)
    set_accept_enabled = getattr(worker, "set_accept_enabled", None)
    if set_accept_enabled is None:  # not gunicorn's gthread worker of 24.1 or later
        return

    def stop_accepting_for_good(enabled: bool) -> None:
        set_accept_enabled(enabled)
        if not enabled and not worker.alive:  # not a full worker pausing, a stopping one
            for listener in worker.sockets:
                listener.close()

    worker.set_accept_enabled = stop_accepting_for_good
