"""The gateway process: gRPC server, delivery ledger, status ingestor, fallback engine.

Lifecycle: ``start`` connects the bus (unless given a connected one), declares
the topology (including the command queues of every enabled connector, so a
send waits durably for a connector that is not running yet), migrates the
ledger, starts the event hub, the status ingestor and the fallback engine,
then the gRPC server with health checking and reflection. ``stop`` reverses
it: health says NOT_SERVING, the server stops taking RPCs and gives those in
flight ``shutdown_grace`` seconds, then the background workers stop and the
ledger and bus close.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Collection
from wsgiref.simple_server import WSGIServer

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from gateway.api.v1 import gateway_service_pb2, gateway_service_pb2_grpc
from gateway.api.v1.envelope_pb2 import Event
from gateway.contract import ConfigError, registry
from gateway.ledger import FallbackEngine, StatusIngestor, bus_command_publisher
from gateway.ledger.fallback import LATE_DELIVERY_ATTRIBUTE
from gateway.ledger.store import Ledger, open_ledger
from gateway.runtime.bus import Bus
from gateway.runtime.codec import encode_event, event_routing_key
from gateway.runtime.config import RuntimeSettings
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.outbound import command_topology
from gateway.runtime.service import open_bus
from gateway.runtime.telemetry import ensure_tracing, get_logger
from gateway.runtime.topology import EVENTS_EXCHANGE, Topology, base_topology
from gateway.server.connectors import (
    AmqpQueueProbe,
    ConnectorDirectory,
    LocalProbe,
    QueueProbe,
)
from gateway.server.events import EventHub
from gateway.server.retention import RetentionTask
from gateway.server.service import SERVICE_NAME, GatewayServicer
from gateway.server.settings import GatewaySettings, gateway_settings

log = get_logger("gateway.server")
#: How often the health status follows the broker connection.
HEALTH_INTERVAL = 1.0
#: gRPC health service name for liveness probes: SERVING while the process runs,
#: unlike "" and the API service, which follow the broker (readiness).
LIVENESS_SERVICE = "liveness"


def enabled_connector_names(settings: RuntimeSettings) -> list[str]:
    """Installed connectors the config enables (the ones sends may go to)."""
    return [name for name in registry.available() if settings.connector_enabled(name)]


class GatewayServer:
    """One gateway process (``channel-gateway run gateway``)."""

    def __init__(
        self,
        settings: RuntimeSettings,
        *,
        gateway: GatewaySettings | None = None,
        bus: Bus | None = None,
        ledger: Ledger | None = None,
        probe: QueueProbe | None = None,
        hosted: Callable[[], Collection[str]] | None = None,
    ) -> None:
        """``bus``, when given, is owned by the caller (connected and closed by it);
        ``hosted`` names connectors running in this process (``up``)."""
        self.settings = settings
        self.gateway = gateway or gateway_settings(settings)
        self._owns_bus = bus is None
        self.bus = bus or open_bus(
            settings.broker.url, connect_timeout=settings.broker.connect_timeout
        )
        self._owns_ledger = ledger is None
        if ledger is None:
            try:
                ledger = open_ledger(
                    self.gateway.ledger_url, schema_name=self.gateway.ledger_schema
                )
            except ValueError as exc:
                raise ConfigError(f"gateway.ledger_url: {exc}") from exc
        self.ledger = ledger
        if probe is None:
            if settings.broker.url.startswith("amqp") and not isinstance(self.bus, InMemoryBus):
                probe = AmqpQueueProbe(settings.broker.url)
            elif hosted is not None:
                probe = LocalProbe(hosted)
        self.directory = ConnectorDirectory(
            enabled_connector_names(settings),
            probe=probe,
            default_providers=self.gateway.default_providers,
        )
        self._probe = probe
        self.events = EventHub(self.bus, self.gateway.replay_buffer)
        self.health = HealthServicer()
        self._server: aio.Server | None = None
        self._ingestor: StatusIngestor | None = None
        self._engine: FallbackEngine | None = None
        self._retention: RetentionTask | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._metrics: WSGIServer | None = None
        self.port: int | None = None

    @property
    def address(self) -> str:
        """``host:port`` the server listens on (after start)."""
        return f"{self.gateway.host}:{self.port or self.gateway.port}"

    def topology(self) -> Topology:
        """Base topology plus the command queues of every enabled connector (send,
        and call for a connector with call actions), as the connector's own
        service declares them."""
        topo = base_topology()
        limit = self.settings.broker.delivery_limit
        for name in sorted(self.directory.enabled):
            topo = topo.merge(command_topology(self.directory.spec(name), limit))
        return topo

    async def start(self) -> None:
        """Start everything; raises ConfigError or BrokerUnavailableError on failure."""
        telemetry = self.settings.telemetry
        ensure_tracing(
            "channel-gateway:gateway",
            otlp_endpoint=telemetry.otlp_endpoint,
            console=telemetry.console_spans,
        )
        if self._owns_bus:
            await self.bus.connect()
        await self.bus.declare(self.topology())
        await self.ledger.migrate()
        await self.events.start()
        if self.gateway.run_ingestor:
            timeout = self.settings.broker.publish_timeout
            self._engine = FallbackEngine(
                self.ledger, bus_command_publisher(self.bus, timeout=timeout), emit=self._emit
            )
            self._ingestor = StatusIngestor(
                self.bus,
                self.ledger,
                engine=self._engine,
                emit=self._emit_late_delivery,
                delivery_limit=self.settings.broker.delivery_limit,
            )
            await self._ingestor.start()
            await self._engine.start()
            self._retention = RetentionTask(self.ledger, self.gateway.retention)
            self._retention.start()
        servicer = GatewayServicer(
            ledger=self.ledger,
            bus=self.bus,
            directory=self.directory,
            events=self.events,
            publish_timeout=self.settings.broker.publish_timeout,
            page_size=self.gateway.default_page_size,
            max_page_size=self.gateway.max_page_size,
        )
        server = aio.server()
        gateway_service_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                gateway_service_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        self.port = server.add_insecure_port(f"{self.gateway.host}:{self.gateway.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {self.gateway.host}:{self.gateway.port}")
        await server.start()
        self._server = server
        if self.gateway.metrics_port is not None:
            self._metrics, _ = start_http_server(self.gateway.metrics_port, addr=self.gateway.host)
            log.info("metrics served", port=self._metrics.server_port)
        serving = self.bus.is_ready()
        await self._set_health(serving)
        self._health_task = asyncio.create_task(self._follow_health(serving), name="gateway health")
        log.info("gateway started", address=self.address, connectors=sorted(self.directory.enabled))

    async def _emit(self, event: Event) -> None:
        """Publish the gateway's own status events (switching channel, late delivery)."""
        await self.bus.publish(
            EVENTS_EXCHANGE,
            event_routing_key(event),
            encode_event(event),
            timeout=self.settings.broker.publish_timeout,
        )

    async def _emit_late_delivery(self, event: Event) -> None:
        """The ingestor's notices: only late deliveries are news. A transition it
        applied came from a connector's status event, which consumers already got;
        echoing it would hand them the same status twice under another event id."""
        if event.attributes.get(LATE_DELIVERY_ATTRIBUTE) == "true":
            await self._emit(event)

    async def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        # Liveness answers from the event loop whatever the broker does (a broker
        # outage must not get every replica restarted); NOT_SERVING on shutdown.
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)

    async def _follow_health(self, serving: bool) -> None:
        # Sends need the broker: without it the gateway is not serving.
        while True:
            await asyncio.sleep(HEALTH_INTERVAL)
            now = self.bus.is_ready()
            if now != serving:
                serving = now
                log.warning("health changed", serving=serving)
                await self._set_health(serving)

    async def stop(self) -> None:
        """Drain and stop (safe to call twice)."""
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        # Event streams never end on their own: end them first (UNAVAILABLE, resume
        # elsewhere with the cursor) so the grace period goes to unary calls.
        await self.events.stop()
        if self._server is not None:
            await self.health.enter_graceful_shutdown()
            await self._server.stop(self.gateway.shutdown_grace)
            self._server = None
        if self._retention is not None:
            await self._retention.stop()
            self._retention = None
        if self._engine is not None:
            await self._engine.stop()
            self._engine = None
        if self._ingestor is not None:
            await self._ingestor.stop()
            self._ingestor = None
        if self._probe is not None:
            await self._probe.close()
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics.server_close()
            self._metrics = None
        if self._owns_ledger:
            await self.ledger.close()
        if self._owns_bus:
            await self.bus.close()
        log.info("gateway stopped")

    async def run(self, *, stop_event: asyncio.Event | None = None) -> None:
        """Start, wait for SIGTERM/SIGINT (or ``stop_event``), stop gracefully."""
        stop = stop_event or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
            await stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop()


async def health_check(address: str, *, timeout: float = 2.0, service: str = SERVICE_NAME) -> bool:
    """True when the gateway at ``address`` answers SERVING to a health check of
    ``service`` (the API, which needs the broker; or :data:`LIVENESS_SERVICE`)."""
    async with aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
