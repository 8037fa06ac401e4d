"""The HTTP layer: routing, validation, the API endpoints and SSE framing on the socket.

Built on :mod:`http.server` rather than WSGI because the point is exact control of the bytes:
chunked or close-delimited bodies, split writes, and chunked bodies aborted without the last chunk.
"""

from __future__ import annotations

import gzip
import hmac
import json
import logging
import re
import secrets
import socket
import sys
import threading
import time
import typing as t
import urllib.parse
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import errors
from .batches import Batches
from .chat import ChatPlan, embeddings, image_generation, moderations, speech, transcription
from .config import FLAVOR_PREFIXES, FaultError, Faults, SimulatorConfig, parse_faults
from .conversations import Conversations, page
from .errors import ApiError
from .events import (
    JsonDict,
    Plan,
    count_tokens,
    delta_texts,
    input_items,
    input_text,
    iter_steps,
    new_id,
    response_object,
    strip_obfuscation,
    usage,
)
from .fanout import Fanout
from .files import Files
from .framing import SseWriter, stamped
from .recording import CloseReason, RecordedRequest, Recorder, StreamClosure
from .store import CancelRefused, Job, ResponseRecord, Store
from .watcher import ClientWatcher, Watch, peer_closed
from .websocket import accept as accept_websocket
from .websocket import serve_session

__all__ = ["MODELS", "NewResponse", "SimulatorServer", "peer_closed"]

logger = logging.getLogger(__name__)

MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-5", "gpt-5-mini", "o4-mini")

TERMINAL_EVENTS = frozenset({"response.completed", "response.failed", "response.incomplete"})

# Path pattern (below the flavor's prefix, see FLAVOR_PREFIXES) -> {method: handler method}; the first
# pattern that matches decides between 405 and 404.
_ROUTES: list[tuple[re.Pattern[str], dict[str, str]]] = [
    (re.compile(r"/responses"), {"POST": "_create"}),
    (re.compile(r"/responses/input_tokens"), {"POST": "_input_tokens"}),
    (re.compile(r"/responses/compact"), {"POST": "_compact"}),
    (re.compile(r"/responses/(?P<id>[^/]+)"), {"GET": "_retrieve", "DELETE": "_delete"}),
    (re.compile(r"/responses/(?P<id>[^/]+)/cancel"), {"POST": "_cancel"}),
    (re.compile(r"/responses/(?P<id>[^/]+)/input_items"), {"GET": "_input_items"}),
    (re.compile(r"/conversations"), {"POST": "_conversation_create"}),
    (
        re.compile(r"/conversations/(?P<id>[^/]+)"),
        {"GET": "_conversation_get", "POST": "_conversation_update", "DELETE": "_conversation_delete"},
    ),
    (re.compile(r"/conversations/(?P<id>[^/]+)/items"), {"POST": "_items_create", "GET": "_items_list"}),
    (
        re.compile(r"/conversations/(?P<id>[^/]+)/items/(?P<item>[^/]+)"),
        {"GET": "_item_get", "DELETE": "_item_delete"},
    ),
    (re.compile(r"/chat/completions"), {"POST": "_chat_completions"}),
    (re.compile(r"/completions"), {"POST": "_completions"}),
    (re.compile(r"/embeddings"), {"POST": "_embeddings"}),
    (re.compile(r"/moderations"), {"POST": "_moderations"}),
    (re.compile(r"/images/generations"), {"POST": "_images"}),
    (re.compile(r"/audio/speech"), {"POST": "_speech"}),
    (re.compile(r"/audio/(transcriptions|translations)"), {"POST": "_transcription"}),
    (re.compile(r"/files"), {"POST": "_file_upload", "GET": "_file_list"}),
    (re.compile(r"/files/(?P<id>[^/]+)"), {"GET": "_file_get", "DELETE": "_file_delete"}),
    (re.compile(r"/files/(?P<id>[^/]+)/content"), {"GET": "_file_content"}),
    (re.compile(r"/batches"), {"POST": "_batch_create", "GET": "_batch_list"}),
    (re.compile(r"/batches/(?P<id>[^/]+)"), {"GET": "_batch_get"}),
    (re.compile(r"/batches/(?P<id>[^/]+)/cancel"), {"POST": "_batch_cancel"}),
    (re.compile(r"/models"), {"GET": "_models"}),
    (re.compile(r"/models/(?P<id>[^/]+)"), {"GET": "_get_model"}),
]

