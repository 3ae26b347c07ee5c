"""The webhook HTTP server over real HTTP, on the in-memory bus."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from connectors.sms.twilio.webhooks import SIGNATURE_HEADER, compute_signature
from gateway.runtime.codec import decode_event
from gateway.runtime.idempotency import RedisIdempotencyStore
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.service import Service
from gateway.runtime.topology import EVENTS_EXCHANGE
from gateway.testing.rabbitmq_node import free_port
from tests.runtime import service_helpers as h


@pytest.fixture
async def bus() -> InMemoryBus:
    return InMemoryBus()


@pytest.fixture
async def svc(bus: InMemoryBus) -> AsyncIterator[Service]:
    service = h.service(h.settings(max_body_bytes=4096), bus=bus)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


def base(svc: Service) -> str:
    return f"http://127.0.0.1:{svc.port}"


async def test_signed_webhook_publishes_then_answers(
    svc: Service, bus: InMemoryBus, http: aiohttp.ClientSession
) -> None:
    queue = await bus.declare_temporary_queue(EVENTS_EXCHANGE, ["message.received.#"])
    form = h.inbound_form(body="hi there")
    status, body = await h.post_signed(http, h.inbound_url(svc), form)
    assert status == 200
    assert "<Response></Response>" in body
    event = decode_event(await bus.get(queue))
    assert event.message.provider_message_id == form["MessageSid"]
    assert event.message.text.body == "hi there"
    # The provider's retry of the same webhook is a duplicate: answered 2xx, not re-published.
    assert (await h.post_signed(http, h.inbound_url(svc), form))[0] == 200
    assert bus.queue_depth(queue) == 0


async def test_bad_signature_is_401_and_never_published(
    svc: Service, bus: InMemoryBus, http: aiohttp.ClientSession
) -> None:
    status, _ = await h.post_signed(http, h.inbound_url(svc), h.inbound_form(), token="wrong")
    assert status == 401
    assert bus.published == []


async def test_unknown_account_is_403(svc: Service, http: aiohttp.ClientSession) -> None:
    status, _ = await h.post_signed(http, h.inbound_url(svc, "nobody"), h.inbound_form())
    assert status == 403


async def test_malformed_webhook_is_400(svc: Service, http: aiohttp.ClientSession) -> None:
    form = h.inbound_form()
    del form["MessageSid"]
    status, body = await h.post_signed(http, h.inbound_url(svc), form)
    assert status == 400
    assert "MessageSid" in body


async def test_body_over_the_limit_is_413(
    svc: Service, bus: InMemoryBus, http: aiohttp.ClientSession
) -> None:
    status, _ = await h.post_signed(http, h.inbound_url(svc), h.inbound_form(body="x" * 8000))
    assert status == 413
    assert bus.published == []


async def test_unknown_route_is_404(svc: Service, http: aiohttp.ClientSession) -> None:
    for path in ("/webhooks/sms/nope/main/inbound", "/webhooks/sms/twilio/main", "/"):
        async with http.post(base(svc) + path, data={"a": "b"}) as resp:
            assert resp.status == 404, path


async def test_healthz(svc: Service, http: aiohttp.ClientSession) -> None:
    async with http.get(base(svc) + "/healthz") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["status"] == "ok"
    assert body["uptime_seconds"] >= 0


async def test_readyz_needs_the_broker(
    svc: Service, bus: InMemoryBus, http: aiohttp.ClientSession
) -> None:
    async with http.get(base(svc) + "/readyz") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ready", "checks": {"broker": True}}
    bus.available = False
    async with http.get(base(svc) + "/readyz") as resp:
        assert resp.status == 503
        assert await resp.json() == {"status": "not ready", "checks": {"broker": False}}


async def test_broker_down_is_503_with_retry_after_and_nothing_lost(
    svc: Service, bus: InMemoryBus, http: aiohttp.ClientSession
) -> None:
    queue = await bus.declare_temporary_queue(EVENTS_EXCHANGE, ["message.received.#"])
    form = h.inbound_form()
    bus.available = False
    sig_status, _ = await h.post_signed(http, h.inbound_url(svc), form)
    assert sig_status == 503
    bus.available = True
    # The claim was released: the provider's retry publishes the event.
    assert (await h.post_signed(http, h.inbound_url(svc), form))[0] == 200
    assert decode_event(await bus.get(queue)).message.provider_message_id == form["MessageSid"]


async def test_metrics_count_webhooks_by_outcome(svc: Service, http: aiohttp.ClientSession) -> None:
    await h.post_signed(http, h.inbound_url(svc), h.inbound_form(), token="wrong")
    async with http.get(base(svc) + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    assert (
        'gateway_webhooks_total{connector="sms.twilio",outcome="unauthorized",route="inbound"}'
        in text
    )
    assert "gateway_publish_seconds_bucket" in text


async def test_dedup_store_down_is_503_and_not_ready(http: aiohttp.ClientSession) -> None:
    bus = InMemoryBus()
    store = RedisIdempotencyStore(f"redis://127.0.0.1:{free_port()}/0")
    service = h.service(h.settings(), bus=bus, store=store)
    await service.start()
    try:
        status, _ = await h.post_signed(http, h.inbound_url(service), h.inbound_form())
        assert status == 503
        assert bus.published == []
        async with http.get(base(service) + "/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["checks"] == {"broker": True, "dedup_store": False}
    finally:
        await service.stop()


async def test_signature_is_checked_against_the_public_url(http: aiohttp.ClientSession) -> None:
    """Behind a reverse proxy the provider signed the public URL, not the local one."""
    bus = InMemoryBus()
    runtime = h.settings()
    runtime = runtime.model_copy(
        update={
            "http": runtime.http.model_copy(
                update={"public_base_url": "https://hooks.example.com/gw/"}
            )
        }
    )
    service = h.service(runtime, bus=bus)
    await service.start()
    queue = await bus.declare_temporary_queue(EVENTS_EXCHANGE, ["message.received.#"])
    try:
        local = h.inbound_url(service)
        path = local.split(f":{service.port}", 1)[1]
        public = "https://hooks.example.com/gw" + path
        form = h.inbound_form()
        signature = compute_signature(h.TOKEN, public, {k: [v] for k, v in form.items()})
        async with http.post(local, data=form, headers={SIGNATURE_HEADER: signature}) as resp:
            assert resp.status == 200
        assert bus.queue_depth(queue) == 1
        # Signed for the local URL: not what the provider would have signed.
        assert (await h.post_signed(http, local, h.inbound_form()))[0] == 401
        assert service.hosted[0].context.webhook_url("status", account="main") == (
            "https://hooks.example.com/gw/webhooks/sms/twilio/main/status"
        )
    finally:
        await service.stop()
