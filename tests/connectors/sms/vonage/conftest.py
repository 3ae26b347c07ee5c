"""The Vonage connector running in a real Service, webhooks over real HTTP.

``harness`` starts the SMS service with the Vonage connector (three accounts:
md5hash-signed, HMAC-SHA256-signed and unsigned SMS API webhooks) on the
in-memory bus, pointed at a fake Messages API, with a consumer bound to every
event. ``rabbit_harness`` does the same on the real RabbitMQ.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from gateway.api.v1.envelope_pb2 import Event
from gateway.runtime.bus import Bus, Delivery, Subscription
from gateway.runtime.codec import decode_event
from gateway.runtime.config import RuntimeSettings
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.service import Service, open_bus
from gateway.runtime.topology import EVENTS_EXCHANGE
from gateway.testing.fake_vonage import FakeVonage

API_KEY = "abcd1234"
OTHER_API_KEY = "ef567890"
OUR_NUMBER = "+447700900000"
CUSTOMER = "+447700900123"


@dataclass
class Harness:
    """A running service, its fake provider and the events it published."""

    service: Service
    bus: Bus
    fake: FakeVonage
    http: aiohttp.ClientSession
    secrets: dict[str, str]
    events: asyncio.Queue[tuple[Event, str]] = field(default_factory=asyncio.Queue)
    subscription: Subscription | None = None

    def url(self, account: str, route: str) -> str:
        """Public URL of a webhook route of ``account``."""
        return f"{self.service.base_url}/webhooks/sms/vonage/{account}/{route}"

    async def next_event(self, timeout: float = 5.0) -> tuple[Event, str]:
        """The next published event (fails the test after ``timeout``)."""
        return await asyncio.wait_for(self.events.get(), timeout)

    async def assert_nothing_published(self, settle: float = 0.2) -> None:
        """No event arrived (after giving stragglers ``settle`` seconds)."""
        await asyncio.sleep(settle)
        assert self.events.empty(), f"unexpected events: {self.events.qsize()}"

    async def post(self, url: str, **kwargs: Any) -> tuple[int, str]:
        """POST and return (status, body text)."""
        async with self.http.post(url, **kwargs) as resp:
            return resp.status, await resp.text()

    async def get(self, url: str, **kwargs: Any) -> tuple[int, str]:
        """GET and return (status, body text)."""
        async with self.http.get(url, **kwargs) as resp:
            return resp.status, await resp.text()


def make_settings(
    broker_url: str, fake_url: str, *, send: dict[str, Any] | None = None, **accounts: Any
) -> RuntimeSettings:
    """Runtime settings hosting sms.vonage with the given (or default) accounts."""
    default_accounts = {
        "main": {
            "api_key": API_KEY,
            "api_secret": {"env": "VONAGE_API_SECRET"},
            "signature_secret": {"env": "VONAGE_SIGNATURE_SECRET"},
            "signature_method": "md5hash",
            "numbers": [OUR_NUMBER],
        },
        "hmac": {
            "api_key": OTHER_API_KEY,
            "api_secret": {"env": "VONAGE_API_SECRET"},
            "signature_secret": {"env": "VONAGE_OTHER_SIGNATURE_SECRET"},
            "signature_method": "sha256",
            "numbers": ["+14155550100"],
        },
        "unsigned": {
            "api_key": "0a0b0c0d",
            "api_secret": {"env": "VONAGE_API_SECRET"},
            "signature_secret": {"env": "VONAGE_SIGNATURE_SECRET"},
            "signature_method": "none",
        },
    }
    return RuntimeSettings.model_validate(
        {
            "http": {"host": "127.0.0.1", "port": 0},
            "broker": {"url": broker_url},
            "send": send
            or {
                "max_attempts": 4,
                "initial_backoff": 0.01,
                "max_backoff": 0.05,
                "provider_timeout": 1.0,
            },
            "connectors": {
                "sms.vonage": {
                    "api_base_url": fake_url,
                    "default_account": "main",
                    "accounts": accounts or default_accounts,
                }
            },
        }
    )


def make_secrets() -> dict[str, str]:
    """Fresh secrets (long enough for HS256 without PyJWT's key-length warning)."""
    return {
        "VONAGE_API_SECRET": secrets.token_hex(16),
        "VONAGE_SIGNATURE_SECRET": secrets.token_hex(24),
        "VONAGE_OTHER_SIGNATURE_SECRET": secrets.token_hex(24),
    }


async def start_harness(
    broker_url: str,
    *,
    env: dict[str, str] | None = None,
    fake: FakeVonage | None = None,
    send: dict[str, Any] | None = None,
    accounts: dict[str, Any] | None = None,
) -> Harness:
    """Start a fake Vonage, the service and an every-event consumer."""
    env = env or make_secrets()
    fake = fake or FakeVonage(
        api_key=API_KEY,
        api_secret=env["VONAGE_API_SECRET"],
        signature_secret=env["VONAGE_SIGNATURE_SECRET"],
    )
    await fake.start()
    bus: Bus = InMemoryBus() if broker_url == "memory://" else open_bus(broker_url)
    settings = make_settings(broker_url, fake.url, send=send, **(accounts or {}))
    service = Service(settings, ["sms.vonage"], bus=bus, environ=env)
    await service.start()
    harness = Harness(
        service=service, bus=bus, fake=fake, http=aiohttp.ClientSession(), secrets=env
    )

    async def collect(delivery: Delivery) -> None:
        await harness.events.put((decode_event(delivery), delivery.routing_key))

    queue = await bus.declare_temporary_queue(EVENTS_EXCHANGE, ["#"])
    harness.subscription = await bus.consume(queue, collect, prefetch=32)
    return harness


async def stop_harness(harness: Harness) -> None:
    """Stop everything started by :func:`start_harness`."""
    if harness.subscription is not None:
        await harness.subscription.cancel()
    await harness.http.close()
    await harness.service.stop()
    await harness.fake.stop()


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    """The Vonage connector in a service on the in-memory bus."""
    running = await start_harness("memory://")
    try:
        yield running
    finally:
        await stop_harness(running)


@pytest.fixture
async def rabbit_harness(rabbitmq_url: str) -> AsyncIterator[Harness]:
    """The Vonage connector in a service on the real RabbitMQ."""
    running = await start_harness(rabbitmq_url)
    try:
        yield running
    finally:
        await stop_harness(running)