# What azure-v1 accepts in an optional api-version, besides SimulatorConfig.api_version.
_AZURE_V1_API_VERSIONS = frozenset({"preview", "v1"})


def _read_chunked(rfile: t.BinaryIO) -> bytes:
    parts: list[bytes] = []
    while True:
        line = rfile.readline(65537)
        if not line:
            raise ValueError("The chunked request body ended early.")
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(parts)
        parts.append(rfile.read(size))
        rfile.readline(65537)


def _optional_bool(body: t.Mapping[str, t.Any], name: str) -> bool | None:
    value = body.get(name)
    if value is None or isinstance(value, bool):
        return value
    raise errors.invalid_type(name, "a boolean", value)


def _bool_arg(args: t.Mapping[str, str], name: str) -> bool | None:
    """A query boolean: only the literal ``true``/``false`` are accepted, like the API."""
    raw = args.get(name)
    if raw is None:
        return None
    if raw not in ("true", "false"):
        raise errors.invalid_value(
            name, f"Invalid value for '{name}': expected a boolean ('true' or 'false')."
        )
    return raw == "true"


def _model_object(name: str) -> JsonDict:
    return {"id": name, "object": "model", "created": 1_715_367_049, "owned_by": "system"}


#: The ``sequence_number`` member of an event's JSON, as the simulator writes it (``sim_no_sequence``).
_SEQUENCE_NUMBER = re.compile(rb',?"sequence_number":\s*[0-9]+')


def _conversation_id(value: object) -> str | None:
    """A create's ``conversation``: an id, or an object with one."""
    if isinstance(value, dict):
        value = value.get("id")
    if value is None or isinstance(value, str):
        return value
    raise errors.invalid_type("conversation", "a string or an object with an id", value)


def _plain(faults: Faults) -> bool:
    """Faults that leave a stream's bytes plain, as the shared writer writes them."""
    return (
        faults.framing == "lf"
        and faults.transfer == "chunked"
        and not (faults.split or faults.gzip or faults.comments or faults.no_sequence)
        and faults.cut_after is None
        and faults.cut_every is None
    )


class NewResponse(t.Protocol):
    """The handler's builder of a new response (what a WebSocket session creates with)."""

    def __call__(
        self,
        body: JsonDict,
        sim_args: t.Mapping[str, str],
        *,
        stream: bool,
        background: bool,
        find: t.Callable[[str], ResponseRecord | None],
        websocket: bool = False,
    ) -> tuple[ResponseRecord, Job, Faults]: ...


@dataclass
class _Call:
    """What an endpoint gets: path parameters, decoded query pairs and the raw body."""

    params: dict[str, str]
    query: list[tuple[str, str]]
    body: bytes

    @property
    def args(self) -> dict[str, str]:
        """Query parameters, the last value winning."""
        return dict(self.query)

    @property
    def sim_args(self) -> dict[str, str]:
        return {k: v for k, v in self.query if k.startswith("sim_")}


