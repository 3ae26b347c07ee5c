"""Which connectors the gateway may send to, and how healthy they are right now.

A connector is *installed* when its entry point exists, *enabled* when the
gateway's configuration has a section for it that is not ``enabled: false``,
and *serving* when a process consumes its command queue. Sends go only to
enabled connectors; a send to a connector that is enabled but not serving is
accepted (its command waits in the durable queue) and ListConnectors says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

import aio_pika
import aiormq
import grpc
from aio_pika.abc import AbstractRobustConnection

from gateway.api.v1.gateway_service_pb2 import ConnectorHealth, ConnectorInfo
from gateway.contract import ConnectorNotFoundError, registry
from gateway.contract.connector import ConnectorSpec
from gateway.runtime.telemetry import get_logger
from gateway.runtime.topology import command_queue_name
from gateway.server.errors import RpcError

log = get_logger("gateway.server.connectors")


@dataclass(frozen=True, slots=True)
class QueueInfo:
    """What the broker says about a command queue."""

    exists: bool
    consumers: int = 0
    messages: int = 0


class QueueProbe(Protocol):
    """Looks at a command queue on the broker (None: cannot tell)."""

    async def inspect(self, queue: str) -> QueueInfo | None:
        """Consumers and depth of ``queue``."""

    async def close(self) -> None:
        """Release connections."""


class AmqpQueueProbe:
    """Passive queue declarations on RabbitMQ: consumer count and depth, read-only."""

    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        self._url, self._timeout = url, timeout
        self._conn: AbstractRobustConnection | None = None

    async def inspect(self, queue: str) -> QueueInfo | None:
        try:
            if self._conn is None or self._conn.is_closed:
                self._conn = await aio_pika.connect_robust(
                    self._url,
                    timeout=self._timeout,
                    client_properties={"connection_name": "gateway-health"},
                )
            # A passive declaration of a missing queue closes its channel: one per probe.
            async with self._conn.channel() as channel:
                declared = await channel.declare_queue(queue, passive=True)
                result = declared.declaration_result
                return QueueInfo(
                    exists=True,
                    consumers=int(result.consumer_count or 0),
                    messages=int(result.message_count or 0),
                )
        except aiormq.exceptions.ChannelNotFoundEntity:
            return QueueInfo(exists=False)
        except (TimeoutError, ConnectionError, OSError, aiormq.exceptions.AMQPError) as exc:
            log.warning("cannot inspect command queue", queue=queue, error=repr(exc))
            return None

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(ConnectionError, aiormq.exceptions.AMQPError):
                await self._conn.close()
            self._conn = None


class LocalProbe:
    """For the in-memory bus: connectors hosted in this process are serving."""

    def __init__(self, hosted: Callable[[], Collection[str]]) -> None:
        self._hosted = hosted

    async def inspect(self, queue: str) -> QueueInfo | None:
        for name in self._hosted():
            channel, provider = name.split(".", 1)
            if command_queue_name(channel, provider) == queue:
                return QueueInfo(exists=True, consumers=1)
        return None

    async def close(self) -> None:
        return None


class ConnectorDirectory:
    """Resolves send targets and reports connectors."""

    def __init__(
        self,
        enabled: Collection[str],
        *,
        probe: QueueProbe | None = None,
        default_providers: dict[str, str] | None = None,
    ) -> None:
        self._enabled = frozenset(enabled)
        self._probe = probe
        self._defaults = dict(default_providers or {})
        self._specs: dict[str, ConnectorSpec] = {}
        # Scanning entry points reads every installed distribution's metadata:
        # far too slow for every send, and the set is fixed for the process.
        self._installed = tuple(registry.available())

    def installed(self, channel: str = "") -> list[str]:
        """Installed connector names (of ``channel``), sorted."""
        if not channel:
            return list(self._installed)
        return [n for n in self._installed if n.split(".", 1)[0] == channel]

    @property
    def enabled(self) -> frozenset[str]:
        """Names of the connectors sends may go to."""
        return self._enabled

    def spec(self, name: str) -> ConnectorSpec:
        """The spec of an installed connector (cached; ConnectorNotFoundError otherwise)."""
        if name not in self._specs:
            self._specs[name] = registry.load(name)
        return self._specs[name]

    def resolve(self, channel: str, provider: str = "", *, field: str = "") -> ConnectorSpec:
        """The enabled connector for ``channel`` (and ``provider`` when given).

        FAILED_PRECONDITION for an unknown or disabled channel or provider, or
        an ambiguous choice (several enabled providers and no default).
        """
        where = f"{field}: " if field else ""
        installed = self.installed(channel)
        if not installed:
            raise RpcError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{where}unknown channel {channel!r}: no connector for it is installed "
                f"(installed: {', '.join(self._installed) or 'none'})",
                reason="UNKNOWN_CHANNEL",
            )
        enabled = [n for n in installed if n in self._enabled]
        if provider:
            name = f"{channel}.{provider}"
            if name not in installed:
                raise RpcError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{where}unknown provider {provider!r} for channel {channel!r} "
                    f"(installed: {', '.join(installed)})",
                    reason="UNKNOWN_PROVIDER",
                )
            if name not in self._enabled:
                raise RpcError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{where}connector {name} is disabled on this gateway",
                    reason="CONNECTOR_DISABLED",
                )
        elif not enabled:
            raise RpcError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{where}channel {channel!r} is disabled on this gateway "
                f"(no enabled connector among {', '.join(installed)})",
                reason="CHANNEL_DISABLED",
            )
        elif channel in self._defaults and f"{channel}.{self._defaults[channel]}" in enabled:
            name = f"{channel}.{self._defaults[channel]}"
        elif len(enabled) == 1:
            name = enabled[0]
        else:
            raise RpcError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{where}channel {channel!r} has several enabled connectors "
                f"({', '.join(enabled)}): name the provider",
                reason="AMBIGUOUS_PROVIDER",
            )
        try:
            return self.spec(name)
        except ConnectorNotFoundError as exc:
            raise RpcError(
                grpc.StatusCode.FAILED_PRECONDITION, f"{where}{exc}", reason="CONNECTOR_BROKEN"
            ) from exc

    async def describe(self, channel: str = "") -> Sequence[ConnectorInfo]:
        """Every installed connector (of ``channel``), with manifest and live health."""
        names = self.installed(channel)
        infos: list[ConnectorInfo] = []
        for name in names:
            info = ConnectorInfo(name=name, enabled=name in self._enabled)
            try:
                spec = self.spec(name)
            except ConnectorNotFoundError as exc:
                info.health = ConnectorHealth.CONNECTOR_HEALTH_BROKEN
                info.health_detail = str(exc)
                infos.append(info)
                continue
            info.manifest.CopyFrom(spec.manifest)
            queue = command_queue_name(spec.channel, spec.provider)
            found = await self._probe.inspect(queue) if self._probe is not None else None
            if found is None:
                info.health = ConnectorHealth.CONNECTOR_HEALTH_UNKNOWN
                info.health_detail = "the gateway cannot see the connector's command queue"
            elif not found.exists:
                info.health = ConnectorHealth.CONNECTOR_HEALTH_NOT_SERVING
                info.health_detail = f"command queue {queue} does not exist"
            else:
                info.consumers = found.consumers
                info.pending_commands = found.messages
                if found.consumers:
                    info.health = ConnectorHealth.CONNECTOR_HEALTH_SERVING
                    info.health_detail = f"{found.consumers} consumer(s) on {queue}"
                else:
                    info.health = ConnectorHealth.CONNECTOR_HEALTH_NOT_SERVING
                    info.health_detail = f"nothing consumes {queue}; sends wait in it"
            infos.append(info)
        return infos
