"""Process entry points for the CLI: the gateway alone, or with connectors (``up``)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Sequence

from gateway.runtime.config import RuntimeSettings
from gateway.runtime.service import Service, open_bus
from gateway.server.app import GatewayServer


async def run_gateway(
    settings: RuntimeSettings,
    connectors: Sequence[str] = (),
    *,
    stop_event: asyncio.Event | None = None,
) -> None:
    """Run the gateway, plus ``connectors`` in the same process when given, until
    SIGTERM/SIGINT (or ``stop_event``); then drain the gateway first (no new
    sends), then the connectors."""
    if not connectors:
        await GatewayServer(settings).run(stop_event=stop_event)
        return
    # One bus for both: on memory:// they must share it to reach each other.
    bus = open_bus(settings.broker.url, connect_timeout=settings.broker.connect_timeout)
    service = Service(settings, connectors, bus=bus)
    gateway = GatewayServer(
        settings, bus=bus, hosted=lambda: [hosted.spec.name for hosted in service.hosted]
    )
    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()  # connects the shared bus
        await gateway.start()
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await gateway.stop()
        await service.stop()  # closes the shared bus