class SimulatorServer(ThreadingHTTPServer):
    """A threading HTTP server carrying the simulator's config, store and recorder."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    # The default backlog of 5 makes bursts of connections wait for SYN retries (a second or more); the
    # capacity benchmark opens thousands at once. The kernel caps it at net.core.somaxconn.
    request_queue_size = 4096

    def __init__(
        self, address: tuple[str, int], config: SimulatorConfig, store: Store, recorder: Recorder
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.config = config
        self.store = store
        self.recorder = recorder
        self.watcher = ClientWatcher()
        """Notices the clients of waiting SSE connections leaving."""
        self.conversations = Conversations()
        self.files = Files()
        self.batches = Batches(self.files)
        self.fanout = Fanout(recorder) if config.shared_writer else None
        """Writes plain background streams for their handlers (``SimulatorConfig.shared_writer``)."""
        self._handed_over: set[socket.socket] = set()
        self._handed_lock = threading.Lock()
        super().__init__(address, _Handler)

    def hand_over(self, request: socket.socket) -> socket.socket:
        """A copy of a handler's connection for the shared writer; the handler's own is then closed
        without shutting the connection down."""
        with self._handed_lock:
            self._handed_over.add(request)
        return request.dup()

    def shutdown_request(self, request: t.Any) -> None:
        with self._handed_lock:
            handed = request in self._handed_over
            self._handed_over.discard(request)
        if handed:
            self.close_request(request)  # the writer's copy keeps the connection
        else:
            super().shutdown_request(request)

    def server_close(self) -> None:
        super().server_close()
        if self.fanout is not None:
            self.fanout.close()
        self.files.close()
        self.watcher.close()

    def handle_error(self, request: t.Any, client_address: t.Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            logger.debug("simulator connection from %s failed", client_address, exc_info=True)
        else:
            logger.exception("simulator failed while handling a request from %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "openai-simulator"
    sys_version = ""
    disable_nagle_algorithm = True

    _request_id = ""
    _started = 0.0
    _gzip = False

    @property
    def _server(self) -> SimulatorServer:
        return t.cast(SimulatorServer, self.server)

    def setup(self) -> None:
        super().setup()
        self._server.recorder.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._server.recorder.untrack(self.connection)

    def log_message(self, format: str, *args: t.Any) -> None:
        logger.debug("simulator: " + format, *args)

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_DELETE = do_PUT = do_PATCH = do_GET

    # -- plumbing ---------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        self._request_id = "req_" + secrets.token_hex(16)
        self._started = time.monotonic()
        self._gzip = False
        path, _, query = self.path.partition("?")
        try:
            try:
                # An upload is copied to disk as it arrives (by its endpoint), never read whole here.
                uploads = self.command == "POST" and path.endswith("/files")
                body = b"" if uploads else self._read_body()
            except ValueError:
                self.close_connection = True
                self._send_error(ApiError(400, "The request body could not be read."))
                return
            if path == "/health" or path.startswith("/_sim/"):
                self._internal(path, query)
                return
            self._server.recorder.request(
                RecordedRequest(
                    method=self.command,
                    path=path,
                    query=query,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    raw_headers=list(self.headers.items()),
                    body=body,
                    time=time.monotonic(),
                )
            )
            try:
                if self._wants_websocket(path):
                    self._websocket(query)
                else:
                    self._route(path, query, body)
            except ApiError as exc:
                self._send_error(exc)
        except OSError:
            # The client went away while we were answering; there is nobody left to tell.
            self.close_connection = True

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return _read_chunked(t.cast(t.BinaryIO, self.rfile))
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise ValueError("negative Content-Length")
        return self.rfile.read(length) if length else b""

    def _route(self, path: str, query: str, body: bytes) -> None:
        config = self._server.config
        prefix = FLAVOR_PREFIXES[config.flavor]
        sub = path[len(prefix) :] if path.startswith(prefix + "/") else None
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        if config.flavor == "openai":
            self._check_auth()
        else:
            # Azure's gateway refuses unknown paths and api-versions before it looks at the key.
            if sub is None or not any(pattern.fullmatch(sub) for pattern, _ in _ROUTES):
                raise errors.azure_resource_not_found()
            self._check_api_version([v for k, v in pairs if k == "api-version"])
            self._check_azure_auth(bearer=config.flavor == "azure-v1")
        if sub is None:
            raise ApiError(404, f"Invalid URL ({self.command} {path})")
        for pattern, methods in _ROUTES:
            match = pattern.fullmatch(sub)
            if match is None:
                continue
            name = methods.get(self.command)
            if name is None:
                raise ApiError(405, f"Invalid method for URL ({self.command} {path})")
            params = {k: urllib.parse.unquote(v) for k, v in match.groupdict().items()}
            call = _Call(params, pairs, body)
            faults = self._faults(call.sim_args, config.faults)
            if faults.status is not None:
                raise errors.injected_error(faults)
            self._gzip = faults.gzip
            getattr(self, name)(call)
            return
        raise ApiError(404, f"Invalid URL ({self.command} {path})")

    def _wants_websocket(self, path: str) -> bool:
        """An upgrade of ``GET /responses`` that this simulator serves (else it is a plain request)."""
        config = self._server.config
        return (
            config.websockets
            and config.flavor == "openai"
            and self.command == "GET"
            and path == FLAVOR_PREFIXES[config.flavor] + "/responses"
            and self.headers.get("Upgrade", "").lower() == "websocket"
        )

    def _websocket(self, query: str) -> None:
        """Check the key and faults, answer 101, then serve the connection on this thread."""
        self._check_auth()
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        faults = self._faults({k: v for k, v in pairs if k.startswith("sim_")}, self._server.config.faults)
        if faults.status is not None:
            raise errors.injected_error(faults)
        self.close_connection = True
        if not accept_websocket(
            self.path, self.headers.items(), t.cast(t.BinaryIO, self.wfile), self.connection
        ):
            return
        server = self._server
        serve_session(
            self.connection,
            self._new_response,
            server.store,
            server.recorder,
            server.config.websocket_max_age_s,
        )

    def _check_api_version(self, versions: list[str]) -> None:
        """``azure-legacy`` needs exactly one ``api-version=<api_version>``; ``azure-v1`` takes none or one
        of ``preview``, ``v1`` and ``api_version``."""
        config = self._server.config
        if config.flavor == "azure-legacy":
            if not versions:
                raise errors.azure_resource_not_found()
            accepted = {config.api_version}
        else:
            if not versions:
                return
            accepted = {config.api_version, *_AZURE_V1_API_VERSIONS}
        if len(versions) > 1 or versions[0] not in accepted:
            raise errors.azure_api_version_unsupported()

    def _check_azure_auth(self, *, bearer: bool) -> None:
        """The key in ``api-key``, or (``bearer``) also in ``Authorization: Bearer``."""
        expected = self._server.config.api_key
        if expected is None:
            return
        candidates = [self.headers.get("api-key", "").strip()]
        if bearer:
            scheme, _, token = self.headers.get("Authorization", "").strip().partition(" ")
            if scheme.lower() == "bearer":
                candidates.append(token.strip())
        if not any(c and hmac.compare_digest(c.encode(), expected.encode()) for c in candidates):
            raise errors.azure_access_denied()

    @staticmethod
    def _faults(mapping: t.Mapping[str, str], defaults: Faults) -> Faults:
        try:
            return parse_faults(mapping, defaults)
        except FaultError as exc:
            raise errors.fault_error(exc) from None

    def _check_auth(self) -> None:
        expected = self._server.config.api_key
        if expected is None:
            return
        candidates: list[str] = []
        authorization = self.headers.get("Authorization")
        if authorization is not None:
            scheme, _, token = authorization.strip().partition(" ")
            candidates.append(token.strip() if scheme.lower() == "bearer" else authorization.strip())
        candidates.append(self.headers.get("api-key", "").strip())
        candidates = [c for c in candidates if c]
        if not candidates:
            raise errors.missing_api_key()
        if not any(hmac.compare_digest(c.encode(), expected.encode()) for c in candidates):
            raise errors.incorrect_api_key(candidates[0])

    def _common_headers(self) -> None:
        self.send_header("x-request-id", self._request_id)
        self.send_header("openai-version", "2020-10-01")
        self.send_header("openai-organization", "user-simulator")
        self.send_header("openai-processing-ms", str(int((time.monotonic() - self._started) * 1000)))
        self.send_header("x-ratelimit-limit-requests", "10000")
        self.send_header("x-ratelimit-remaining-requests", "9999")
        self.send_header("x-ratelimit-reset-requests", "6ms")
        if self._server.config.flavor != "openai":
            self.send_header("apim-request-id", str(uuid.UUID(self._request_id[4:])))

    def _send_json(self, status: int, payload: object, headers: t.Mapping[str, str] | None = None) -> None:
        body = json.dumps(payload, indent=2, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self._common_headers()
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self._gzip:
            body = gzip.compress(body)
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_error(self, exc: ApiError) -> None:
        self._send_json(exc.status, exc.envelope(), exc.headers)

    def _client_gone(self) -> bool:
        return peer_closed(self.connection)

    def _internal(self, path: str, query: str) -> None:
        recorder = self._server.recorder
        if (self.command, path) == ("GET", "/health"):
            self._send_json(200, {"status": "ok"})
        elif (self.command, path) == ("GET", "/_sim/requests"):
            self._send_json(200, [r.to_dict() for r in recorder.requests])
        elif (self.command, path) == ("GET", "/_sim/streams"):
            counts: JsonDict = {"open": recorder.open_streams, "websockets": recorder.open_websockets}
            # ?closures=false answers the counts alone, cheaply however many streams have closed.
            if ("closures", "false") not in urllib.parse.parse_qsl(query):
                counts["closures"] = [c._asdict() for c in recorder.closures]
            self._send_json(200, counts)
        elif (self.command, path) == ("POST", "/_sim/reset"):
            recorder.reset()
            self._send_json(200, {"ok": True})
        elif (self.command, path) == ("POST", "/_sim/stop"):
            # Every running response ends (``stopped``), as when the simulator stops, and it serves on.
            self._server.store.stop_all()
            self._send_json(200, {"ok": True})
        else:
            self._send_error(ApiError(404, f"Invalid URL ({self.command} {path})"))

    # -- API endpoints ----------------------------------------------------------------------------

    def _json_body(self, call: _Call) -> JsonDict:
        try:
            data = json.loads(call.body) if call.body.strip() else None
        except ValueError:
            raise errors.bad_json() from None
        if not isinstance(data, dict):
            raise errors.invalid_type("body", "an object", data)
        return data

    @staticmethod
    def _require_model(body: t.Mapping[str, t.Any]) -> str:
        model = body.get("model")
        if model is None:
            raise errors.missing_parameter("model")
        if not isinstance(model, str):
            raise errors.invalid_type("model", "a string", model)
        return model

    def _create(self, call: _Call) -> None:
        body = self._json_body(call)
        stream = bool(_optional_bool(body, "stream"))
        background = bool(_optional_bool(body, "background"))
        record, job, faults = self._new_response(
            body, call.sim_args, stream=stream, background=background, find=self._server.store.get
        )
        snapshot = record.current()
        self._gzip = faults.gzip
        self._server.store.add(record)
        if background:
            job.start(self._server.store.pacer)
            if stream:
                self._stream(record, 0, faults)
            else:
                self._send_json(200, snapshot)
        elif stream:
            job.start(self._server.store.pacer)
            self._stream(record, 0, faults, job=job)
        else:
            # A plain JSON reply is generated at once; only an injected gap makes it wait, and then a
            # client that leaves is noticed and recorded like a stream's.
            opened = time.monotonic()
            finished = job.run(poll=self._client_gone, pace=False)
            record.discard_log()
            if not finished:
                self.close_connection = True
                closure = StreamClosure(record.id, opened, time.monotonic(), "client_gone")
                self._server.recorder.stream_closed(closure, was_open=False)
                return
            self._send_json(200, record.current())

    def _new_response(
        self,
        body: JsonDict,
        sim_args: t.Mapping[str, str],
        *,
        stream: bool,
        background: bool,
        find: t.Callable[[str], ResponseRecord | None],
        websocket: bool = False,
    ) -> tuple[ResponseRecord, Job, Faults]:
        """The record and job of a new response (not stored yet), and the faults in effect for it.

        :param find: where a ``previous_response_id`` is looked up (a WebSocket connection's cache first).
        """
        config = self._server.config
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise errors.invalid_type("metadata", "an object", metadata)
        for key, value in (metadata or {}).items():
            if not isinstance(value, str):
                raise errors.invalid_type(f"metadata.{key}", "a string", value)
        stored_faults = self._faults(metadata or {}, config.faults)
        faults = self._faults(sim_args, stored_faults)
        if faults.status is not None:
            raise errors.injected_error(faults)
        self._require_model(body)
        if background and _optional_bool(body, "store") is False:
            raise ApiError(
                400,
                "Background mode requires store=true. Set store to true or remove background.",
                param="background",
                code="unsupported_parameter",
            )
        source = body.get("input")
        if source is not None and not isinstance(source, str | list):
            raise errors.invalid_type("input", "a string or an array", source)
        previous = body.get("previous_response_id")
        if previous is not None:
            if not isinstance(previous, str):
                raise errors.invalid_type("previous_response_id", "a string", previous)
            if find(previous) is None:
                raise errors.previous_response_not_found(previous)
        conversation = _conversation_id(body.get("conversation"))
        if conversation is not None:
            if previous is not None:
                raise ApiError(
                    400,
                    "Cannot use both 'previous_response_id' and 'conversation'. Use one of them.",
                    param="conversation",
                )
            self._server.conversations.add_items(conversation, input_items(source), "conversation")
        stream_options = body.get("stream_options")
        obfuscate = not (
            isinstance(stream_options, dict) and stream_options.get("include_obfuscation") is False
        )
        text = input_text(source)
        instructions = body.get("instructions")
        snapshot = response_object(
            response_id=new_id("resp_"),
            body=body,
            status="queued" if background else "in_progress",
            background=background,
        )
        plan = Plan(
            response=snapshot,
            deltas=delta_texts(
                text,
                config.words if faults.words is None else faults.words,
                faults.delta_bytes,
                faults.unicode,
            ),
            input_tokens=count_tokens(text + (" " + instructions if isinstance(instructions, str) else "")),
            obfuscate=obfuscate,
            keepalive_every=faults.keepalive_every,
            keepalive_first=faults.keepalive_first,
            error=faults.error,
            error_at=faults.error_at,
            cached_tokens=faults.cached_tokens,
            reasoning_tokens=faults.reasoning_tokens,
            web_search_calls=faults.web_search_calls,
        )
        if conversation is not None:
            snapshot["conversation"] = {"id": conversation}
        record = ResponseRecord(
            snapshot=snapshot,
            background=background,
            stream=stream,
            faults=stored_faults.for_replay(config.faults),
            input_items=input_items(source),
            cancel_mode=faults.cancel_mode,
            websocket=websocket,
        )
        if conversation is not None:
            conversations = self._server.conversations
            record.on_complete = lambda final: conversations.append_output(
                conversation, final.get("output", [])
            )
        delay_ms = config.delay_ms if faults.delay_ms is None else faults.delay_ms
        job = Job(record, iter_steps(plan), delay_s=delay_ms / 1000, gap_at=faults.gap_at, gap_s=faults.gap_s)
        return record, job, faults

    def _record(self, call: _Call) -> ResponseRecord:
        record = self._server.store.get(call.params["id"])
        if record is None:
            raise errors.response_not_found(call.params["id"])
        return record

    def _retrieve(self, call: _Call) -> None:
        args = call.args
        stream = _bool_arg(args, "stream")
        include_obfuscation = _bool_arg(args, "include_obfuscation")
        raw_after = args.get("starting_after")
        if raw_after is not None and not (raw_after.isascii() and raw_after.isdigit()):
            raise errors.invalid_value(
                "starting_after",
                "Invalid value for 'starting_after': expected a non-negative integer,"
                f" but got {raw_after!r}.",
            )
        record = self._record(call)
        faults = self._faults(call.sim_args, record.faults)
        self._gzip = faults.gzip
        if not stream:
            self._send_json(200, record.current())
            return
        if not (record.background or record.replayable):
            raise errors.stream_refused(
                "This response cannot be streamed because it was not created with background=true."
            )
        if not record.stream:
            raise errors.stream_refused(
                "This response cannot be streamed because it was not created with stream=true."
            )
        window = self._server.config.replay_window_s
        if window is not None and time.monotonic() - record.created > window:
            raise errors.stream_refused(
                "This response can no longer be streamed because it is more than 5 minutes old."
            )
        start = 0 if raw_after is None else int(raw_after) + 1
        self._stream(record, start, faults, strip=include_obfuscation is False)

    def _cancel(self, call: _Call) -> None:
        record = self._record(call)
        try:
            snapshot = record.cancel()
        except CancelRefused as exc:
            raise ApiError(400, str(exc)) from None
        self._send_json(200, snapshot)

    def _delete(self, call: _Call) -> None:
        record = self._record(call)
        self._server.store.delete(record.id)
        self._send_json(200, {"id": record.id, "object": "response", "deleted": True})

    def _input_items(self, call: _Call) -> None:
        self._send_json(200, page(list(self._record(call).input_items), call.args))

    def _input_tokens(self, call: _Call) -> None:
        body = self._json_body(call)
        instructions = body.get("instructions")
        text = input_text(body.get("input")) + (" " + instructions if isinstance(instructions, str) else "")
        self._send_json(200, {"object": "response.input_tokens", "input_tokens": count_tokens(text)})

    def _compact(self, call: _Call) -> None:
        body = self._json_body(call)
        self._require_model(body)
        items = input_items(body.get("input"))
        previous = body.get("previous_response_id")
        if isinstance(previous, str):
            record = self._server.store.get(previous)
            if record is None:
                raise errors.previous_response_not_found(previous)
            items = record.input_items + items
        user_messages = [i for i in items if i.get("type") == "message" and i.get("role") == "user"]
        compaction = {
            "id": new_id("cmp_"),
            "type": "compaction",
            "encrypted_content": "gAAAAA" + secrets.token_urlsafe(48),
        }
        tokens = count_tokens(input_text(body.get("input")))
        self._send_json(
            200,
            {
                "id": new_id("cmp_"),
                "object": "response.compaction",
                "created_at": int(time.time()),
                "output": [*user_messages, compaction],
                "usage": usage(tokens, max(1, tokens // 4)),
            },
        )

    def _conversation_create(self, call: _Call) -> None:
        self._send_json(200, self._server.conversations.create(self._json_body(call)))

    def _conversation_get(self, call: _Call) -> None:
        self._send_json(200, self._server.conversations.retrieve(call.params["id"]))

    def _conversation_update(self, call: _Call) -> None:
        self._send_json(200, self._server.conversations.update(call.params["id"], self._json_body(call)))

    def _conversation_delete(self, call: _Call) -> None:
        self._send_json(200, self._server.conversations.delete(call.params["id"]))

    def _items_create(self, call: _Call) -> None:
        added = self._server.conversations.add_items(call.params["id"], self._json_body(call).get("items"))
        self._send_json(200, page(added, {"limit": "100"}, default_order="asc"))

    def _items_list(self, call: _Call) -> None:
        self._send_json(200, page(self._server.conversations.items(call.params["id"]), call.args))

    def _item_get(self, call: _Call) -> None:
        self._send_json(200, self._server.conversations.item(call.params["id"], call.params["item"]))

    def _item_delete(self, call: _Call) -> None:
        self._send_json(200, self._server.conversations.delete_item(call.params["id"], call.params["item"]))

    def _chat_completions(self, call: _Call) -> None:
        self._chat(call, legacy=False)

    def _completions(self, call: _Call) -> None:
        self._chat(call, legacy=True)

    def _chat(self, call: _Call, *, legacy: bool) -> None:
        body = self._json_body(call)
        self._require_model(body)
        config = self._server.config
        metadata = body.get("metadata")
        given = (
            {k: v for k, v in metadata.items() if isinstance(v, str)} if isinstance(metadata, dict) else {}
        )
        faults = self._faults(call.sim_args, self._faults(given, config.faults))
        plan = ChatPlan(
            body, config.words if faults.words is None else faults.words, legacy=legacy, faults=faults
        )
        if not _optional_bool(body, "stream"):
            self._send_json(200, plan.completion())
            return
        recorder = self._server.recorder
        opened = time.monotonic()
        recorder.stream_opened()
        reason: CloseReason = "client_gone"
        delay = (config.delay_ms if faults.delay_ms is None else faults.delay_ms) / 1000
        try:
            self._stream_head(chunked=True, gzip=False)
            writer = SseWriter(self.wfile.write, framing=faults.framing, split=faults.split)
            for index, data in enumerate(plan.chunks()):
                if faults.cut_after is not None and index >= faults.cut_after:
                    reason = self._cut(faults, writer)
                    return
                if index:
                    time.sleep(delay)
                writer.data(data)
            writer.finish()
            reason = "complete"
        except OSError:
            reason = "client_gone"
        finally:
            if reason != "complete":
                self.close_connection = True
            recorder.stream_closed(StreamClosure(plan.id, opened, time.monotonic(), reason))

    def _embeddings(self, call: _Call) -> None:
        body = self._json_body(call)
        self._require_model(body)
        self._send_json(200, embeddings(body))

    def _images(self, call: _Call) -> None:
        self._send_json(200, image_generation(self._json_body(call)))

    def _speech(self, call: _Call) -> None:
        audio = speech(self._json_body(call))
        self.send_response(200)
        self.send_header("Content-Type", "audio/mpeg")
        self._common_headers()
        self.send_header("Content-Length", str(len(audio)))
        self.end_headers()
        self.wfile.write(audio)

    def _transcription(self, call: _Call) -> None:
        if not self.headers.get("Content-Type", "").startswith("multipart/form-data"):
            raise ApiError(400, "Upload the recording as multipart/form-data.", param="file")
        self._send_json(200, transcription(call.body))

    def _moderations(self, call: _Call) -> None:
        self._send_json(200, moderations(self._json_body(call)))

    def _file_upload(self, call: _Call) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "Send uploads with a Content-Length.")
        length = int(self.headers.get("Content-Length") or 0)
        files = self._server.files
        uploaded = files.upload(t.cast(t.BinaryIO, self.rfile), length, self.headers.get("Content-Type", ""))
        self._send_json(200, uploaded)

    def _file_list(self, call: _Call) -> None:
        self._send_json(200, self._server.files.listing())

    def _file_get(self, call: _Call) -> None:
        self._send_json(200, self._server.files.get(call.params["id"]).public())

    def _file_delete(self, call: _Call) -> None:
        self._send_json(200, self._server.files.delete(call.params["id"]))

    def _file_content(self, call: _Call) -> None:
        files = self._server.files
        stored = files.get(call.params["id"])
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self._common_headers()
        self.send_header("Content-Length", str(stored.bytes))
        self.end_headers()
        for block in files.content(stored.id):
            self.wfile.write(block)

    def _batch_create(self, call: _Call) -> None:
        self._send_json(200, self._server.batches.create(self._json_body(call)))

    def _batch_list(self, call: _Call) -> None:
        self._send_json(200, self._server.batches.listing())

    def _batch_get(self, call: _Call) -> None:
        self._send_json(200, self._server.batches.get(call.params["id"]))

    def _batch_cancel(self, call: _Call) -> None:
        self._send_json(200, self._server.batches.cancel(call.params["id"]))

    def _models(self, call: _Call) -> None:
        self._send_json(200, {"object": "list", "data": [_model_object(m) for m in MODELS]})

    def _get_model(self, call: _Call) -> None:
        name = call.params["id"]
        if name not in MODELS:
            raise ApiError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        self._send_json(200, _model_object(name))

    # -- SSE --------------------------------------------------------------------------------------

    def _stream(
        self,
        record: ResponseRecord,
        start: int,
        faults: Faults,
        *,
        job: Job | None = None,
        strip: bool = False,
    ) -> None:
        """Send the record's events from index ``start`` on, following live ones to the end.

        ``job`` is the generator of a synchronous stream; it stops when this connection goes away.
        """
        chunked = faults.transfer == "chunked"
        if job is None and not strip and self._server.fanout is not None and _plain(faults):
            self._hand_over(record, start, stamp=faults.stamp)
            return
        recorder = self._server.recorder
        opened = time.monotonic()
        recorder.stream_opened()
        reason: CloseReason = "client_gone"
        try:
            self._stream_head(chunked=chunked, gzip=faults.gzip)
            writer = SseWriter(
                self.wfile.write,
                framing=faults.framing,
                split=faults.split,
                chunked=chunked,
                gzip=faults.gzip,
            )
            reason = self._pump(record, start, faults, writer, strip)
        except OSError:
            reason = "client_gone"
        finally:
            if reason not in ("complete", "cancelled"):
                self.close_connection = True
            recorder.stream_closed(StreamClosure(record.id, opened, time.monotonic(), reason))
            if job is not None:
                if reason in ("client_gone", "cut"):
                    job.stop()
                    job.join(1.0)
                record.discard_log()

    def _stream_head(self, *, chunked: bool, gzip: bool) -> None:
        """The status line and headers of an SSE answer."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self._common_headers()
        self.send_header("Cache-Control", "no-cache")
        # Connection: close also makes http.server close the socket once the body is done.
        self.send_header(*(("Transfer-Encoding", "chunked") if chunked else ("Connection", "close")))
        if gzip:
            self.send_header("Content-Encoding", "gzip")
        self.end_headers()

    def _hand_over(self, record: ResponseRecord, start: int, *, stamp: bool) -> None:
        """Send the headers, then leave the body to the shared writer."""
        fanout = self._server.fanout
        assert fanout is not None
        self._stream_head(chunked=True, gzip=False)
        self.wfile.flush()
        self.close_connection = True
        fanout.serve(self._server.hand_over(self.connection), record, start, stamp=stamp)

    def _pump(
        self, record: ResponseRecord, index: int, faults: Faults, writer: SseWriter, strip: bool
    ) -> CloseReason:
        if faults.cut_after == 0:
            return self._cut(faults, writer)
        watcher = self._server.watcher
        watch = watcher.watch(self.connection, record.wake)
        try:
            return self._follow(record, index, faults, writer, strip, watch)
        finally:
            watcher.unwatch(watch)

    @staticmethod
    def _cut(faults: Faults, writer: SseWriter) -> CloseReason:
        if faults.cut_mode == "clean":
            writer.finish()
        return "cut"

    def _follow(
        self, record: ResponseRecord, index: int, faults: Faults, writer: SseWriter, strip: bool, watch: Watch
    ) -> CloseReason:
        """Write events as they are logged until the end, a cut, or the client leaving."""
        written = 0
        while True:
            events, finished = record.wait_from(index, interrupted=lambda: watch.gone)
            for event in events:
                if faults.comments and written:
                    writer.comment()
                data = event.data
                if strip and event.type == "response.output_text.delta":
                    data = strip_obfuscation(data)
                if faults.no_sequence:
                    data = _SEQUENCE_NUMBER.sub(b"", data)
                if faults.stamp:
                    data = stamped(data)
                writer.event(event.type, data)
                written += 1
                index += 1
                if faults.cut_after is not None and written >= faults.cut_after:
                    return self._cut(faults, writer)
                if (
                    faults.cut_every is not None
                    and written >= faults.cut_every
                    and event.type not in TERMINAL_EVENTS
                ):
                    return self._cut(faults, writer)
            if finished:
                writer.finish()
                return "complete" if record.end_reason == "complete" else "cancelled"
            if watch.gone:
                return "client_gone"
