"""Stored responses, their event logs and the jobs that generate them.

Every response is a :class:`ResponseRecord` whose event log (``events[i].seq == i``) grows under a
:class:`threading.Condition`; SSE writers follow the log, replaying stored events and then waiting for
live ones. A :class:`Job` feeds the log from :func:`~wsgi_proxy.simulator.events.iter_steps`, pacing
the events, driven by the store's :class:`Pacer` (streams and background responses) or inline (plain
JSON requests).
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import logging
import threading
import time
import typing as t

from .config import CancelMode, Faults
from .events import JsonDict, Step, cancelled_snapshot, dumps, failed_event

__all__ = ["CancelRefused", "Job", "Pacer", "ResponseRecord", "SseEvent", "Store"]

logger = logging.getLogger(__name__)

EndReason = t.Literal["complete", "cancelled", "stopped"]


class SseEvent(t.NamedTuple):
    """One logged event: its sequence number, ``type`` and compact JSON ``data``."""

    seq: int
    type: str
    data: bytes


class CancelRefused(Exception):
    """Raised by :meth:`ResponseRecord.cancel` with the 400 message for a response that can't be cancelled."""


class ResponseRecord:
    """One response: its current snapshot, its event log and how it was created."""

    def __init__(
        self,
        *,
        snapshot: JsonDict,
        background: bool,
        stream: bool,
        faults: Faults,
        input_items: list[JsonDict],
        cancel_mode: CancelMode = "fail",
        websocket: bool = False,
    ) -> None:
        self.id: str = snapshot["id"]
        self.background = background
        self.stream = stream
        self.websocket = websocket
        """Created over a WebSocket: streamed by ``GET ?stream=true`` like a background response."""
        self.stored = bool(snapshot.get("store", True))
        self.faults = faults
        """Faults that later ``GET ?stream=true`` replays inherit (see :meth:`Faults.for_replay`)."""
        self.input_items = input_items
        self.cancel_mode = cancel_mode
        self.created = time.monotonic()
        self.cond = threading.Condition()
        self.events: list[SseEvent] = []
        self.snapshot = snapshot
        self.finished = False
        self.end_reason: EndReason | None = None
        # Background responses can be retrieved while they run; others only once finished and stored.
        self.visible = background or (websocket and self.stored)
        self.job: Job | None = None
        self.size = 0
        """Bytes of event data generated so far: a rough measure of the memory this record holds."""
        self.on_change: t.Callable[[ResponseRecord, int], None] | None = None
        """Called under the record's lock with the bytes each event adds, and with 0 once it finishes
        (the :class:`Store` keeps its totals this way instead of summing every record)."""
        self._listeners: list[t.Callable[[], None]] = []
        self.on_complete: t.Callable[[JsonDict], None] | None = None
        """Called with the final snapshot when the response completes (a conversation takes its output)."""

    def append(self, step: Step) -> bool:
        """Log one generated event; return ``False`` when the response already ended."""
        payload = step.payload
        with self.cond:
            if self.finished:
                return False
            seq = len(self.events)
            if payload["sequence_number"] != seq:
                payload = {**payload, "sequence_number": seq}
            data = dumps(payload)
            self.size += len(data)
            self.events.append(SseEvent(seq, payload["type"], data))
            if self.on_change is not None:
                self.on_change(self, len(data))
            if step.snapshot is not None:
                self.snapshot = step.snapshot
            if step.terminal:
                self._finish("complete")
            self._tell()
            return True

    def finish(self, reason: EndReason) -> None:
        """End the log without a terminal event (the job stopped or the response was deleted)."""
        with self.cond:
            if not self.finished:
                self._finish(reason)
                self._tell()

    def _finish(self, reason: EndReason) -> None:
        self.finished = True
        self.end_reason = reason
        if self.on_change is not None:
            self.on_change(self, 0)
        if reason == "complete" and self.stored:
            self.visible = True
        if reason == "complete" and self.on_complete is not None:
            self.on_complete(self.snapshot)

    def wait_from(
        self, index: int, timeout: float | None = None, interrupted: t.Callable[[], bool] | None = None
    ) -> tuple[list[SseEvent], bool]:
        """Return the events from ``index`` on, waiting up to ``timeout`` (forever: ``None``) when there
        are none yet, unless ``interrupted()`` is true. Waiters also return early after :meth:`wake`.

        The second value tells whether the log is finished, in which case the list holds every
        remaining event.
        """
        with self.cond:
            if index >= len(self.events) and not self.finished and not (interrupted and interrupted()):
                self.cond.wait(timeout)
            return self.events[index:], self.finished

    def wake(self) -> None:
        """Make every :meth:`wait_from` return now (to look at its ``interrupted``)."""
        with self.cond:
            self.cond.notify_all()

    def listen(self, listener: t.Callable[[], None]) -> None:
        """Call ``listener`` (quickly, under the record's lock) on every event logged and at the end."""
        with self.cond:
            self._listeners.append(listener)

    def unlisten(self, listener: t.Callable[[], None]) -> None:
        with self.cond:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

    def _tell(self) -> None:
        self.cond.notify_all()
        for listener in self._listeners:
            listener()

    def current(self) -> JsonDict:
        with self.cond:
            return self.snapshot

    @property
    def replayable(self) -> bool:
        """Whether ``GET ?stream=true`` may replay this response's events."""
        return (self.background and self.stream) or (self.websocket and self.stored)

    def discard_log(self) -> None:
        """Drop the event log of a response that can never be replayed, to free memory."""
        if not self.replayable:
            with self.cond:
                if self.finished:
                    self.events = []

    def cancel(self) -> JsonDict:
        """Cancel a queued or in-progress background response and return its snapshot.

        With ``cancel_mode="fail"`` the log ends with ``response.failed`` (status ``cancelled``) and the
        job stops; with ``"continue"`` the job keeps generating, as some users saw in production.

        :raises CancelRefused: for a synchronous or already finished response.
        """
        with self.cond:
            if not self.background:
                raise CancelRefused("Cannot cancel a synchronous response.")
            status = self.snapshot.get("status")
            if status == "cancelled":
                return self.snapshot
            if self.finished or status not in ("queued", "in_progress"):
                raise CancelRefused("Cannot cancel a completed response.")
            snapshot = cancelled_snapshot(self.snapshot)
            self.snapshot = snapshot
            if self.cancel_mode == "continue":
                return snapshot
            seq = len(self.events)
            self.events.append(SseEvent(seq, "response.failed", dumps(failed_event(seq, snapshot))))
            self._finish("cancelled")
            self._tell()
            job = self.job
        if job is not None:
            job.stop()
        return snapshot


