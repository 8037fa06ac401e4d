"""The :class:`Simulator` handle (start, stop, introspection) and :func:`serve` for the CLI."""

from __future__ import annotations

import signal
import socket
import sys
import threading
import typing as t

from ..web.serving import GIL_SWITCH_INTERVAL, collect_less_often
from .config import FLAVOR_PREFIXES, SimulatorConfig
from .handler import SimulatorServer
from .recording import RecordedRequest, Recorder, StreamClosure
from .store import Store

__all__ = ["Simulator", "serve"]


class Simulator:
    """A fake OpenAI Responses API upstream with fault injection, served from a daemon thread.

    ::

        with Simulator(config=SimulatorConfig(delay_ms=1)) as sim:
            client = OpenAI(base_url=sim.base_url, api_key="sk-test")

    :param host: interface to bind.
    :param port: port to bind; ``0`` picks a free one (read :attr:`port` after :meth:`start`).
    :param config: settings and default faults.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, config: SimulatorConfig | None = None) -> None:
        self.host = host
        self.config = config or SimulatorConfig()
        self.store = Store(self.config.max_responses, self.config.max_stored_bytes)
        """Every response created so far."""
        self._requested_port = port
        self._recorder = Recorder()
        self._server: SimulatorServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Simulator:
        """Bind and serve in a daemon thread; returns ``self``."""
        if self._server is not None:
            raise RuntimeError("The simulator is already running. Call stop() before starting it again.")
        self._server = SimulatorServer(
            (self.host, self._requested_port), self.config, self.store, self._recorder
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="simulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, end every job and shut down every open connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        self.store.stop_all()
        for sock in self._recorder.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("The simulator is not running. Call start() first.")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """``http://HOST:PORT``, without the API prefix (where ``/health`` and ``/_sim/*`` live)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The base a client configures: ``http://HOST:PORT/v1`` (``openai``), ``…/openai/v1``
        (``azure-v1``, for ``OpenAI(base_url=…)``) or ``…/openai`` (``azure-legacy``; ``AzureOpenAI``
        wants :attr:`url` as ``azure_endpoint`` and adds ``/openai`` itself)."""
        return self.url + FLAVOR_PREFIXES[self.config.flavor]

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the API requests received so far (any path but ``/health`` and ``/_sim/*``),
        oldest first."""
        return self._recorder.requests

    def clear_requests(self) -> None:
        self._recorder.clear_requests()

    def reset(self) -> None:
        """Forget recorded requests and stream closures (like ``POST /_sim/reset``)."""
        self._recorder.reset()

    @property
    def open_streams(self) -> int:
        """SSE connections currently being written."""
        return self._recorder.open_streams

    @property
    def open_websockets(self) -> int:
        """WebSocket connections being served now."""
        return self._recorder.open_websockets

    @property
    def frames(self) -> list[bytes]:
        """Every WebSocket message received from clients, as sent, oldest first."""
        return self._recorder.frames

    @property
    def websocket_closes(self) -> list[int | None]:
        """How WebSocket connections ended: the client's close code, or None when it sent none."""
        return self._recorder.websocket_closes

    @property
    def stream_closures(self) -> list[StreamClosure]:
        """How SSE connections ended, oldest first. A plain JSON create whose client left during an
        injected gap is recorded here too, as ``client_gone``."""
        return self._recorder.closures


def serve(host: str = "127.0.0.1", port: int = 8000, config: SimulatorConfig | None = None) -> None:
    """Run a simulator in the foreground until SIGINT or SIGTERM (for ``wsgi-proxy simulate``).

    Prints ``simulator listening on <base_url>`` once it accepts connections (``http://HOST:PORT/v1``, or
    the Azure flavor's base, see :attr:`Simulator.base_url`).
    """
    # Its own process, with thousands of threads (one per WebSocket session, per SSE stream without
    # the shared writer) and a record per response: the GIL turns the proxy's workers take, and
    # their rarer full collections, for the same reasons. Holding 10,000 streams it otherwise made a
    # dozen full collections of up to 2 s while they opened, each halting every stream's events and
    # then releasing them all at once: bursts no real upstream sends in step.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    sim = Simulator(host, port, config).start()
    collect_less_often()
    print(f"simulator listening on {sim.base_url}", flush=True)
    stopping = threading.Event()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous: t.Any = None
    if in_main_thread:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    try:
        while not stopping.wait(0.2):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
