"""OpenTelemetry traces, when the operator asks for them: one span per request, one per upstream
attempt and one per resume, with the GenAI semantic conventions' attributes and the proxy's own.

Off unless the optional extra is installed (``pip install 'wsgi-proxy[otel]'``) and the standard
variables name an exporter endpoint (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``
keep it off. Off, nothing of OpenTelemetry is imported and a request pays one ``None`` check per
fact. On, the exporter (OTLP over HTTP) reads every other ``OTEL_*`` variable itself; the provider
is made in each worker process on its first span, after gunicorn forked it, and its batch
processor sends spans from a thread of its own, never from a request's.

A request's span continues the client's ``traceparent``; the upstream gets the ``traceparent`` of
the request's span instead of the client's, so that the upstream's own spans hang below it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import typing as t

if t.TYPE_CHECKING:  # pragma: no cover
    from opentelemetry.trace import Span, Tracer

__all__ = ["RequestTrace", "Tracing", "tracing_from_env"]

log = logging.getLogger("wsgi_proxy.tracing")

#: The GenAI conventions' operation name of each route the proxy names (what it is, not its path).
_OPERATIONS = {
    "create": "chat",
    "ws_create": "chat",
    "chat_completions": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
}


def tracing_from_env(environ: t.Mapping[str, str] = os.environ) -> Tracing | None:
    """A :class:`Tracing` when the standard variables ask for traces and the extra is installed."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return None
    if not (environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return None
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        log.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed, so no spans are"
            " sent: install wsgi-proxy[otel]."
        )
        return None
    return Tracing(environ.get("OTEL_SERVICE_NAME", "wsgi-proxy"))


class Tracing:
    """The process's tracer, made on first use in each process (so after gunicorn's fork).

    :param service_name: the ``service.name`` of the spans.
    :param exporter: makes the span exporter (default: OTLP over HTTP, configured by ``OTEL_*``).
    """

    def __init__(self, service_name: str, exporter: t.Callable[[], t.Any] | None = None) -> None:
        self._service_name = service_name
        self._exporter = exporter
        self._lock = threading.Lock()
        self._tracer: Tracer | None = None
        self._pid = 0

    def _the_tracer(self) -> Tracer:
        if self._tracer is None or self._pid != os.getpid():
            with self._lock:
                if self._tracer is None or self._pid != os.getpid():
                    self._tracer, self._pid = self._make_tracer(), os.getpid()
        return self._tracer

    def _make_tracer(self) -> Tracer:
        import atexit

        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": self._service_name}))
        provider.add_span_processor(BatchSpanProcessor((self._exporter or OTLPSpanExporter)()))
        atexit.register(provider.shutdown)  # a worker that exits sends what it still holds
        return provider.get_tracer("wsgi_proxy")

    def start(self, method: str, route: str, header: t.Callable[[str], str | None]) -> RequestTrace:
        """The span of one request, continuing the client's ``traceparent`` when it sent one
        (``header`` looks a request header up by name)."""
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier = {name: value for name in ("traceparent", "tracestate") if (value := header(name))}
        context = TraceContextTextMapPropagator().extract(carrier)
        span = self._the_tracer().start_span(
            f"{method} {route}",
            context=context,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": route},
        )
        return RequestTrace(self._the_tracer(), span)


class RequestTrace:
    """The spans of one request: its own, and a child for each upstream attempt and each resume."""

    def __init__(self, tracer: Tracer, span: Span) -> None:
        self._tracer = tracer
        self._span = span
        self._attempt: Span | None = None

    def child(self, method: str, route: str) -> RequestTrace:
        """The span of a request made within this one (a ``response.create`` on a WebSocket)."""
        from opentelemetry.trace import SpanKind, set_span_in_context

        span = self._tracer.start_span(
            f"{method} {route}",
            context=set_span_in_context(self._span),
            kind=SpanKind.SERVER,
            attributes={"http.route": route},
        )
        return RequestTrace(self._tracer, span)

    def traceparent(self) -> str:
        """The ``traceparent`` header that makes the upstream's spans children of this request's."""
        from opentelemetry.trace import set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, context=set_span_in_context(self._span))
        return carrier.get("traceparent", "")

    def attempt(self, upstream: str, number: int) -> None:
        """An attempt upstream begins (the one before, if still open, failed and was retried)."""
        self._end_attempt("retried")
        self._attempt = self._child(
            f"upstream attempt {number}",
            {"wsgi_proxy.upstream": upstream, "wsgi_proxy.attempt": number},
            kind="client",
        )

    def answered(self, upstream_request_id: str | None) -> None:
        """The attempt's upstream answered (its status line and headers)."""
        if self._attempt is not None and upstream_request_id:
            self._attempt.set_attribute("wsgi_proxy.upstream_request_id", upstream_request_id)
        self._end_attempt(None)

    def resumed(self, upstream: str, after: int | None, started: float, outcome: str) -> None:
        """One resume attempt of a broken stream, from ``started`` (a :func:`time.time`) until now."""
        attributes: dict[str, t.Any] = {"wsgi_proxy.upstream": upstream, "wsgi_proxy.resume.outcome": outcome}
        if after is not None:
            attributes["wsgi_proxy.resume.starting_after"] = after
        span = self._child("resume", attributes, kind="client", start=started)
        self._close(span, None if outcome == "resumed" else outcome)

    def finish(self, attributes: t.Mapping[str, t.Any], status: int | None, error: str | None) -> None:
        """The request is over: its attributes, its status, and its error if it failed."""
        self._end_attempt(error or "no answer")
        self._span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        if status is not None:
            self._span.set_attribute("http.response.status_code", status)
        failure = error if error is not None else (f"HTTP {status}" if (status or 0) >= 500 else None)
        self._close(self._span, failure)

    def _child(
        self, name: str, attributes: dict[str, t.Any], *, kind: str, start: float | None = None
    ) -> Span:
        from opentelemetry.trace import SpanKind, set_span_in_context

        return self._tracer.start_span(
            name,
            context=set_span_in_context(self._span),
            kind=SpanKind.CLIENT if kind == "client" else SpanKind.INTERNAL,
            attributes=attributes,
            start_time=None if start is None else int(start * 1e9),
        )

    def _end_attempt(self, error: str | None) -> None:
        if self._attempt is not None:
            self._close(self._attempt, error)
            self._attempt = None

    @staticmethod
    def _close(span: Span, error: str | None) -> None:
        if error is not None:
            from opentelemetry.trace import Status, StatusCode

            span.set_attribute("error.type", error.split(":", 1)[0])
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=time.time_ns())


def operation_of(route: str) -> str | None:
    """The GenAI conventions' ``gen_ai.operation.name`` of a route, or None for other calls."""
    return _OPERATIONS.get(route)
