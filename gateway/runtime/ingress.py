"""The webhook HTTP server: raw body in, verified events confirmed, then 2xx.

Each connector route is wrapped the same way: read the raw body under the size
limit, give it to the connector (which verifies and maps), publish the events
with confirms and dedup, and only then answer with the connector's reply.
Authentication failures are 401/403 and malformed input is 4xx; neither
touches the broker. A broker or dedup-store failure is a fast 503, unless the
connector spools on outage and the durable spool took the events (then the
provider gets its reply, counted as outcome ``spooled``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.contract.callbacks import callback_trace
from gateway.contract.connector import ConnectorSpec, WebhookRequest, WebhookRoute
from gateway.contract.errors import AuthError, BadRequestError, TransientError
from gateway.runtime.publisher import EventPublisher
from gateway.runtime.telemetry import WEBHOOKS, extract_trace_context, get_logger, tracer

log = get_logger("gateway.ingress")

WEBHOOK_PREFIX = "/webhooks"


def route_path(spec: ConnectorSpec, route: WebhookRoute) -> str:
    """Where a connector route is mounted."""
    return f"{WEBHOOK_PREFIX}/{spec.channel}/{spec.provider}{route.path}"


def public_url(request: web.Request, public_base_url: str | None) -> str:
    """The URL the provider called, as it signed it.

    Behind a reverse proxy the Host, scheme and port seen here differ from
    what the provider used, so a configured public base URL replaces them
    (its path is a prefix the proxy strips).
    """
    if public_base_url:
        return public_base_url.rstrip("/") + request.raw_path
    return f"{request.scheme}://{request.host}{request.raw_path}"


@dataclass(frozen=True, kw_only=True)
class MountedConnector:
    """A connector's routes and where its events go."""

    spec: ConnectorSpec
    routes: list[WebhookRoute]
    publisher: EventPublisher
    dedup_ttl: float


def _handler(
    mounted: MountedConnector, route: WebhookRoute, public_base_url: str | None
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    name = mounted.spec.name
    span_name = f"webhook {name} {route.name}"
    counter = {
        outcome: WEBHOOKS.labels(name, route.name, outcome)
        for outcome in (
            "accepted",
            "spooled",
            "duplicate",
            "unauthorized",
            "bad_request",
            "unavailable",
        )
    }

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()  # aiohttp answers 413 past client_max_size
        incoming = WebhookRequest(
            method=request.method,
            url=public_url(request, public_base_url),
            path_params=dict(request.match_info),
            headers=request.headers,
            query=request.query,
            body=body,
        )
        with tracer().start_as_current_span(
            span_name,
            context=extract_trace_context(request.headers),
            kind=trace.SpanKind.SERVER,
            attributes={
                "http.request.method": request.method,
                "url.path": request.path,
                "gateway.connector": name,
            },
        ) as span:
            try:
                inbound = await route.handler(incoming)
            except AuthError as exc:
                counter["unauthorized"].inc()
                log.warning(
                    "webhook rejected: authentication",
                    connector=name,
                    route=route.name,
                    reason=str(exc),
                )
                span.set_attribute("http.response.status_code", exc.status)
                return web.Response(status=exc.status, text="unauthorized\n")
            except BadRequestError as exc:
                counter["bad_request"].inc()
                log.info(
                    "webhook rejected: bad request",
                    connector=name,
                    route=route.name,
                    reason=str(exc),
                )
                return web.Response(status=exc.status, text=f"bad request: {exc}\n")
            # A status callback whose URL names the send span (see
            # gateway.contract.callbacks): link to it once the request is
            # verified, and let its events carry the send's trace context.
            linked = callback_trace(request.query)
            if linked is not None:
                span.add_link(linked.context, {"gateway.link": "send"})
                for event in inbound.events:
                    if not event.traceparent:
                        event.traceparent = linked.traceparent
            try:
                outcome = await mounted.publisher.publish_inbound(
                    inbound.events, dedup_ttl=mounted.dedup_ttl
                )
            except TransientError as exc:
                counter["unavailable"].inc()
                log.warning(
                    "webhook not accepted: events not confirmed",
                    connector=name,
                    route=route.name,
                    error=str(exc),
                    code=exc.code,
                )
                span.set_status(trace.StatusCode.ERROR, exc.code)
                return web.Response(
                    status=503, text="temporarily unavailable\n", headers={"Retry-After": "5"}
                )
            if outcome.spooled:
                counter["spooled"].inc()
            elif outcome.duplicates and not outcome.published:
                counter["duplicate"].inc()
            else:
                counter["accepted"].inc()
            reply = inbound.reply
            return web.Response(
                status=reply.status, body=reply.body, content_type=reply.content_type
            )

    return handle


@dataclass(frozen=True, kw_only=True)
class Readiness:
    """What ``/readyz`` reports: named checks, which of them are required, details."""

    checks: dict[str, bool]
    #: Checks shown but not required right now: the service still takes traffic
    #: safely without them (the broker, while the durable spool accepts).
    optional: frozenset[str] = frozenset()
    #: Extra facts for operators, e.g. ``{"spool": {"depth": 3, ...}}``.
    details: Mapping[str, object] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        """True when every required check passes."""
        return all(ok for name, ok in self.checks.items() if name not in self.optional)


#: Named checks (all required), or a :class:`Readiness`.
ReadinessCheck = Callable[[], Awaitable[Mapping[str, bool] | Readiness]]


def build_app(
    mounted: list[MountedConnector],
    *,
    max_body_bytes: int,
    public_base_url: str | None,
    readiness: ReadinessCheck,
) -> web.Application:
    """The aiohttp application: every connector route plus health and metrics."""
    app = web.Application(client_max_size=max_body_bytes)
    started = time.time()

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "uptime_seconds": round(time.time() - started)})

    async def readyz(_: web.Request) -> web.Response:
        result = await readiness()
        report = result if isinstance(result, Readiness) else Readiness(checks=dict(result))
        ready = report.ready
        # "degraded": taking traffic safely, but something optional is down.
        status = "not ready" if not ready else "ready"
        if ready and not all(report.checks.values()):
            status = "degraded"
        return web.json_response(
            {"status": status, "checks": report.checks, **report.details},
            status=200 if ready else 503,
        )

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    for item in mounted:
        for route in item.routes:
            handler = _handler(item, route, public_base_url)
            for method in route.methods:
                app.router.add_route(method, route_path(item.spec, route), handler)
    return app
