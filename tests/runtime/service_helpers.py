"""Helpers shared by runtime and integration tests: a Twilio-hosting Service and
signed Twilio webhooks, driven over real HTTP."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

import aiohttp
from aio_pika.abc import AbstractIncomingMessage

from connectors.sms.twilio.webhooks import SIGNATURE_HEADER, compute_signature
from gateway.api.v1.envelope_pb2 import Event
from gateway.runtime.bus import Bus, Delivery
from gateway.runtime.codec import decode_event
from gateway.runtime.config import (
    BrokerSettings,
    DedupSettings,
    HttpSettings,
    RuntimeSettings,
    SendSettings,
)
from gateway.runtime.idempotency import IdempotencyStore
from gateway.runtime.service import Service

TOKEN = "twilio-test-token-0123456789abcdef"
ACCOUNT_SID = "AC" + "b" * 32
ENVIRON = {"TEST_TWILIO_TOKEN": TOKEN}
OUR_NUMBER = "+14155550100"
CUSTOMER = "+14155550199"


def consumed_event(message: AbstractIncomingMessage) -> Event:
    """The event in a message a plain aio-pika consumer got (a downstream service's view)."""
    return decode_event(
        Delivery(
            body=message.body,
            message_id=message.message_id,
            type=message.type,
            content_type=message.content_type,
            headers=dict(message.headers),
            exchange=message.exchange or "",
            routing_key=message.routing_key or "",
            redelivered=bool(message.redelivered),
        )
    )


def settings(
    broker_url: str = "memory://",
    *,
    api_base_url: str | None = None,
    max_body_bytes: int = 64 * 1024,
    publish_timeout: float = 2.0,
    connect_timeout: float = 2.0,
    dedup_url: str = "memory://",
    send: SendSettings | None = None,
    delivery_limit: int = 5,
) -> RuntimeSettings:
    """Settings hosting ``sms.twilio`` on a random local port."""
    twilio: dict[str, object] = {
        "accounts": {
            "main": {
                "account_sid": ACCOUNT_SID,
                "auth_token": {"env": "TEST_TWILIO_TOKEN"},
                "numbers": [OUR_NUMBER],
            }
        }
    }
    if api_base_url:
        twilio["api_base_url"] = api_base_url
    return RuntimeSettings(
        http=HttpSettings(host="127.0.0.1", port=0, max_body_bytes=max_body_bytes),
        broker=BrokerSettings(
            url=broker_url,
            publish_timeout=publish_timeout,
            connect_timeout=connect_timeout,
            delivery_limit=delivery_limit,
        ),
        dedup=DedupSettings(url=dedup_url, pending_wait=0.5),
        send=send or SendSettings(initial_backoff=0.0, max_backoff=0.05),
        connectors={"sms.twilio": twilio},
    )


def service(
    runtime: RuntimeSettings, *, bus: Bus | None = None, store: IdempotencyStore | None = None
) -> Service:
    """A Service hosting ``sms.twilio`` (not started)."""
    return Service(runtime, ["sms.twilio"], bus=bus, store=store, environ=ENVIRON)


def inbound_form(sid: str | None = None, body: str = "hello") -> dict[str, str]:
    """Twilio's incoming-message webhook fields."""
    return {
        "MessageSid": sid or f"SM{uuid.uuid4().hex}",
        "AccountSid": ACCOUNT_SID,
        "From": CUSTOMER,
        "To": OUR_NUMBER,
        "Body": body,
        "NumMedia": "0",
        "NumSegments": "1",
        "ApiVersion": "2010-04-01",
    }


async def post_signed(
    http: aiohttp.ClientSession,
    url: str,
    form: Mapping[str, str],
    *,
    token: str = TOKEN,
    timeout: float = 10.0,
) -> tuple[int, str]:
    """POST a webhook signed as Twilio signs it; returns status and body."""
    signature = compute_signature(token, url, {k: [v] for k, v in form.items()})
    async with http.post(
        url,
        data=dict(form),
        headers={SIGNATURE_HEADER: signature},
        timeout=aiohttp.ClientTimeout(total=timeout),
    ) as resp:
        return resp.status, await resp.text()


def inbound_url(svc: Service, account: str = "main") -> str:
    """Where the service receives Twilio's incoming-message webhook."""
    return f"http://127.0.0.1:{svc.port}/webhooks/sms/twilio/{account}/inbound"
