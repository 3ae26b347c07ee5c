"""Logging, tracing and metrics set-up, owned by the runtime.

Logs are structlog JSON (or console) lines bound to trace ids. Tracing always
runs an SDK tracer provider so every published message carries a W3C
``traceparent``; spans are exported only when an exporter is configured.
Metrics are Prometheus collectors served on ``/metrics``.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping, Sequence
from typing import Any

import structlog
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes
from prometheus_client import Counter, Gauge, Histogram

from gateway.contract.addresses import mask_email, mask_phone

#: Header names whose values never reach a log line.
SECRET_KEYS = frozenset(
    {"authorization", "x-twilio-signature", "auth_token", "password", "secret", "token", "sig"}
)


def get_logger(name: str) -> Any:
    """A structlog logger named ``name`` (configured by :func:`configure_logging`)."""
    return structlog.get_logger(name)


def _add_trace_ids(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event.setdefault("span_id", format(ctx.span_id, "016x"))
    return event


#: Phone numbers as providers and we write them (E.164, optionally with separators).
_PHONE = re.compile(r"(?<![\w+])\+\d(?:[\d\s().-]{5,18}\d)")
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")


def _mask_text(text: str) -> str:
    text = _PHONE.sub(lambda m: mask_phone(re.sub(r"[^\d+]", "", m.group())), text)
    return _EMAIL.sub(lambda m: mask_email(m.group()), text)


def _mask(value: Any) -> Any:
    if isinstance(value, str):
        return _mask_text(value)
    if isinstance(value, list | tuple):
        return type(value)(_mask(v) for v in value)
    if isinstance(value, dict):
        return {k: "***" if str(k).lower() in SECRET_KEYS else _mask(v) for k, v in value.items()}
    return value


def _redact(_: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # Rule 8: secrets never reach logs; phone numbers and emails are masked
    # at INFO and above (DEBUG keeps them for local troubleshooting).
    mask = method != "debug"
    for key in list(event):
        if key.lower() in SECRET_KEYS:
            event[key] = "***"
        elif mask and key not in ("timestamp", "level", "trace_id", "span_id"):
            event[key] = _mask(event[key])
    return event


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Configure structlog (and stdlib logging, for libraries) once per process."""
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_trace_ids,
            # Render tracebacks first, so the redaction covers what they say too.
            structlog.processors.format_exc_info,
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr)


def configure_tracing(
    service_name: str,
    *,
    otlp_endpoint: str | None = None,
    console: bool = False,
    exporter: SpanExporter | None = None,
) -> TracerProvider:
    """Install an SDK tracer provider; export spans where configured.

    ``exporter`` is for tests (e.g. an InMemorySpanExporter).
    """
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    if console:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def ensure_tracing(service_name: str, *, otlp_endpoint: str | None, console: bool) -> None:
    """Install an SDK tracer provider unless one is installed already.

    Without one the OpenTelemetry API is a no-op and published messages would
    carry no ``traceparent``.
    """
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        configure_tracing(service_name, otlp_endpoint=otlp_endpoint, console=console)