class Job:
    """Generates one response's events into its record.

    A started job is driven by a :class:`Pacer`, which logs each event when it is due; :meth:`run`
    generates inline instead. The next event is built when the previous one was logged, then held
    until its pause is over.

    :param delay_s: pause before every event but the first.
    :param gap_at: sequence number before which to stay silent for ``gap_s`` seconds.
    """

    def __init__(
        self,
        record: ResponseRecord,
        steps: t.Iterator[Step],
        *,
        delay_s: float,
        gap_at: int | None = None,
        gap_s: float = 0.0,
    ) -> None:
        self.record = record
        self._steps = steps
        self._delay_s = delay_s
        self._gap_at = gap_at
        self._gap_s = gap_s
        self._index = 0
        self._pending: Step | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        record.job = self

    def start(self, pacer: Pacer) -> Job:
        """Have ``pacer`` generate the events, each one when it is due."""
        due = self._prepare(time.monotonic(), pace=True)
        if due is None:
            self._end()
        else:
            pacer.add(self, due)
        return self

    def stop(self) -> None:
        """Stop generating: the record ends at once (``stopped``) unless it already has."""
        self._stop.set()
        self._end()

    def join(self, timeout: float | None = None) -> None:
        """Wait until the job is over."""
        self._done.wait(timeout)

    def advance(self) -> float | None:
        """Log the pending event (it is due); return when the next one is due, ``None`` once over."""
        step = self._pending
        if step is None or self._stop.is_set() or not self.record.append(step) or step.terminal:
            self._end()
            return None
        due = self._prepare(time.monotonic(), pace=True)
        if due is None:
            self._end()
        return due

    def run(self, poll: t.Callable[[], bool] | None = None, pace: bool = True) -> bool:
        """Generate inline until the terminal event; return ``False`` if stopped first.

        :param poll: called about every 100 ms while pausing; returning ``True`` stops the job (used to
            give up when the client of an inline request went away).
        :param pace: sleep ``delay_s`` between events. Gaps are always honoured.
        """
        try:
            while (due := self._prepare(time.monotonic(), pace)) is not None:
                step = t.cast(Step, self._pending)
                if not self._sleep(due - time.monotonic(), poll) or self._stop.is_set():
                    break
                if not self.record.append(step) or step.terminal:
                    break
        finally:
            self._end()
        return self.record.end_reason == "complete"

    def _prepare(self, now: float, pace: bool) -> float | None:
        """Build the next event; return when it is due, or ``None`` when there is none."""
        self._pending = step = next(self._steps, None)
        if step is None:
            return None
        index, self._index = self._index, self._index + 1
        if step.payload["sequence_number"] == self._gap_at:
            return now + self._gap_s
        return now + (self._delay_s if pace and index else 0.0)

    def _end(self) -> None:
        self.record.finish("stopped")
        if self.record.background:
            # Nobody follows the log of a background response created without stream.
            self.record.discard_log()
        self._done.set()

    def _sleep(self, seconds: float, poll: t.Callable[[], bool] | None) -> bool:
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self._stop.wait(remaining if poll is None else min(remaining, 0.1)):
                return False
            if poll is not None and poll():
                self._stop.set()
                return False
        return True


