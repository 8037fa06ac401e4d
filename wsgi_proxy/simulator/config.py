"""Simulator configuration and the pure parser for ``sim_*`` fault options.

Fault options reach the simulator from three places, most specific first: the query string of a
request, the ``metadata`` object of a create body (string values, like the real API's metadata), and
:attr:`SimulatorConfig.faults`. :func:`parse_faults` overlays one mapping on top of a :class:`Faults`
value and is the only place the option names and value rules live.

Options (integers are non-negative, booleans are ``1``/``0``/``true``/``false``):

==========================  ==========================================================================
``sim_words=N``             number of ``output_text.delta`` events
``sim_delay_ms=F``          pause between generated events (streams and background jobs)
``sim_delta_bytes=N``       pad each delta to about N bytes (multi-MiB ``response.completed`` lines)
``sim_cut_after=K``         abort this connection's body after K events (not inherited by replays)
``sim_cut_every=K``         abort every connection after K events, unless the K-th was terminal
``sim_cut_mode=M``          ``abort`` (no last chunk; default) or ``clean`` (proper end, no terminal)
``sim_gap_at=K``            stay silent ``sim_gap_s`` seconds (default 1) before event K is generated
``sim_framing=F``           ``lf`` (default), ``crlf`` or ``cr`` line terminators
``sim_split=1``             each event in several writes cut mid-line (CRLF: between ``\\r`` and ``\\n``)
``sim_transfer=T``          ``chunked`` (default) or ``close`` (``Connection: close``, no length)
``sim_gzip=1``              ``Content-Encoding: gzip``, ``Z_SYNC_FLUSH`` after every write
``sim_keepalive_every=N``   a ``keepalive`` event after every N events (consumes sequence numbers)
``sim_keepalive_first=1``   a ``keepalive`` event before ``response.created``
``sim_comments=1``          a ``: ping`` comment between events
``sim_no_sequence=1``       events without ``sequence_number`` (as some compatible servers send them)
``sim_unicode=1``           deltas full of U+2028, U+2029, U+0085, Cyrillic, CJK and an emoji
``sim_stamp=1``             each event (SSE) or frame (WebSocket) ends with ``"sim_sent_at"``, the
                            simulator's ``time.monotonic()`` as it sent it (one-way delays, measured by
                            benchmarks)
``sim_status=CODE``         answer the request with this 4xx/5xx status in an error envelope
``sim_retry_after=S``       with ``sim_status``: a ``retry-after`` header
``sim_should_retry=B``      with ``sim_status``: an ``x-should-retry`` header
``sim_error=S``             an ``error`` event, ``flat`` or ``nested``, then ``response.failed``
``sim_error_at=K``          sequence number of that error (default: instead of the terminal event)
``sim_cancel_mode=M``       ``fail`` (cancel ends streams with ``response.failed``) or ``continue``
``sim_cached_tokens=N``     the usage reports N of the input tokens as cached (at most all of them)
``sim_reasoning_tokens=N``  the usage adds N reasoning tokens to the output tokens
``sim_web_search_calls=N``  the completed response's output starts with N ``web_search_call`` items
==========================  ==========================================================================
"""

from __future__ import annotations

import dataclasses
import math
import typing as t
from dataclasses import dataclass, field

__all__ = [
    "FAULT_OPTIONS",
    "FLAVOR_PREFIXES",
    "FaultError",
    "Faults",
    "Flavor",
    "SimulatorConfig",
    "parse_faults",
]

Framing = t.Literal["lf", "crlf", "cr"]
Transfer = t.Literal["chunked", "close"]
ErrorShape = t.Literal["flat", "nested"]
CancelMode = t.Literal["fail", "continue"]
CutMode = t.Literal["abort", "clean"]
Flavor = t.Literal["openai", "azure-v1", "azure-legacy"]

FLAVOR_PREFIXES: dict[Flavor, str] = {"openai": "/v1", "azure-v1": "/openai/v1", "azure-legacy": "/openai"}
"""The path prefix each flavor serves the API under (what a client's ``base_url`` ends with)."""