class _UnexportedTracer(trace.Tracer):
    """Span contexts without span records, for a provider that exports nothing.

    With no span processor on the SDK provider, a recorded span is built and
    thrown away: a measurable share of a webhook's CPU. This tracer gives the
    same span context the SDK would (trace id inherited or new, a new span id,
    the provider's sampler deciding the flags), so ``traceparent`` headers and
    the trace ids in log lines are unchanged, but records nothing. As soon as
    a processor is added to the provider, :func:`tracer` hands out the real
    SDK tracer again.
    """

    def __init__(self, provider: TracerProvider) -> None:
        self._sampler = provider.sampler
        self._ids = provider.id_generator
        # The SDK's default sampler, decided here without its result objects.
        self._parent_based_on = provider.sampler is sampling.DEFAULT_ON

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: trace.SpanKind = trace.SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[trace.Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        parent = trace.get_current_span(context).get_span_context()
        if parent.is_valid:
            trace_id, random_id = parent.trace_id, parent.trace_flags.random_trace_id
        else:
            trace_id, random_id = self._ids.generate_trace_id(), self._ids.is_trace_id_random()
        trace_state: trace.TraceState | None
        if self._parent_based_on:
            # ParentBased(ALWAYS_ON): a child follows its parent's sampled flag
            # and keeps its trace state; a root is sampled. This is what
            # should_sample answers, at a fraction of the cost per span.
            if parent.is_valid:
                sampled, trace_state = parent.trace_flags.sampled, parent.trace_state
            else:
                sampled, trace_state = True, None
        else:
            result = self._sampler.should_sample(context, trace_id, name, kind, attributes, links)
            sampled = result.decision is Decision.RECORD_AND_SAMPLE
            trace_state = result.trace_state
        flags = trace.TraceFlags.SAMPLED if sampled else trace.TraceFlags.DEFAULT
        if random_id:
            flags |= trace.TraceFlags.RANDOM_TRACE_ID
        return trace.NonRecordingSpan(
            trace.SpanContext(
                trace_id,
                self._ids.generate_span_id(),
                is_remote=False,
                trace_flags=trace.TraceFlags(flags),
                trace_state=trace_state,
            )
        )

    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: Context | None = None,
        kind: trace.SpanKind = trace.SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[trace.Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> _CurrentSpan:
        """The span, made current for the ``with`` block (a context manager only)."""
        return _CurrentSpan(self.start_span(name, context, kind, attributes, links), end_on_exit)


class _CurrentSpan:
    """``trace.use_span`` for a non-recording span, without two generator frames.

    A non-recording span records no exception and no status, so entering is
    attaching its context and leaving is detaching it.
    """

    __slots__ = ("_end", "_span", "_token")

    def __init__(self, span: trace.Span, end_on_exit: bool) -> None:
        self._span, self._end = span, end_on_exit
        self._token: object = None

    def __enter__(self) -> trace.Span:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(self, *_: object) -> None:
        otel_context.detach(self._token)  # type: ignore[arg-type]
        if self._end:
            self._span.end()


_tracer_cache: tuple[trace.TracerProvider, trace.Tracer, trace.Tracer | None] | None = None


def _exports_nothing(provider: TracerProvider) -> bool:
    # The SDK keeps its processors in a private tuple; if that ever changes,
    # assume they exist (the real tracer is always correct, only slower).
    multi = getattr(provider, "_active_span_processor", None)
    return getattr(multi, "_span_processors", None) == ()


def tracer() -> trace.Tracer:
    """The gateway's tracer (of the tracer provider installed now).

    ``trace.get_tracer`` builds a new Tracer on every call, a measurable share
    of a webhook's CPU, so tracers are kept until the global provider changes;
    while the SDK provider exports nothing, spans are contexts only (see
    :class:`_UnexportedTracer`).
    """
    global _tracer_cache
    provider = trace.get_tracer_provider()
    cached = _tracer_cache
    if cached is None or cached[0] is not provider:
        unexported = _UnexportedTracer(provider) if isinstance(provider, TracerProvider) else None
        cached = _tracer_cache = (provider, provider.get_tracer("channel-gateway"), unexported)
    if cached[2] is not None and _exports_nothing(provider):  # type: ignore[arg-type]
        return cached[2]
    return cached[1]


#: Messages carry W3C trace context by contract (architecture.md section 4),
#: whatever propagators the process configures for HTTP.
_W3C = TraceContextTextMapPropagator()


def inject_trace_headers(headers: dict[str, Any]) -> None:
    """Write the current W3C trace context (``traceparent``, ``tracestate``) into headers."""
    # The W3C propagator itself, not the global composite: the contract names
    # W3C trace context, and the composite's baggage pass cost a third of this
    # call on every published message.
    _W3C.inject(headers)


def extract_trace_context(headers: Any) -> Any:
    """The trace context carried by message or HTTP headers."""
    if isinstance(headers, CIMultiDictProxy | CIMultiDict):
        # HTTP headers: every value is a str, and the lookup is case-insensitive.
        return propagate.extract(headers)
    return propagate.extract({k: v for k, v in headers.items() if isinstance(v, str)})


# Metrics: one set per process, labelled by connector.
WEBHOOKS = Counter(
    "gateway_webhooks_total",
    "Webhook requests by connector, route and outcome",
    ["connector", "route", "outcome"],
)
EVENTS_PUBLISHED = Counter(
    "gateway_events_published_total", "Events confirmed by the broker", ["connector", "type"]
)
DUPLICATES = Counter(
    "gateway_inbound_duplicates_total", "Inbound events dropped as duplicates", ["connector"]
)
PUBLISH_SECONDS = Histogram(
    "gateway_publish_seconds",
    "Time from publish to broker confirm",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
SENDS = Counter(
    "gateway_sends_total", "Send commands by connector and outcome", ["connector", "outcome"]
)
SEND_RETRIES = Counter("gateway_send_retries_total", "Provider call retries", ["connector"])
DEAD_LETTERS = Counter(
    "gateway_dead_letters_total", "Commands rejected to the dead-letter exchange", ["connector"]
)
CALL_COMMANDS = Counter(
    "gateway_call_commands_total",
    "Call commands by connector, action and outcome",
    ["connector", "action", "outcome"],
)

# The durable spool (gateway.runtime.spool): events accepted while the broker
# could not confirm them, and their replay.
SPOOLED = Counter(
    "gateway_spooled_events_total",
    "Events written to the local spool because the broker did not confirm them",
    ["connector"],
)
SPOOL_REFUSED = Counter(
    "gateway_spool_refused_total",
    "Events the spool refused (full or unwritable): their webhook got a 503",
    ["connector", "reason"],
)
SPOOL_REPLAYED = Counter(
    "gateway_spool_replayed_total",
    "Spooled events republished and confirmed by the broker",
    ["connector"],
)
SPOOL_DEPTH = Gauge("gateway_spool_depth", "Events waiting in the local spool file")
SPOOL_BYTES = Gauge("gateway_spool_bytes", "Bytes counted against the spool's max_bytes bound")
