"""The spool wired into publishing and the service: what spools, what still 503s.

Real handlers over real HTTP on the in-memory bus (its ``available`` flag is
the outage); the RabbitMQ chaos tests are in tests/integration/test_spool_outage.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.message_pb2 import Message
from gateway.contract.errors import ConfigError, TransientError
from gateway.runtime.bus import Delivery, OutgoingMessage, UnroutableError
from gateway.runtime.codec import decode_event, encode_event
from gateway.runtime.config import (
    RuntimeSettings,
    SpoolSettings,
    SubscriptionSettings,
    load_config,
)
from gateway.runtime.idempotency import MemoryIdempotencyStore, RedisIdempotencyStore
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.publisher import EventPublisher
from gateway.runtime.service import Service
from gateway.runtime.spool import Spool, SpoolFullError
from gateway.runtime.topology import EVENTS_EXCHANGE, base_topology
from gateway.testing.rabbitmq_node import free_port
from tests.runtime import service_helpers as h

SUBSCRIPTION = "crm.inbound"


def _event(n: int) -> Event:
    return Event(
        id=f"ev-{n}",
        type="message.received",
        channel="sms",
        provider="twilio",
        account="main",
        message=Message(provider_message_id=f"SM{n}"),
    )


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    opened = Spool(tmp_path / "spool.sqlite", max_events=3, max_bytes=10**6)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def _publisher(
    spool: Spool | None,
) -> tuple[InMemoryBus, MemoryIdempotencyStore, EventPublisher, str]:
    bus = InMemoryBus()
    await bus.connect()
    await bus.declare(base_topology())
    queue = await bus.declare_temporary_queue(EVENTS_EXCHANGE, ["message.received.#"])
    store = MemoryIdempotencyStore()
    publisher = EventPublisher(
        bus, store, connector="sms.twilio", publish_timeout=1, pending_wait=0, spool=spool
    )
    return bus, store, publisher, queue


async def test_broker_failure_spools_and_the_retry_is_a_duplicate(spool: Spool) -> None:
    bus, _, publisher, queue = await _publisher(spool)
    bus.available = False
    outcome = await publisher.publish_inbound([_event(1)], dedup_ttl=60)
    assert (outcome.published, outcome.duplicates, outcome.spooled) == (0, 0, 1)
    (row,) = await spool.lease(10, lease_seconds=30)
    assert (row.connector, row.exchange, row.routing_key) == (
        "sms.twilio",
        EVENTS_EXCHANGE,
        "message.received.sms.twilio",
    )
    # Exactly the codec's message (trace context of the attempt included): the
    # replay is the same publish.
    stored = decode_event(_delivery(row.message))
    assert stored.traceparent == row.message.headers.get("traceparent", "")
    stored.ClearField("traceparent")
    assert stored == _event(1)
    trace_headers = {"traceparent", "tracestate"}
    expected = encode_event(_event(1))
    assert {k: v for k, v in row.message.headers.items() if k not in trace_headers} == {
        k: v for k, v in expected.headers.items() if k not in trace_headers
    }
    assert (row.message.message_id, row.message.type, row.message.timestamp) == (
        expected.message_id,
        expected.type,
        expected.timestamp,
    )
    bus.available = True
    # Spooled counts as accepted: the provider's retry must not publish it twice.
    again = await publisher.publish_inbound([_event(1)], dedup_ttl=60)
    assert (again.published, again.duplicates, again.spooled) == (0, 1, 0)
    assert bus.queue_depth(queue) == 0


async def test_a_batch_spools_every_event(spool: Spool) -> None:
    bus, _, publisher, _ = await _publisher(spool)
    bus.available = False
    outcome = await publisher.publish_inbound([_event(1), _event(2), _event(1)], dedup_ttl=60)
    assert (outcome.published, outcome.spooled) == (0, 2)
    rows = await spool.lease(10, lease_seconds=30)
    assert sorted(r.message.message_id for r in rows) == ["ev-1", "ev-2"]


async def test_a_full_spool_is_a_503_and_leaves_no_claim(spool: Spool) -> None:
    bus, _, publisher, queue = await _publisher(spool)
    bus.available = False
    for n in range(3):
        await publisher.publish_inbound([_event(n)], dedup_ttl=60)
    with pytest.raises(SpoolFullError) as info:
        await publisher.publish_inbound([_event(9)], dedup_ttl=60)
    assert isinstance(info.value, TransientError)
    assert "not spooled" in str(info.value)
    bus.available = True
    # The claim was released: the provider's retry publishes it.
    outcome = await publisher.publish_inbound([_event(9)], dedup_ttl=60)
    assert outcome.published == 1
    assert decode_event(await bus.get(queue)).id == "ev-9"


async def test_unroutable_is_not_spooled(spool: Spool) -> None:
    _, _, publisher, _ = await _publisher(spool)
    event = _event(1)
    event.type = "nobody.binds"
    with pytest.raises(UnroutableError):
        await publisher.publish_inbound([event], dedup_ttl=60)
    assert spool.stats.events == 0


async def test_publish_without_dedup_never_spools(spool: Spool) -> None:
    bus, _, publisher, _ = await _publisher(spool)
    bus.available = False
    with pytest.raises(TransientError):
        await publisher.publish(_event(1))
    assert spool.stats.events == 0


def _delivery(message: OutgoingMessage) -> Delivery:
    return Delivery(
        body=message.body,
        message_id=message.message_id,
        type=message.type,
        content_type=message.content_type,
        headers=message.headers,
        exchange=EVENTS_EXCHANGE,
        routing_key="",
        redelivered=False,
    )


def _settings(tmp_path: Path, **spool: object) -> RuntimeSettings:
    return h.settings().model_copy(
        update={
            "spool": SpoolSettings.model_validate(
                {
                    "enabled": True,
                    "state_dir": str(tmp_path / "state"),
                    "initial_backoff": 0.05,
                    "max_backoff": 0.1,
                    **spool,
                }
            ),
            "subscriptions": [
                SubscriptionSettings(queue=SUBSCRIPTION, bindings=["message.received.#"])
            ],
        }
    )


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def _get(http: aiohttp.ClientSession, svc: Service, path: str) -> tuple[int, str]:
    async with http.get(f"http://127.0.0.1:{svc.port}{path}") as resp:
        return resp.status, await resp.text()


async def test_twilio_webhook_in_an_outage_is_200_spooled_and_drained(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    bus = InMemoryBus()
    svc = h.service(_settings(tmp_path), bus=bus)
    await svc.start()
    try:
        assert svc.spool is not None
        # The default file: per service, named by its spooling channels.
        assert svc.spool.path == tmp_path / "state" / "sms.sqlite"
        bus.available = False
        form = h.inbound_form()
        status, body = await h.post_signed(http, h.inbound_url(svc), form)
        assert status == 200
        assert "<Response" in body  # the connector's reply, as after a confirm
        assert svc.spool.stats.events == 1
        status, text = await _get(http, svc, "/readyz")
        # Still taking traffic safely: ready, degraded, and the depth shown.
        assert status == 200
        assert '"status": "degraded"' in text
        assert '"broker": false' in text
        assert '"spool": true' in text
        assert '"depth": 1' in text
        # The provider's retry (Twilio retries connection failures) is a duplicate.
        assert (await h.post_signed(http, h.inbound_url(svc), form))[0] == 200
        assert svc.spool.stats.events == 1
        _, metrics = await _get(http, svc, "/metrics")
        assert 'gateway_spooled_events_total{connector="sms.twilio"}' in metrics
        assert (
            'gateway_webhooks_total{connector="sms.twilio",outcome="spooled",route="inbound"}'
            in metrics
        )
        assert "gateway_spool_depth 1.0" in metrics

        bus.available = True
        async with asyncio.timeout(5):
            while bus.queue_depth(SUBSCRIPTION) == 0:  # noqa: ASYNC110 - no event to wait on
                await asyncio.sleep(0.02)
        event = decode_event(await bus.get(SUBSCRIPTION))
        assert event.message.provider_message_id == form["MessageSid"]
        assert svc.spool.stats.events == 0
        _, metrics = await _get(http, svc, "/metrics")
        assert 'gateway_spool_replayed_total{connector="sms.twilio"}' in metrics
        assert (await _get(http, svc, "/readyz"))[0] == 200
    finally:
        await svc.stop()


async def test_a_full_spool_makes_the_webhook_503_and_not_ready(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    bus = InMemoryBus()
    svc = h.service(_settings(tmp_path, max_events=1), bus=bus)
    await svc.start()
    try:
        bus.available = False
        assert (await h.post_signed(http, h.inbound_url(svc), h.inbound_form()))[0] == 200
        assert (await h.post_signed(http, h.inbound_url(svc), h.inbound_form()))[0] == 503
        status, text = await _get(http, svc, "/readyz")
        assert status == 503
        assert '"spool": false' in text
        _, metrics = await _get(http, svc, "/metrics")
        assert 'gateway_spool_refused_total{connector="sms.twilio",reason="spool_full"}' in metrics
    finally:
        await svc.stop()


async def test_a_full_spool_with_the_broker_up_stays_ready(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    bus = InMemoryBus()
    svc = h.service(_settings(tmp_path, max_events=1), bus=bus)
    await svc.start()
    try:
        assert svc.spool is not None
        # A row the broker keeps refusing (no queue bound) fills the spool.
        stuck = encode_event(_event(1))
        await svc.spool.put("sms.twilio", EVENTS_EXCHANGE, "nobody.binds.this", stuck)
        assert not svc.spool.accepting
        status, text = await _get(http, svc, "/readyz")
        assert status == 200
        assert '"status": "degraded"' in text
        # The broker takes new webhooks directly.
        assert (await h.post_signed(http, h.inbound_url(svc), h.inbound_form()))[0] == 200
        assert bus.queue_depth(SUBSCRIPTION) == 1
    finally:
        await svc.stop()


async def test_dedup_store_failure_is_503_and_not_spooled(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    bus = InMemoryBus()
    store = RedisIdempotencyStore(f"redis://127.0.0.1:{free_port()}/0")
    svc = h.service(_settings(tmp_path), bus=bus, store=store)
    await svc.start()
    try:
        bus.available = False
        assert (await h.post_signed(http, h.inbound_url(svc), h.inbound_form()))[0] == 503
        assert svc.spool is not None
        assert svc.spool.stats.events == 0
    finally:
        await svc.stop()


async def test_spool_disabled_keeps_todays_503(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    bus = InMemoryBus()
    svc = h.service(_settings(tmp_path, enabled=False), bus=bus)
    await svc.start()
    try:
        assert svc.spool is None
        bus.available = False
        assert (await h.post_signed(http, h.inbound_url(svc), h.inbound_form()))[0] == 503
        assert (await _get(http, svc, "/readyz"))[0] == 503
    finally:
        await svc.stop()
    assert not (tmp_path / "state").exists()


async def test_an_unusable_spool_stops_start_up_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite"
    path.write_bytes(b"not a database " * 500)
    svc = h.service(_settings(tmp_path, path=str(path)), bus=InMemoryBus())
    try:
        with pytest.raises(ConfigError, match=r"spool: spool .* is corrupt"):
            await svc.start()
    finally:
        await svc.stop()


async def test_a_restarted_service_drains_what_the_last_one_spooled(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    path = tmp_path / "state" / "sms.sqlite"
    first_bus = InMemoryBus()
    first = h.service(_settings(tmp_path), bus=first_bus)
    await first.start()
    forms = [h.inbound_form() for _ in range(5)]
    try:
        first_bus.available = False
        for form in forms:
            assert (await h.post_signed(http, h.inbound_url(first), form))[0] == 200
    finally:
        await first.stop()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM spool").fetchone()[0] == 5
    second_bus = InMemoryBus()
    second = h.service(_settings(tmp_path), bus=second_bus)
    await second.start()
    try:
        async with asyncio.timeout(5):
            while second_bus.queue_depth(SUBSCRIPTION) < 5:  # noqa: ASYNC110 - no event to wait on
                await asyncio.sleep(0.02)
        sids = [
            decode_event(await second_bus.get(SUBSCRIPTION)).message.provider_message_id
            for _ in range(5)
        ]
        assert sids == [f["MessageSid"] for f in forms]
        assert second.spool is not None
        assert second.spool.stats.events == 0
    finally:
        await second.stop()


async def test_encoded_event_in_spool_is_what_the_codec_builds(spool: Spool) -> None:
    message = encode_event(_event(5))  # with whatever trace context is current
    await spool.put("sms.twilio", EVENTS_EXCHANGE, "message.received.sms.twilio", message)
    (row,) = await spool.lease(1, lease_seconds=30)
    assert row.message == message


def test_example_config_lists_every_spool_key_at_its_default() -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "config.example.yaml"
    raw = yaml.safe_load(example.read_text())["spool"]
    assert set(raw) == set(SpoolSettings.model_fields)
    # At the defaults, except enabled: the shipped deployments mount a volume at state_dir
    # (tests/test_deploy.py checks it), so the example turns the spool on.
    assert SpoolSettings.model_validate(raw) == SpoolSettings(enabled=True)


def test_spool_file_is_per_service_unless_a_path_is_set() -> None:
    config = SpoolSettings(state_dir="/state")
    assert config.file_for(["voice", "voice"]) == Path("/state/voice.sqlite")
    assert config.file_for(["voice", "sms"]) == Path("/state/sms+voice.sqlite")
    assert SpoolSettings(path="/x/y.db").file_for(["sms"]) == Path("/x/y.db")


def test_spool_settings_from_the_environment() -> None:
    settings = load_config(
        environ={
            "CHANNEL_GATEWAY__SPOOL__ENABLED": "true",
            "CHANNEL_GATEWAY__SPOOL__STATE_DIR": "/data/spool",
        }
    )
    assert settings.spool.enabled
    assert settings.spool.state_dir == "/data/spool"
