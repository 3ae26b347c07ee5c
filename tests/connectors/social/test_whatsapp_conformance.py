"""The WhatsApp (Meta) connector passes the connector conformance suite.

Webhooks are signed with the standard library's HMAC (the scheme pywa's
validator checks, see test_meta_signature); the batch case is Meta's worst
realistic shape: 3 entries x 2 changes x (5 messages + 1 status).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
from collections.abc import Sequence
from typing import Any

import aio_pika
import pytest
import redis.asyncio as aioredis

from connectors.social.meta.signature import LEGACY_SIGNATURE_HEADER, SIGNATURE_HEADER
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.content_pb2 import Template
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.message_pb2 import Direction, Message
from gateway.api.v1.participant_pb2 import Participant
from gateway.runtime.idempotency import RedisIdempotencyStore
from gateway.runtime.topology import EVENTS_EXCHANGE
from gateway.testing.conformance import (
    BatchCase,
    ConnectorConformance,
    FakeProvider,
    StatusCase,
    WebhookCall,
)
from gateway.testing.fake_meta import FakeMeta
from tests.connectors.social import whatsapp_payloads as wa

APP_SECRET = secrets.token_hex(16)
OTHER_SECRET = secrets.token_hex(16)
VERIFY_TOKEN = "vt" + secrets.token_hex(8)
ACCESS_TOKEN = "EAAG" + secrets.token_hex(24)
PATH = "/webhooks/whatsapp/meta"


def hub_headers(body: bytes, secret: str = APP_SECRET) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", SIGNATURE_HEADER: f"sha256={digest}"}


def signed(url: str, payload: dict[str, Any], description: str = "") -> WebhookCall:
    body = wa.body(payload)
    return WebhookCall(url=url, headers=hub_headers(body), body=body, description=description)


def batch_payload() -> tuple[dict[str, Any], set[str]]:
    """3 entries x 2 changes x (5 messages + 1 status): 30 messages, 6 statuses."""
    changes, expected = [], set()
    for _ in range(6):
        messages = [wa.text_message(f"message {n}") for n in range(5)]
        sent = wa.wamid()
        changes.append(wa.change(messages, [wa.status(sent, "delivered")]))
        expected |= {f"m:{m['id']}" for m in messages} | {f"s:{sent}:delivered"}
    return wa.webhook(*changes, entries=3), expected


def items_of(events: Sequence[Event]) -> list[str]:
    found = []
    for event in events:
        if event.type == "message.received":
            found.append(f"m:{event.message.provider_message_id}")
        elif event.type == "message.status":
            found.append(f"s:{event.status.provider_message_id}:{event.status.provider_status}")
    return found


class TestWhatsAppConformance(ConnectorConformance):
    connector = "whatsapp.meta"

    def connector_settings(self, api_base_url: str) -> dict[str, Any]:
        return {
            "app_secret": {"env": "TEST_META_APP_SECRET"},
            "verify_token": {"env": "TEST_META_VERIFY_TOKEN"},
            "graph_base_url": api_base_url,
            "accounts": {
                "main": {
                    "phone_number_id": wa.PHONE_NUMBER_ID,
                    "access_token": {"env": "TEST_META_ACCESS_TOKEN"},
                }
            },
        }

    def environ(self) -> dict[str, str]:
        return {
            "TEST_META_APP_SECRET": APP_SECRET,
            "TEST_META_VERIFY_TOKEN": VERIFY_TOKEN,
            "TEST_META_ACCESS_TOKEN": ACCESS_TOKEN,
        }

    def fake_provider(self) -> FakeProvider:
        return FakeMeta(tokens=(ACCESS_TOKEN,))

    def new_provider_message_id(self) -> str:
        return wa.wamid()

    def inbound_webhook(self, base_url: str, provider_message_id: str) -> WebhookCall:
        payload = wa.webhook(wa.change([wa.text_message("Hi caf\u00e9", id=provider_message_id)]))
        return signed(base_url + PATH, payload, "inbound text")

    def forgeries(self, base_url: str, provider_message_id: str) -> Sequence[WebhookCall]:
        url = base_url + PATH
        good = self.inbound_webhook(base_url, provider_message_id)
        body = good.body
        header = good.headers[SIGNATURE_HEADER]
        sha1 = "sha1=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha1).hexdigest()
        json_ct = {"Content-Type": "application/json"}
        reserialized = json.dumps(json.loads(body), ensure_ascii=False).encode()
        return [
            WebhookCall(
                url=url,
                headers=good.headers,
                body=body.replace(b"Hi", b"Yo"),
                description="tampered body",
            ),
            WebhookCall(
                url=url,
                headers=hub_headers(body, OTHER_SECRET),
                body=body,
                description="wrong secret",
            ),
            WebhookCall(url=url, headers=json_ct, body=body, description="no signature"),
            WebhookCall(
                url=url,
                headers={**json_ct, LEGACY_SIGNATURE_HEADER: sha1},
                body=body,
                description="legacy SHA-1 header only",
            ),
            WebhookCall(
                url=url,
                headers={**json_ct, SIGNATURE_HEADER: header[:-3]},
                body=body,
                description="truncated signature",
            ),
            WebhookCall(
                url=url,
                headers={**json_ct, SIGNATURE_HEADER: "sha256=not-hex"},
                body=body,
                description="malformed signature",
            ),
            WebhookCall(
                url=url,
                headers=good.headers,
                body=reserialized,
                description="same JSON re-serialized (unicode unescaped)",
            ),
            WebhookCall(
                url=url,
                headers=good.headers,
                body=b"{not json",
                description="garbage body with a signature of another body",
            ),
        ]

    def status_case(self, base_url: str, provider_message_id: str, message_id: str) -> StatusCase:
        calls = [
            signed(
                base_url + PATH,
                wa.webhook(
                    wa.change(
                        statuses=[wa.status(provider_message_id, s, callback_data=message_id)]
                    )
                ),
                s,
            )
            for s in ("sent", "delivered", "read")
        ]
        return StatusCase(calls=calls, final_state=DeliveryState.DELIVERY_STATE_READ)

    def batch_case(self, base_url: str) -> BatchCase:
        payload, expected = batch_payload()
        return BatchCase(
            call=signed(
                base_url + PATH, payload, "3 entries x 2 changes x (5 messages + 1 status)"
            ),
            expected_items=frozenset(expected),
            items_of=items_of,
        )

    def send_command(self, message_id: str) -> SendMessageCommand:
        # A template: allowed whether or not the customer wrote in the last 24 hours.
        return SendMessageCommand(
            message_id=message_id,
            channel="whatsapp",
            provider="meta",
            account="main",
            message=Message(
                direction=Direction.DIRECTION_OUTBOUND,
                recipients=[Participant(channel="whatsapp", address="+" + wa.CUSTOMER)],
                template=Template(
                    name="order_update", language="en_US", parameters={"1": "A-1001"}
                ),
            ),
        )

    async def test_batch_of_30_messages_and_6_statuses_is_exactly_36_events(self) -> None:
        async with self.running() as h:
            payload, expected = batch_payload()
            assert sum(i.startswith("m:") for i in expected) == 30
            status, _ = await h.post(signed(h.base_url + PATH, payload))
            assert status == 200
            events = await h.wait_for(lambda e: True, 36)
            assert len(events) == 36
            assert sorted(items_of(events)) == sorted(expected)

    async def test_signed_but_malformed_payloads_are_400_and_publish_nothing(self) -> None:
        async with self.running() as h:
            url = h.base_url + PATH
            for body in (
                b"{not json",
                b"[]",
                wa.body({"object": "page", "entry": []}),
                wa.body(wa.webhook(wa.change([wa.text_message(wa_id="not-a-number")]))),
            ):
                call = WebhookCall(url=url, headers=hub_headers(body), body=body)
                assert (await h.post(call))[0] == 400, body
            await asyncio.sleep(0.2)
            assert h.events == []

    async def test_subscription_handshake_over_http(self) -> None:
        async with self.running() as h:
            url = h.base_url + PATH
            ok = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "42"}
            async with h.http.get(url, params=ok) as resp:
                assert (resp.status, await resp.text()) == (200, "42")
            async with h.http.get(url, params={**ok, "hub.verify_token": "nope"}) as resp:
                assert resp.status == 403
            assert h.events == []


@pytest.mark.rabbitmq
async def test_rabbitmq_whole_batch_is_on_the_broker_before_200_and_a_retry_adds_nothing(
    rabbitmq_url: str, unique: str, amqp_connection: aio_pika.abc.AbstractConnection
) -> None:
    suite = TestWhatsAppConformance()
    channel = await amqp_connection.channel()
    queue = await channel.declare_queue(f"social.{unique}", auto_delete=False)
    await queue.bind(EVENTS_EXCHANGE, routing_key="#.whatsapp.meta")
    try:
        async with suite.running(broker_url=rabbitmq_url, collect=False) as h:
            for subscription in h.service._subscriptions:  # webhooks only
                await subscription.cancel()
            payload, expected = batch_payload()
            call = signed(h.base_url + PATH, payload)
            assert (await h.post(call))[0] == 200
            found: list[str] = []
            while (message := await queue.get(fail=False, no_ack=True)) is not None:
                event = Event()
                event.ParseFromString(message.body)
                found.extend(items_of([event]))
            # Confirmed means routed and stored: all 36 are there the moment we got 200.
            assert sorted(i for i in found if i in expected) == sorted(expected)
            assert (await h.post(call))[0] == 200  # Meta's retry of the whole batch
            await asyncio.sleep(0.3)
            assert await queue.get(fail=False, no_ack=True) is None
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await channel.close()


@pytest.mark.redis
async def test_redis_dedup_outlives_metas_seven_day_retry_window(
    redis_url: str, unique: str
) -> None:
    prefix = f"cg:social:{unique}:"
    suite = TestWhatsAppConformance()
    async with suite.running(store=RedisIdempotencyStore(redis_url, prefix=prefix)) as h:
        call = suite.inbound_webhook(h.base_url, wa.wamid())
        assert (await h.post(call))[0] == 200
        (event,) = await h.wait_for(lambda e: True, 1)
    client = aioredis.from_url(redis_url)
    try:
        ttl = await client.pttl(prefix + event.id)
        assert ttl > 7 * 24 * 3600 * 1000, ttl
    finally:
        await client.delete(prefix + event.id)
        await client.aclose()
