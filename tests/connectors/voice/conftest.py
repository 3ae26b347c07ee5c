"""The voice.twilio connector in a real Service, webhooks over real HTTP.

Requests are signed by Twilio's own SDK (``RequestValidator``), never by our
verifier, so the tests check the verifier against an independent oracle.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
import yaml

from connectors.voice.twilio import MANIFEST
from gateway.api.v1.envelope_pb2 import Event
from gateway.runtime.bus import Bus, Delivery, Subscription
from gateway.runtime.codec import decode_event
from gateway.runtime.config import RuntimeSettings
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.service import Service, enabled_connectors, open_bus
from gateway.runtime.topology import EVENTS_EXCHANGE
from gateway.testing.conformance import check_manifest
from tests.connectors.sms.twilio.support import sign
from tests.connectors.voice.test_flow import FLOWS_YAML

ACCOUNT_SID = "AC" + "c3" * 16
OUR_NUMBER = "+14155550100"
CALLER = "+447700900123"
TOKEN_ENV = "TEST_TWILIO_VOICE_TOKEN"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def call_sid() -> str:
    """A fresh Twilio call SID."""
    return "CA" + uuid.uuid4().hex


def call_params(sid: str, status: str = "ringing", **extra: str) -> dict[str, str]:
    """The standard parameters of a Twilio voice request, as documented."""
    return {
        "AccountSid": ACCOUNT_SID,
        "ApiVersion": "2010-04-01",
        "CallSid": sid,
        "CallStatus": status,
        "Called": OUR_NUMBER,
        "Caller": CALLER,
        "Direction": "inbound",
        "From": CALLER,
        "FromCountry": "GB",
        "To": OUR_NUMBER,
        "ToCountry": "US",
        **extra,
    }


@dataclass
class Harness:
    """A running voice service and the events it published."""

    service: Service
    bus: Bus
    http: aiohttp.ClientSession
    token: str
    events: asyncio.Queue[tuple[Event, str]] = field(default_factory=asyncio.Queue)
    subscription: Subscription | None = None

    def url(self, route: str, account: str = "main", **query: str) -> str:
        """Public URL of a route (with an optional query)."""
        base = f"{self.service.base_url}/webhooks/voice/twilio/{account}/{route}"
        return f"{base}?{urlencode(query)}" if query else base

    async def call(
        self,
        url: str,
        params: Mapping[str, str] | Sequence[tuple[str, str]],
        *,
        token: str | None = None,
        signature: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, str, str]:
        """POST a form signed by Twilio's SDK; (status, content type, body)."""
        pairs = list(params.items()) if isinstance(params, Mapping) else list(params)
        sent = {**FORM, **(headers or {})}
        sent["X-Twilio-Signature"] = (
            signature if signature is not None else sign(token or self.token, url, pairs)
        )
        async with self.http.post(url, data=urlencode(pairs), headers=sent) as resp:
            return resp.status, resp.content_type, await resp.text()

    async def next_event(self, timeout: float = 5.0) -> tuple[Event, str]:
        """The next published event (fails the test after ``timeout``), checked
        against the connector's manifest."""
        event, key = await asyncio.wait_for(self.events.get(), timeout)
        assert check_manifest(MANIFEST, event) == []
        return event, key

    async def drain(self, settle: float = 0.2) -> list[tuple[Event, str]]:
        """Every event published until none arrives for ``settle`` seconds."""
        found = []
        while True:
            try:
                found.append(await self.next_event(settle))
            except TimeoutError:
                return found


def make_settings(broker_url: str, **overrides: Any) -> RuntimeSettings:
    """Runtime settings hosting voice.twilio with the test flows."""
    section: dict[str, Any] = {
        "accounts": {"main": {"account_sid": ACCOUNT_SID, "auth_token": {"env": TOKEN_ENV}}},
        "call_flows": yaml.safe_load(FLOWS_YAML),
        **overrides,
    }
    return RuntimeSettings.model_validate(
        {
            "http": {"host": "127.0.0.1", "port": 0},
            "broker": {"url": broker_url},
            "connectors": {"voice.twilio": section},
        }
    )


async def start_harness(broker_url: str, **overrides: Any) -> Harness:
    """Start the voice service and an every-event consumer."""
    token = secrets.token_hex(16)
    bus: Bus = InMemoryBus() if broker_url == "memory://" else open_bus(broker_url)
    settings = make_settings(broker_url, **overrides)
    # As `channel-gateway run voice` selects its connectors.
    names = enabled_connectors(settings, ["voice"])
    service = Service(settings, names, bus=bus, environ={TOKEN_ENV: token})
    await service.start()
    harness = Harness(service=service, bus=bus, http=aiohttp.ClientSession(), token=token)

    async def collect(delivery: Delivery) -> None:
        await harness.events.put((decode_event(delivery), delivery.routing_key))

    queue = await bus.declare_temporary_queue(EVENTS_EXCHANGE, ["#.voice.twilio"])
    harness.subscription = await bus.consume(queue, collect, prefetch=64)
    return harness


async def stop_harness(harness: Harness) -> None:
    """Stop everything :func:`start_harness` started."""
    if harness.subscription is not None:
        await harness.subscription.cancel()
    await harness.http.close()
    await harness.service.stop()


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    """voice.twilio in a service on the in-memory bus."""
    running = await start_harness("memory://")
    try:
        yield running
    finally:
        await stop_harness(running)


@pytest.fixture
async def rabbit_harness(rabbitmq_url: str) -> AsyncIterator[Harness]:
    """voice.twilio in a service on the real RabbitMQ."""
    running = await start_harness(rabbitmq_url)
    try:
        yield running
    finally:
        await stop_harness(running)
