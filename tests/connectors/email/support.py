"""Helpers for the email connector tests: a service hosting one email
connector, event collection, a TLS certificate, an event-loop lag probe."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.feedparser
import ipaddress
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.api.v1.envelope_pb2 import Event
from gateway.runtime.bus import Bus, Delivery
from gateway.runtime.codec import decode_event
from gateway.runtime.config import RuntimeSettings
from gateway.runtime.idempotency import IdempotencyStore
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.service import Service
from gateway.runtime.topology import DEAD_EXCHANGE, EVENTS_EXCHANGE

FAST_SEND = {
    "max_attempts": 3,
    "initial_backoff": 0.01,
    "max_backoff": 0.05,
    "max_retry_after": 5.0,
    "provider_timeout": 2.0,
}


class Collected:
    """Events published on ``channels.events`` and quarantined on ``channels.dead``."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.quarantined: list[Event] = []
        self._arrived = asyncio.Condition()

    async def on_event(self, delivery: Delivery) -> None:
        event = decode_event(delivery)
        async with self._arrived:
            (self.quarantined if delivery.exchange == DEAD_EXCHANGE else self.events).append(event)
            self._arrived.notify_all()

    async def wait(
        self, predicate: Callable[[], bool], *, timeout: float = 5.0, settle: float = 0.2
    ) -> None:
        async with self._arrived:
            try:
                await asyncio.wait_for(self._arrived.wait_for(predicate), timeout)
            except TimeoutError:
                pytest.fail(f"expected events did not arrive: {self.events} {self.quarantined}")
        await asyncio.sleep(settle)


@contextlib.asynccontextmanager
async def email_service(
    connector: str,
    section: Mapping[str, Any],
    *,
    bus: Bus | None = None,
    broker_url: str = "memory://",
    store: IdempotencyStore | None = None,
    environ: Mapping[str, str] | None = None,
    quarantine_pattern: str = "quarantine.email.#",
) -> AsyncIterator[tuple[Service, Collected]]:
    """A started :class:`Service` hosting ``connector`` and everything it publishes."""
    settings = RuntimeSettings.model_validate(
        {
            "http": {"host": "127.0.0.1", "port": 0},
            "broker": {"url": broker_url, "publish_timeout": 2.0, "connect_timeout": 3.0},
            "send": FAST_SEND,
            "connectors": {connector: dict(section)},
        }
    )
    service = Service(
        settings,
        [connector],
        bus=bus if bus is not None or broker_url != "memory://" else InMemoryBus(),
        store=store,
        environ=environ or {},
    )
    collected = Collected()
    await service.start()
    subscriptions = []
    try:
        events = await service.bus.declare_temporary_queue(EVENTS_EXCHANGE, ["#"])
        dead = await service.bus.declare_temporary_queue(DEAD_EXCHANGE, [quarantine_pattern])
        for queue in (events, dead):
            subscriptions.append(await service.bus.consume(queue, collected.on_event, prefetch=64))
        yield service, collected
    finally:
        for sub in subscriptions:
            await sub.cancel()
        await service.stop()


def self_signed(tmp_path: Path, host: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate and key for ``host`` and 127.0.0.1 (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(host), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


class MimeParsesHere:
    """Counts MIME parsing done in this process (the service's).

    The email connectors parse mail in a spawned worker process, so a bomb
    never blocks the event loop; a parse that slipped back onto the loop
    would feed the stdlib's FeedParser here. Counting that is exact, where a
    measured loop stall depends on how busy the machine is.
    """

    def __init__(self) -> None:
        self.calls = 0
        self._patch = pytest.MonkeyPatch()

    def __enter__(self) -> MimeParsesHere:
        original = email.feedparser.FeedParser.feed

        def feed(parser: email.feedparser.FeedParser, data: str) -> None:
            self.calls += 1
            original(parser, data)

        self._patch.setattr(email.feedparser.FeedParser, "feed", feed)
        return self

    def __exit__(self, *exc: object) -> None:
        self._patch.undo()