class FaultError(ValueError):
    """Raised by :func:`parse_faults` for an unknown option or a malformed value.

    The server turns it into a 400 in the OpenAI error envelope with ``param`` set to the option.
    """

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass(frozen=True)
class Faults:
    """The fault options in effect for one request.

    Generation options (``words``, ``delay_ms``, ``delta_bytes``, ``gap_*``, ``keepalive_*``,
    ``unicode``, ``error*``, ``cancel_mode`` and the usage ones) are fixed when a response is
    created. Connection options (``framing``, ``split``, ``transfer``, ``gzip``, ``comments``,
    ``no_sequence``, ``cut_*``) apply to each SSE connection. ``status``, ``retry_after`` and
    ``should_retry`` apply to the request carrying them.
    """

    words: int | None = None
    """Number of ``output_text.delta`` events; ``None`` uses :attr:`SimulatorConfig.words`."""
    delay_ms: float | None = None
    """Pause between generated events; ``None`` uses :attr:`SimulatorConfig.delay_ms`."""
    delta_bytes: int | None = None
    """Pad each delta to about this many bytes."""
    cut_after: int | None = None
    """Abort this connection's body after this many events were written."""
    cut_every: int | None = None
    """Abort every connection after this many events (never after the terminal event)."""
    cut_mode: CutMode = "abort"
    """``abort`` drops the connection mid-body; ``clean`` ends the body properly without a terminal event."""
    gap_at: int | None = None
    """Stay silent for :attr:`gap_s` seconds before generating the event with this sequence number."""
    gap_s: float = 1.0
    framing: Framing = "lf"
    split: bool = False
    transfer: Transfer = "chunked"
    gzip: bool = False
    keepalive_every: int | None = None
    keepalive_first: bool = False
    comments: bool = False
    no_sequence: bool = False
    """Write every event of this connection without its ``sequence_number``."""
    stamp: bool = False
    """Stamp each event or frame with the monotonic time it was sent (``sim_sent_at``)."""
    unicode: bool = False
    status: int | None = None
    retry_after: str | None = None
    should_retry: bool | None = None
    error: ErrorShape | None = None
    error_at: int | None = None
    """Sequence number of the injected ``error`` event; ``None`` puts it where the terminal event goes."""
    cancel_mode: CancelMode = "fail"
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    web_search_calls: int = 0

    def for_replay(self, defaults: Faults) -> Faults:
        """Return these faults with the per-request options reset to ``defaults``.

        This is what a stored response keeps for later ``GET ?stream=true`` replays: a ``sim_cut_after``
        or ``sim_status`` given at create time only applies to the create request itself.
        """
        return dataclasses.replace(
            self,
            cut_after=defaults.cut_after,
            status=defaults.status,
            retry_after=defaults.retry_after,
            should_retry=defaults.should_retry,
        )


@dataclass(frozen=True)
class SimulatorConfig:
    """Settings of one :class:`~wsgi_proxy.simulator.Simulator`.

    :param api_key: when set, API requests must carry the key; otherwise they get a 401. ``openai`` and
        ``azure-v1`` accept ``Authorization: Bearer <key>`` or ``api-key: <key>``; ``azure-legacy``
        only ``api-key: <key>``. The 401 is OpenAI's in ``openai`` and Azure's in the Azure flavors.
    :param delay_ms: pause between generated events of streamed and background responses.
    :param words: number of ``response.output_text.delta`` events per response.
    :param faults: fault options applied when a request gives none.
    :param replay_window_s: when set, ``GET ?stream=true`` on a response older than this is refused
        with OpenAI's "no longer be streamed" 400.
    :param max_responses: stored responses kept; the oldest finished ones are forgotten beyond this.
    :param max_stored_bytes: the same, for the bytes of event data the stored responses hold.
    :param flavor: which upstream to look like. ``openai`` serves the API under ``/v1``. ``azure-v1``
        serves it under ``/openai/v1`` (an ``api-version`` query parameter, when present, must be
        ``preview``, ``v1`` or :attr:`api_version`). ``azure-legacy`` serves it under ``/openai``, like
        the ``AzureOpenAI`` client expects, and every request must carry ``api-version=<api_version>``
        exactly once (missing: Azure's 404; another value: Azure's 400). Paths of the other flavors
        get a 404; ``/health`` and ``/_sim/*`` are the same in every flavor.
    :param api_version: the ``api-version`` the Azure flavors accept.
    :param websockets: serve the WebSocket mode of ``GET /v1/responses`` (``openai`` flavor only); when
        false, an upgrade is an ordinary GET (a 405), as on a server without the mode.
    :param websocket_max_age_s: how long a WebSocket connection lives (OpenAI's limit: 60 minutes).
    :param shared_writer: one thread writes every background stream whose faults leave its bytes
        plain (instead of a thread each), so that tens of thousands can be open at once; the capacity
        benchmarks use it, so that the simulator is not what they measure.
    """

    api_key: str | None = None
    delay_ms: float = 5.0
    words: int = 12
    faults: Faults = field(default_factory=Faults)
    replay_window_s: float | None = None
    max_responses: int = 1000
    max_stored_bytes: int = 256 * 1024 * 1024
    flavor: Flavor = "openai"
    api_version: str = "2025-04-01-preview"
    websockets: bool = True
    websocket_max_age_s: float = 3600.0
    shared_writer: bool = False

    def __post_init__(self) -> None:
        if self.flavor not in FLAVOR_PREFIXES:
            choices = ", ".join(repr(f) for f in FLAVOR_PREFIXES)
            raise ValueError(f"Unknown simulator flavor {self.flavor!r}; expected one of {choices}.")


