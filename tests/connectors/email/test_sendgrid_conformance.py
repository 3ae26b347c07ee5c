"""The SendGrid email connector passes the connector conformance suite unchanged.

Inbound webhooks are Inbound Parse posts (raw MIME) signed with the parse
security policy's ECDSA key; status callbacks and batches are Event Webhook
posts signed with the event key; sends go to a fake v3 Mail Send API.
Signatures are made with ``cryptography`` and checked against the sendgrid
SDK's ``EventWebhook`` in ``test_webhooks.py``.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Sequence
from email.message import EmailMessage
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sendgrid.helpers.eventwebhook import EventWebhook

from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.content_pb2 import Email
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.message_pb2 import Message
from gateway.api.v1.participant_pb2 import Participant
from gateway.runtime.codec import encode_command
from gateway.runtime.topology import COMMANDS_EXCHANGE
from gateway.testing.conformance import (
    BatchCase,
    ConnectorConformance,
    FakeProvider,
    StatusCase,
    WebhookCall,
)
from gateway.testing.fake_email_sendgrid import FakeSendGrid
from tests.connectors.email.support import email_service

SIG = "X-Twilio-Email-Event-Webhook-Signature"
TS = "X-Twilio-Email-Event-Webhook-Timestamp"
S = DeliveryState


def _key() -> tuple[ec.EllipticCurvePrivateKey, str]:
    private = ec.generate_private_key(ec.SECP256R1())
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, base64.b64encode(der).decode()


EVENT_KEY, EVENT_PUBLIC = _key()
PARSE_KEY, PARSE_PUBLIC = _key()
OTHER_KEY, _ = _key()


def _signed(
    url: str,
    body: bytes,
    key: ec.EllipticCurvePrivateKey,
    content_type: str,
    *,
    age: int = 0,
    description: str = "",
) -> WebhookCall:
    timestamp = str(int(time.time()) - age)
    signature = base64.b64encode(
        key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    ).decode()
    return WebhookCall(
        url=url,
        body=body,
        headers={"Content-Type": content_type, SIG: signature, TS: timestamp},
        description=description,
    )


def _parse_body(provider_message_id: str) -> tuple[bytes, str]:
    mail = EmailMessage()
    mail["From"] = "Ana <ana@example.es>"
    mail["To"] = "support@shop.example"
    mail["Subject"] = "Pedido"
    mail["Message-ID"] = provider_message_id
    mail.set_content("¿Dónde está mi pedido?")
    boundary = "cgconformance" + uuid.uuid4().hex
    envelope = json.dumps({"to": ["support@shop.example"], "from": "ana@example.es"})
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="envelope"\r\n\r\n{envelope}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="email"\r\n\r\n'
        ).encode()
        + mail.as_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def _event(name: str, provider_message_id: str, message_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "email": extra.pop("email", "ana@example.es"),
        "timestamp": int(time.time()),
        "event": name,
        "sg_event_id": uuid.uuid4().hex,
        "sg_message_id": provider_message_id,
        "gateway_message_id": message_id,
        **extra,
    }


class TestSendGridConformance(ConnectorConformance):
    connector = "email.sendgrid"

    def connector_settings(self, api_base_url: str) -> dict[str, Any]:
        return {
            "api_base_url": api_base_url,
            "message_id_domain": "mail.shop.example",
            "accounts": {
                "main": {
                    "event_verification_key": EVENT_PUBLIC,
                    "parse_verification_key": PARSE_PUBLIC,
                    "api_key": {"env": "SG_API_KEY"},
                    "from_address": "support@shop.example",
                }
            },
        }

    def environ(self) -> dict[str, str]:
        return {"SG_API_KEY": "SG.conformance-live-key-0123"}

    def fake_provider(self) -> FakeProvider:
        return FakeSendGrid()

    def new_provider_message_id(self) -> str:
        return f"<{uuid.uuid4().hex}@mail.example.es>"

    def inbound_webhook(self, base_url: str, provider_message_id: str) -> WebhookCall:
        body, ctype = _parse_body(provider_message_id)
        return _signed(f"{base_url}/webhooks/email/sendgrid/main/inbound", body, PARSE_KEY, ctype)

    def forgeries(self, base_url: str, provider_message_id: str) -> Sequence[WebhookCall]:
        url = f"{base_url}/webhooks/email/sendgrid/main/inbound"
        body, ctype = _parse_body(provider_message_id)
        good = _signed(url, body, PARSE_KEY, ctype)
        return [
            WebhookCall(
                url=url,
                body=body.replace(b"Pedido", b"Pagado"),
                headers=good.headers,
                description="tampered body",
            ),
            _signed(url, body, OTHER_KEY, ctype, description="signed with another key"),
            _signed(url, body, EVENT_KEY, ctype, description="signed with the event key"),
            _signed(url, body, PARSE_KEY, ctype, age=3600, description="an hour-old timestamp"),
            WebhookCall(
                url=url,
                body=body,
                headers={"Content-Type": ctype, TS: good.headers[TS]},
                description="no signature",
            ),
            WebhookCall(
                url=url.replace("/main/", "/nobody/"),
                body=body,
                headers=good.headers,
                description="unknown account",
            ),
        ]

    def status_case(self, base_url: str, provider_message_id: str, message_id: str) -> StatusCase:
        url = f"{base_url}/webhooks/email/sendgrid/main/events"
        calls = [
            _signed(
                url,
                json.dumps([_event(name, provider_message_id, message_id)]).encode(),
                EVENT_KEY,
                "application/json",
                description=name,
            )
            for name in ("processed", "deferred", "delivered")
        ]
        return StatusCase(calls=calls, final_state=S.DELIVERY_STATE_DELIVERED)

    def batch_case(self, base_url: str) -> BatchCase:
        recipients = [f"r{n}@example.org" for n in range(4)]
        items = [
            _event("delivered", f"m{n}.filter", str(uuid.uuid4()), email=r)
            for n, r in enumerate(recipients)
        ]
        body = json.dumps(items).encode()
        call = _signed(
            f"{base_url}/webhooks/email/sendgrid/main/events", body, EVENT_KEY, "application/json"
        )
        return BatchCase(
            call=call,
            expected_items=frozenset(recipients),
            items_of=lambda events: [
                e.status.recipient for e in events if e.type == "message.status"
            ],
        )

    def send_command(self, message_id: str) -> SendMessageCommand:
        return SendMessageCommand(
            message_id=message_id,
            channel="email",
            provider="sendgrid",
            attempt=1,
            message=Message(
                recipients=[Participant(channel="email", address="ana@example.es")],
                email=Email(subject="Your order", text="It shipped.", html="<p>It shipped.</p>"),
            ),
        )


def test_the_sdk_accepts_what_the_adapter_signs() -> None:
    call = TestSendGridConformance().inbound_webhook("http://x", "<a@b>")
    assert EventWebhook(PARSE_PUBLIC).verify_signature(
        call.body.decode(), call.headers[SIG], call.headers[TS]
    )


async def test_send_payload_carries_the_gateway_id_and_threading() -> None:
    fake = FakeSendGrid()
    case = TestSendGridConformance()
    await fake.start()
    try:
        async with email_service(
            "email.sendgrid", case.connector_settings(fake.url), environ=case.environ()
        ) as (service, seen):
            command = case.send_command(str(uuid.uuid4()))
            command.message.email.in_reply_to = "<es-1@example.es>"
            routing_key, message = encode_command(command)
            await service.bus.publish(COMMANDS_EXCHANGE, routing_key, message, timeout=5)
            await seen.wait(lambda: any(e.type == "message.status" for e in seen.events))
    finally:
        await fake.stop()
    (call,) = fake.calls
    payload = call.payload
    assert call.authorization == "Bearer SG.conformance-live-key-0123"
    assert payload["personalizations"][0]["custom_args"] == {
        "gateway_message_id": command.message_id
    }
    assert payload["headers"]["In-Reply-To"] == "<es-1@example.es>"
    assert payload["headers"]["Message-ID"] == f"<{command.message_id}@mail.shop.example>"
    assert [c["type"] for c in payload["content"]] == ["text/plain", "text/html"]
    status: Event = next(e for e in seen.events if e.type == "message.status")
    assert status.status.state == S.DELIVERY_STATE_QUEUED
