"""Trace context through provider callback URLs.

A provider's status callbacks (Twilio's StatusCallback, Vonage's per-message
``webhook_url``) arrive as fresh HTTP requests that carry no trace context of
ours. So that they can be tied to the send that caused them, a connector builds
the callback URL it gives the provider with :func:`traced_callback_url` while
the send span is current (the runtime calls ``Connector.send`` inside it): the
send span's W3C ``traceparent`` rides the URL as a query parameter. The
runtime's webhook ingress reads it back with :func:`callback_trace`, links the
webhook's span to the send span and stamps the traceparent on the events it
publishes, so the ledger's timeline shows the send's trace id on every status.

The parameter is part of the URL the provider signs where the provider signs
URLs (Twilio): we choose the URL, so the signature covers it. A malformed value
is ignored (it is tracing, never a reason to refuse a provider's callback).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

#: The query parameter carrying the send span's traceparent.
CALLBACK_TRACE_PARAM = "traceparent"

# W3C trace context regardless of the globally configured propagator: the URL
# format must not change with deployment settings.
_W3C = TraceContextTextMapPropagator()


def current_traceparent() -> str:
    """The current span's W3C ``traceparent``, or "" when no valid span is current."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier.get("traceparent", "")


def traced_callback_url(url: str) -> str:
    """``url`` with the current span's traceparent as a query parameter.

    Unchanged when no span is current (nothing to link to) or the URL names a
    trace already.
    """
    traceparent = current_traceparent()
    if not traceparent or CALLBACK_TRACE_PARAM in parse_qs(urlsplit(url).query):
        return url
    separator = "&" if "?" in url else "?"
    # A traceparent is lower-case hex and dashes: nothing to percent-encode.
    return f"{url}{separator}{CALLBACK_TRACE_PARAM}={traceparent}"


@dataclass(frozen=True, slots=True)
class CallbackTrace:
    """The send span a callback belongs to."""

    traceparent: str
    context: trace.SpanContext


def callback_trace(query: Mapping[str, str]) -> CallbackTrace | None:
    """The send span named by a callback URL's query, or None if absent or malformed."""
    value = query.get(CALLBACK_TRACE_PARAM)
    if not value:
        return None
    span_context = trace.get_current_span(_W3C.extract({"traceparent": value})).get_span_context()
    if not span_context.is_valid:
        return None
    return CallbackTrace(traceparent=value, context=span_context)