def _int(name: str, raw: str, minimum: int, maximum: int | None = None) -> int:
    try:
        value = int(raw.strip(), 10)
    except ValueError:
        raise FaultError(name, f"Invalid value for '{name}': expected an integer, but got {raw!r}.") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise FaultError(name, f"Invalid value for '{name}': expected an integer {bound}, but got {value}.")
    return value


def _float(name: str, raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise FaultError(name, f"Invalid value for '{name}': expected a number, but got {raw!r}.") from None
    if not math.isfinite(value) or value < 0:
        raise FaultError(
            name, f"Invalid value for '{name}': expected a non-negative number, but got {raw!r}."
        )
    return value


def _bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true"):
        return True
    if lowered in ("0", "false"):
        return False
    raise FaultError(
        name, f"Invalid value for '{name}': expected one of '1', '0', 'true', 'false', but got {raw!r}."
    )


def _choice(name: str, raw: str, choices: tuple[str, ...]) -> str:
    if raw in choices:
        return raw
    allowed = ", ".join(f"'{c}'" for c in choices)
    raise FaultError(name, f"Invalid value for '{name}': expected one of {allowed}, but got {raw!r}.")


def _optional_int(minimum: int, maximum: int | None = None) -> t.Callable[[str, str], object]:
    return lambda name, raw: _int(name, raw, minimum, maximum)


def _retry_after(name: str, raw: str) -> str:
    _float(name, raw)
    return raw.strip()


# Option name -> (Faults field, value parser). The parser raises FaultError naming the option.
FAULT_OPTIONS: dict[str, tuple[str, t.Callable[[str, str], object]]] = {
    "sim_words": ("words", _optional_int(0, 1_000_000)),
    "sim_delay_ms": ("delay_ms", _float),
    "sim_delta_bytes": ("delta_bytes", _optional_int(1, 256 * 1024 * 1024)),
    "sim_cut_after": ("cut_after", _optional_int(0)),
    "sim_cut_every": ("cut_every", _optional_int(1)),
    "sim_cut_mode": ("cut_mode", lambda n, r: _choice(n, r, ("abort", "clean"))),
    "sim_gap_at": ("gap_at", _optional_int(0)),
    "sim_gap_s": ("gap_s", _float),
    "sim_framing": ("framing", lambda n, r: _choice(n, r, ("lf", "crlf", "cr"))),
    "sim_split": ("split", _bool),
    "sim_transfer": ("transfer", lambda n, r: _choice(n, r, ("chunked", "close"))),
    "sim_gzip": ("gzip", _bool),
    "sim_keepalive_every": ("keepalive_every", _optional_int(1)),
    "sim_keepalive_first": ("keepalive_first", _bool),
    "sim_comments": ("comments", _bool),
    "sim_no_sequence": ("no_sequence", _bool),
    "sim_unicode": ("unicode", _bool),
    "sim_stamp": ("stamp", _bool),
    "sim_status": ("status", _optional_int(400, 599)),
    "sim_retry_after": ("retry_after", _retry_after),
    "sim_should_retry": ("should_retry", _bool),
    "sim_error": ("error", lambda n, r: _choice(n, r, ("flat", "nested"))),
    "sim_error_at": ("error_at", _optional_int(0)),
    "sim_cancel_mode": ("cancel_mode", lambda n, r: _choice(n, r, ("fail", "continue"))),
    "sim_cached_tokens": ("cached_tokens", _optional_int(0, 1_000_000_000)),
    "sim_reasoning_tokens": ("reasoning_tokens", _optional_int(0, 1_000_000_000)),
    "sim_web_search_calls": ("web_search_calls", _optional_int(0, 100)),
}


def parse_faults(mapping: t.Mapping[str, str], defaults: Faults) -> Faults:
    """Overlay the ``sim_*`` entries of ``mapping`` on ``defaults``.

    Keys that do not start with ``sim_`` are ignored, so a whole query or metadata mapping can be
    passed in. ``sim_error_at`` without ``sim_error`` implies ``sim_error=flat``.

    :raises FaultError: for an unknown ``sim_*`` key or a malformed value.
    """
    changes: dict[str, object] = {}
    for name, raw in mapping.items():
        if not name.startswith("sim_"):
            continue
        option = FAULT_OPTIONS.get(name)
        if option is None:
            known = ", ".join(sorted(FAULT_OPTIONS))
            raise FaultError(name, f"Unknown parameter: '{name}'. Known simulator options: {known}.")
        attr, parse = option
        changes[attr] = parse(name, raw)
    if "error_at" in changes and "error" not in changes and defaults.error is None:
        changes["error"] = "flat"
    if not changes:
        return defaults
    return dataclasses.replace(defaults, **changes)  # type: ignore[arg-type]