class Pacer:
    """Generates the events of every started :class:`Job` from one thread, each when it is due.

    One thread sleeping until the earliest due event, rather than a thread per job, keeps a thousand
    concurrent streams cheap. Jobs due at the same time take turns, one event each. The thread starts
    with the first job and exits after :attr:`idle_s` seconds without any, or at once on :meth:`clear`.
    """

    idle_s = 1.0

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: list[tuple[float, int, Job]] = []
        self._order = itertools.count()
        self._running = False
        self._cleared = False

    def add(self, job: Job, due: float) -> None:
        """Have ``job.advance()`` called at ``due`` (a :func:`time.monotonic` time)."""
        with self._cond:
            heapq.heappush(self._queue, (due, next(self._order), job))
            if not self._running:
                self._running = True
                self._cleared = False
                threading.Thread(target=self._run, name="sim-pacer", daemon=True).start()
            elif self._queue[0][2] is job:
                self._cond.notify()

    def clear(self) -> None:
        """Forget every job (after they were stopped)."""
        with self._cond:
            self._queue.clear()
            self._cleared = self._running
            self._cond.notify()

    def _run(self) -> None:
        while (job := self._next()) is not None:
            try:
                due = job.advance()
            except Exception:
                logger.exception("simulator job for %s failed", job.record.id)
                job.stop()
                continue
            if due is not None:
                self.add(job, due)

    def _next(self) -> Job | None:
        """Wait for the next due job; ``None`` (and the thread ends) after idling."""
        with self._cond:
            while True:
                if self._queue:
                    due, _, job = self._queue[0]
                    wait = due - time.monotonic()
                    if wait <= 0:
                        heapq.heappop(self._queue)
                        return job
                    self._cond.wait(wait)
                elif self._cleared or (not self._cond.wait(self.idle_s) and not self._queue):
                    self._running = False
                    return None


class Store:
    """The responses by id, oldest first.

    Beyond ``max_responses`` records or ``max_bytes`` of generated event data, the responses that
    finished longest ago are forgotten (they answer 404 afterwards), so long benchmarks stay bounded.
    Running ones are never forgotten, and adding one costs the same with ten thousand of them.
    """

    def __init__(self, max_responses: int = 1000, max_bytes: int = 256 * 1024 * 1024) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, ResponseRecord] = {}
        self._finished: collections.OrderedDict[str, ResponseRecord] = collections.OrderedDict()
        """The finished records, in the order they finished: the ones to forget first."""
        self._size = 0
        self._max_responses = max_responses
        self._max_bytes = max_bytes
        self.pacer = Pacer()
        """Generates the events of the started jobs."""

    def add(self, record: ResponseRecord) -> None:
        with self._lock:
            record.on_change = self._changed
            self._records[record.id] = record
            self._size += record.size
            if record.finished:
                self._finished[record.id] = record
            self._forget_oldest()

    def _changed(self, record: ResponseRecord, grown: int) -> None:
        with self._lock:
            if self._records.get(record.id) is not record:
                return
            self._size += grown
            if record.finished:
                self._finished[record.id] = record
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        while self._finished and (len(self._records) > self._max_responses or self._size > self._max_bytes):
            _, old = self._finished.popitem(last=False)
            self._forget(old)

    def _forget(self, record: ResponseRecord) -> None:
        if self._records.pop(record.id, None) is record:
            self._size -= record.size
        self._finished.pop(record.id, None)

    def get(self, response_id: str) -> ResponseRecord | None:
        """The record if it can be retrieved (stored, and not an unfinished synchronous response)."""
        with self._lock:
            record = self._records.get(response_id)
        return record if record is not None and record.visible else None

    def delete(self, response_id: str) -> ResponseRecord | None:
        with self._lock:
            record = self._records.get(response_id)
            if record is not None:
                self._forget(record)
        if record is not None and record.job is not None:
            record.job.stop()
        return record

    def stop_all(self) -> None:
        with self._lock:
            records = list(self._records.values())
        for record in records:
            if record.job is not None:
                record.job.stop()
            record.finish("stopped")
        self.pacer.clear()
