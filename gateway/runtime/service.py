"""A service process: the connectors it hosts, wired to bus, store and HTTP.

Lifecycle: ``start`` (connect, declare topology, build and start connectors,
open the webhook server, start command consumers), then ``stop`` in reverse
order with draining: stop accepting HTTP, cancel consumers and let in-flight
sends finish (unacked prefetched commands go back to the queue), stop the
connectors, close the bus. ``run`` does both around SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp
from aiohttp import web

from gateway.api.v1.envelope_pb2 import Event
from gateway.contract import registry
from gateway.contract.connector import CallControl, Connector, ConnectorSpec, Logger, WebhookRoute
from gateway.contract.errors import ConfigError, TransientError
from gateway.runtime.amqp_bus import AmqpBus
from gateway.runtime.bus import Bus, Subscription
from gateway.runtime.codec import encode_event
from gateway.runtime.config import RuntimeSettings
from gateway.runtime.idempotency import IdempotencyStore, RedisIdempotencyStore, open_store
from gateway.runtime.ingress import MountedConnector, Readiness, build_app, route_path
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.outbound import CallCommandWorker, CommandWorker, command_topology
from gateway.runtime.publisher import EventPublisher
from gateway.runtime.spool import Spool, SpoolDrainer, configured_drainer, open_spool
from gateway.runtime.telemetry import ensure_tracing, get_logger
from gateway.runtime.topology import (
    DEAD_EXCHANGE,
    Topology,
    base_topology,
    call_command_queue_name,
    command_queue_name,
    subscription_queue,
)

log = get_logger("gateway.service")


def open_bus(url: str, *, connect_timeout: float = 5.0) -> Bus:
    """The bus for ``amqp(s)://`` or ``memory://`` URLs."""
    if url.startswith("memory://"):
        return InMemoryBus()
    if url.startswith(("amqp://", "amqps://")):
        return AmqpBus(url, connect_timeout=connect_timeout)
    raise ConfigError(f"unsupported broker URL {url!r}: use amqp://... or memory://")


@dataclass(kw_only=True)
class RuntimeContext:
    """The :class:`~gateway.contract.connector.ConnectorContext` the runtime hands out."""

    spec: ConnectorSpec
    http: aiohttp.ClientSession
    log: Logger
    base_url: str
    routes: dict[str, WebhookRoute] = field(default_factory=dict)
    #: Set by the service before the connector starts.
    publisher: EventPublisher | None = None
    bus: Bus | None = None
    publish_timeout: float = 5.0

    def webhook_url(self, route: str, **path_params: str) -> str:
        """Public URL of one of this connector's routes."""
        if route not in self.routes:
            raise ConfigError(f"{self.spec.name} has no webhook route {route!r}")
        path = route_path(self.spec, self.routes[route]).format(**path_params)
        return self.base_url.rstrip("/") + path

    def now(self) -> datetime:
        """Current UTC time."""
        return datetime.now(UTC)

    async def publish(self, events: Sequence[Event]) -> None:
        """Publish events from a non-HTTP listener with dedup and confirms."""
        if self.publisher is None:
            raise TransientError("connector publishes before the service wired its publisher")
        await self.publisher.publish_inbound(events, dedup_ttl=self.spec.dedup_ttl_seconds)

    async def quarantine(self, event: Event) -> None:
        """Publish an event to ``channels.dead`` as ``quarantine.<channel>.<provider>``.

        The dead-letter exchange is always bound to the persistent dead-letter
        queue, so quarantined input needs no topology of its own.
        """
        if self.bus is None:
            raise TransientError("connector quarantines before the service wired its bus")
        routing_key = f"quarantine.{event.channel}.{event.provider}"
        await self.bus.publish(
            DEAD_EXCHANGE, routing_key, encode_event(event), timeout=self.publish_timeout
        )


@dataclass(kw_only=True)
class HostedConnector:
    """One connector running in this service."""

    spec: ConnectorSpec
    context: RuntimeContext
    connector: Connector
    publisher: EventPublisher
    worker: CommandWorker
    #: Consumes the call-command queue (voice connectors with ``call_actions``).
    call_worker: CallCommandWorker | None = None


