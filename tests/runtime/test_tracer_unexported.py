"""The tracer handed out while nothing exports spans: same contexts, no records."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.runtime import telemetry

PROPAGATOR = TraceContextTextMapPropagator()


@pytest.fixture
def provider(monkeypatch: pytest.MonkeyPatch) -> TracerProvider:
    """A fresh SDK provider standing in for the global one."""
    fresh = TracerProvider(shutdown_on_exit=False)
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: fresh)
    monkeypatch.setattr(telemetry, "_tracer_cache", None)
    return fresh


def _traceparent() -> str:
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier)
    return carrier["traceparent"]


def test_without_processors_spans_are_contexts_with_the_sdk_flags(
    provider: TracerProvider,
) -> None:
    tracer = telemetry.tracer()
    assert isinstance(tracer, telemetry._UnexportedTracer)
    sdk = provider.get_tracer("reference")
    with sdk.start_as_current_span("reference"):
        reference = _traceparent()
    with tracer.start_as_current_span("server", kind=trace.SpanKind.SERVER) as server:
        outer = _traceparent()
        with tracer.start_as_current_span("publish", kind=trace.SpanKind.PRODUCER) as producer:
            inner = _traceparent()
    assert not server.is_recording()
    # version-traceid-spanid-flags, the flags the SDK itself sets on a root span.
    assert outer.split("-")[3] == reference.split("-")[3]
    assert outer.split("-")[1] == inner.split("-")[1]  # one trace
    assert outer.split("-")[2] != inner.split("-")[2]  # a new span
    assert producer.get_span_context().trace_id == server.get_span_context().trace_id


def test_a_remote_parent_is_continued_and_its_unsampled_flag_kept(
    provider: TracerProvider,
) -> None:
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    context = PROPAGATOR.extract({"traceparent": parent})
    with telemetry.tracer().start_as_current_span("server", context=context):
        child = _traceparent()
    _version, trace_id, span_id, flags = child.split("-")
    assert trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert span_id != "b7ad6b7169203331"
    assert int(flags, 16) & 0x01 == 0


def test_the_provider_sampler_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    never = TracerProvider(sampler=ParentBased(ALWAYS_OFF), shutdown_on_exit=False)
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: never)
    monkeypatch.setattr(telemetry, "_tracer_cache", None)
    with telemetry.tracer().start_as_current_span("root"):
        flags = _traceparent().split("-")[3]
    assert int(flags, 16) & 0x01 == 0


def test_adding_a_processor_brings_back_recorded_spans(provider: TracerProvider) -> None:
    assert isinstance(telemetry.tracer(), telemetry._UnexportedTracer)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with telemetry.tracer().start_as_current_span("recorded", attributes={"a": 1}) as span:
        assert span.is_recording()
    (finished,) = exporter.get_finished_spans()
    assert finished.name == "recorded"
    assert finished.attributes == {"a": 1}


@pytest.mark.parametrize(
    "carrier",
    [
        {},
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"},
        {
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tracestate": "vendor=abc,other=1",
        },
    ],
)
def test_default_sampler_shortcut_agrees_with_the_sdk(
    provider: TracerProvider, carrier: dict[str, str]
) -> None:
    # The default provider's sampler is decided without calling it: the flags
    # and trace state must be what the SDK's own (recording) tracer gives.
    sdk = provider.get_tracer("reference")
    tracer = telemetry.tracer()
    assert isinstance(tracer, telemetry._UnexportedTracer)
    for parent in (PROPAGATOR.extract(carrier), None):
        with sdk.start_as_current_span("reference", context=parent) as reference:
            expected = reference.get_span_context()
        with tracer.start_as_current_span("fast", context=parent) as fast:
            got = fast.get_span_context()
        assert got.trace_flags == expected.trace_flags
        assert got.trace_state == expected.trace_state
        if carrier and parent is not None:
            assert got.trace_id == expected.trace_id