class Service:
    """Hosts a set of connectors (``channel-gateway run sms`` hosts every SMS one)."""

    def __init__(
        self,
        settings: RuntimeSettings,
        connectors: Sequence[str],
        *,
        bus: Bus | None = None,
        store: IdempotencyStore | None = None,
        environ: Mapping[str, str] | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.settings = settings
        #: Bind with SO_REUSEPORT so several worker processes share the port
        #: (the kernel spreads connections across them).
        self.reuse_port = reuse_port
        self.names = list(connectors)
        if not self.names:
            raise ConfigError("no connector enabled: add one under connectors: in the config")
        self.bus = bus or open_bus(
            settings.broker.url, connect_timeout=settings.broker.connect_timeout
        )
        self.store = store or open_store(settings.dedup.url)
        self._environ = environ
        self.hosted: list[HostedConnector] = []
        self._subscriptions: list[Subscription] = []
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._http: aiohttp.ClientSession | None = None
        self.port: int | None = None
        #: The durable spool (spool.enabled and a hosted connector spools on outage).
        self.spool: Spool | None = None
        self._drainer: SpoolDrainer | None = None

    @property
    def base_url(self) -> str:
        """Public base URL of the webhook server."""
        http = self.settings.http
        return http.public_base_url or f"http://{http.host}:{self.port or http.port}"

    def _specs(self) -> list[ConnectorSpec]:
        return [registry.load(name) for name in self.names]

    def topology(self, specs: Sequence[ConnectorSpec]) -> Topology:
        """Everything this service declares."""
        limit = self.settings.broker.delivery_limit
        topo = base_topology()
        for spec in specs:
            topo = topo.merge(command_topology(spec, limit))
        for sub in self.settings.subscriptions:
            topo = topo.merge(
                Topology(queues=(subscription_queue(sub.queue, sub.bindings, limit),))
            )
        return topo

    async def start(self) -> None:
        """Start everything; raises ConfigError or BrokerUnavailableError on failure."""
        specs = self._specs()
        # Validate every connector's settings before touching the network.
        settings = {
            spec.name: self.settings.connector_settings(spec, self._environ) for spec in specs
        }
        telemetry = self.settings.telemetry
        ensure_tracing(
            "channel-gateway:" + ",".join(self.names),
            otlp_endpoint=telemetry.otlp_endpoint,
            console=telemetry.console_spans,
        )
        if isinstance(self.bus, InMemoryBus):
            log.warning(
                "USING THE IN-MEMORY BUS: events live in this process only and are lost on exit; "
                "set broker.url to amqp://... for anything but a demo"
            )
        await self.bus.connect()
        await self.bus.declare(self.topology(specs))
        await self._open_spool(specs)
        timeout = aiohttp.ClientTimeout(
            total=self.settings.send.provider_timeout,
            sock_connect=min(5.0, self.settings.send.provider_timeout),
        )
        self._http = aiohttp.ClientSession(timeout=timeout)
        mounted: list[MountedConnector] = []
        for spec in specs:
            context = RuntimeContext(
                spec=spec, http=self._http, log=get_logger(f"connector.{spec.name}"), base_url=""
            )
            connector = spec.factory(context, settings[spec.name])
            context.routes = {r.name: r for r in connector.webhook_routes()}
            publisher = EventPublisher(
                self.bus,
                self.store,
                connector=spec.name,
                publish_timeout=self.settings.broker.publish_timeout,
                pending_wait=self.settings.dedup.pending_wait,
                spool=self.spool if spec.spool_on_outage else None,
            )
            context.publisher, context.bus = publisher, self.bus
            context.publish_timeout = self.settings.broker.publish_timeout
            worker = CommandWorker(spec, connector, publisher, self.store, self.settings.send)
            self.hosted.append(
                HostedConnector(
                    spec=spec,
                    context=context,
                    connector=connector,
                    publisher=publisher,
                    worker=worker,
                    call_worker=self._call_worker(spec, connector, publisher),
                )
            )
            mounted.append(
                MountedConnector(
                    spec=spec,
                    routes=list(context.routes.values()),
                    publisher=publisher,
                    dedup_ttl=spec.dedup_ttl_seconds,
                )
            )
            await connector.start()
        app = build_app(
            mounted,
            max_body_bytes=self.settings.http.max_body_bytes,
            public_base_url=self.settings.http.public_base_url,
            readiness=self.readiness,
        )
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(
            self._runner,
            self.settings.http.host,
            self.settings.http.port,
            reuse_address=True,
            reuse_port=self.reuse_port or None,
        )
        await self._site.start()
        self.port = self._bound_port()
        for hosted in self.hosted:
            hosted.context.base_url = self.base_url
        for hosted in self.hosted:
            sub = await self.bus.consume(
                command_queue_name(hosted.spec.channel, hosted.spec.provider),
                hosted.worker.handle,
                prefetch=self.settings.broker.prefetch,
            )
            self._subscriptions.append(sub)
            if hosted.call_worker is not None:
                sub = await self.bus.consume(
                    call_command_queue_name(hosted.spec.channel, hosted.spec.provider),
                    hosted.call_worker.handle,
                    prefetch=self.settings.broker.prefetch,
                )
                self._subscriptions.append(sub)
        log.info("service started", connectors=self.names, url=self.base_url)

    def _call_worker(
        self, spec: ConnectorSpec, connector: Connector, publisher: EventPublisher
    ) -> CallCommandWorker | None:
        """The call-command worker of a connector whose manifest lists call actions."""
        actions = spec.manifest.call_actions
        if not actions:
            return None
        if not isinstance(connector, CallControl):
            # Its call queue is declared (from the manifest): without a consumer,
            # commands would pile up there unanswered.
            raise ConfigError(
                f"{spec.name} lists call_actions ({', '.join(actions)}) in its manifest "
                "but does not implement CallControl.call"
            )
        return CallCommandWorker(
            spec, connector, publisher, self.store, self.settings.send, actions=actions
        )

    async def _open_spool(self, specs: Sequence[ConnectorSpec]) -> None:
        """Open the spool and start replaying it (what a previous run left included)."""
        config = self.settings.spool
        spooling = [spec for spec in specs if spec.spool_on_outage]
        if not config.enabled or not spooling:
            return
        path = config.file_for([spec.channel for spec in spooling])
        self.spool, left = await open_spool(path, config)
        self._drainer = configured_drainer(self.spool, self.bus, self.settings)
        self._drainer.start()
        log.info(
            "spool open",
            path=str(path),
            connectors=[spec.name for spec in spooling],
            events_left=left.events,
        )

    def _bound_port(self) -> int:
        assert self._runner is not None
        for address in self._runner.addresses:
            if isinstance(address, tuple):
                return int(address[1])
        return self.settings.http.port

    async def readiness(self) -> Readiness:
        """Named readiness checks for ``/readyz``.

        While the spool accepts, the broker is not required: webhooks of the
        spooling connectors are taken safely (others answer 503 as before);
        while the broker is up, a full spool does not matter.
        """
        checks = {"broker": self.bus.is_ready()}
        if isinstance(self.store, RedisIdempotencyStore):
            checks["dedup_store"] = await self.store.ping()
        if self.spool is None:
            return Readiness(checks=checks)
        checks["spool"] = self.spool.accepting
        stats = self.spool.stats
        # Either path to a 2xx is enough: the broker, or (while it is down) the spool.
        optional = frozenset({"spool"}) if checks["broker"] else frozenset({"broker"})
        return Readiness(
            checks=checks,
            optional=optional,
            details={
                "spool": {
                    "depth": stats.events,
                    "bytes": stats.bytes,
                    "max_events": self.spool.max_events,
                    "max_bytes": self.spool.max_bytes,
                    "error": self.spool.failure,
                }
            },
        )

    async def stop(self) -> None:
        """Drain and stop (safe to call twice)."""
        if self._site is not None:
            await self._site.stop()  # stop accepting new webhooks
            self._site = None
        for sub in self._subscriptions:
            await sub.cancel()
        self._subscriptions.clear()
        if self._runner is not None:
            await self._runner.cleanup()  # waits for in-flight webhook handlers
            self._runner = None
        for hosted in self.hosted:
            await hosted.connector.stop()
        self.hosted.clear()
        if self._drainer is not None:
            # After the connectors: what they spooled while stopping stays spooled.
            await self._drainer.stop()
            self._drainer = None
        if self._http is not None:
            await self._http.close()
            self._http = None
        await self.bus.close()
        await self.store.close()
        if self.spool is not None:
            await self.spool.close()
            self.spool = None
        log.info("service stopped", connectors=self.names)

    async def run(self, *, stop_event: asyncio.Event | None = None) -> None:
        """Start, wait for SIGTERM/SIGINT (or ``stop_event``), stop gracefully."""
        stop = stop_event or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
            _settle_gc()
            await stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop()


#: Service names that host several channels: ``channel-gateway run social``.
SERVICE_CHANNELS: dict[str, tuple[str, ...]] = {
    "social": ("whatsapp", "messenger", "instagram", "telegram"),
}


#: Allocations between young-generation collections (CPython's default is 700).
_GC_YOUNG_THRESHOLD = 7000


def _settle_gc() -> None:
    """Tune the cyclic GC for a long-running service process, once started.

    Every webhook allocates a few hundred short-lived objects, so with the
    default threshold the collector runs every couple of requests and, with
    the full collections it triggers over everything loaded at start-up
    (modules, protobuf descriptors, phone metadata), took 12-17 % of the
    service's CPU in the SMS benchmark, in pauses of tens of milliseconds.
    Start-up objects are moved out of the collector's sight (``gc.freeze``:
    they live as long as the process) and young collections run ten times
    less often. Memory is still freed by reference counting as before; only
    garbage cycles wait a little longer.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, older, oldest)


def enabled_connectors(settings: RuntimeSettings, selectors: Sequence[str]) -> list[str]:
    """Connector names for ``run`` arguments: a channel (``sms``), a service of several
    channels (``social``) or a name (``sms.twilio``), limited to those the config
    enables. No selector means every enabled one."""
    names: list[str] = []
    for selector in selectors or sorted(settings.connectors):
        if selector in SERVICE_CHANNELS:
            candidates = [n for c in SERVICE_CHANNELS[selector] for n in registry.for_channel(c)]
        else:
            candidates = [selector] if "." in selector else registry.for_channel(selector)
        if "." in selector:
            registry.load(selector)  # a clear error for a misspelled name
        names.extend(n for n in candidates if settings.connector_enabled(n) and n not in names)
    if not names:
        raise ConfigError(
            f"no enabled connector matches {', '.join(selectors) or 'the config'}; "
            f"installed: {', '.join(registry.available())}"
        )
    return names
