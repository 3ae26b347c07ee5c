"""The Postmark email connector passes the connector conformance suite.

Inbound webhooks are Postmark inbound JSON posts with basic credentials;
status callbacks are Bounce (soft) and Delivery webhooks carrying the
gateway's id in ``Metadata``; sends go to a fake ``POST /email``.

Postmark has no batched webhook: each inbound mail or event is one request.
The nearest thing is one inbound mail with several attachments, so the two
batch checks are restated for that: every attachment is in the event, and
after a failed publish the retry emits the mail once.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Sequence
from typing import Any

from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.content_pb2 import Email
from gateway.api.v1.delivery_pb2 import DeliveryState
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
from gateway.testing.fake_email_postmark import FakePostmark
from tests.connectors.email.support import email_service

S = DeliveryState
USER, PASSWORD = "hook", "pm-conformance-pass-1"


def _auth(user: str = USER, password: str = PASSWORD) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}", "Content-Type": "application/json"}


def _inbound(provider_message_id: str, attachments: int = 0) -> bytes:
    return json.dumps(
        {
            "FromFull": {"Email": "ana@example.es", "Name": "Ana"},
            "ToFull": [{"Email": "support@shop.example", "Name": ""}],
            "Subject": "Pedido",
            "MessageID": uuid.uuid4().hex,
            "TextBody": "¿Dónde está mi pedido?",
            "Headers": [{"Name": "Message-ID", "Value": provider_message_id}],
            "Attachments": [
                {
                    "Name": f"scan-{n}.pdf",
                    "Content": base64.b64encode(f"%PDF {n}".encode()).decode(),
                    "ContentType": "application/pdf",
                    "ContentLength": 6,
                }
                for n in range(attachments)
            ],
        }
    ).encode()


class TestPostmarkConformance(ConnectorConformance):
    connector = "email.postmark"

    def connector_settings(self, api_base_url: str) -> dict[str, Any]:
        return {
            "api_base_url": api_base_url,
            "message_id_domain": "mail.shop.example",
            "accounts": {
                "main": {
                    "username": USER,
                    "password": {"env": "PM_HOOK_PASSWORD"},
                    "server_token": {"env": "PM_SERVER_TOKEN"},
                    "from_address": "support@shop.example",
                }
            },
        }

    def environ(self) -> dict[str, str]:
        return {"PM_HOOK_PASSWORD": PASSWORD, "PM_SERVER_TOKEN": "pm-server-token-0123"}

    def fake_provider(self) -> FakeProvider:
        return FakePostmark()

    def new_provider_message_id(self) -> str:
        return f"<{uuid.uuid4().hex}@mail.example.es>"

    def inbound_webhook(self, base_url: str, provider_message_id: str) -> WebhookCall:
        return WebhookCall(
            url=f"{base_url}/webhooks/email/postmark/main/inbound",
            body=_inbound(provider_message_id),
            headers=_auth(),
        )

    def forgeries(self, base_url: str, provider_message_id: str) -> Sequence[WebhookCall]:
        url = f"{base_url}/webhooks/email/postmark/main/inbound"
        body = _inbound(provider_message_id)
        return [
            WebhookCall(
                url=url, body=body, headers=_auth(password="wrong"), description="bad password"
            ),
            WebhookCall(url=url, body=body, headers=_auth(user="other"), description="bad user"),
            WebhookCall(
                url=url,
                body=body,
                headers={"Content-Type": "application/json"},
                description="no credentials",
            ),
            WebhookCall(
                url=url,
                body=body,
                headers={"Authorization": f"Bearer {PASSWORD}"},
                description="wrong scheme",
            ),
            WebhookCall(
                url=url.replace("/main/", "/nobody/"),
                body=body,
                headers=_auth(),
                description="unknown account",
            ),
        ]

    def status_case(self, base_url: str, provider_message_id: str, message_id: str) -> StatusCase:
        url = f"{base_url}/webhooks/email/postmark/main/events"
        soft = {
            "RecordType": "Bounce",
            "ID": uuid.uuid4().int % 10**9,
            "Type": "SoftBounce",
            "TypeCode": 4096,
            "MessageID": provider_message_id,
            "Email": "ana@example.es",
            "Description": "mailbox full, will retry",
            "Inactive": False,
            "Metadata": {"gateway_message_id": message_id},
        }
        delivered = {
            "RecordType": "Delivery",
            "MessageID": provider_message_id,
            "Recipient": "ana@example.es",
            "DeliveredAt": "2026-11-02T10:00:00Z",
            "Details": "250 OK",
            "Metadata": {"gateway_message_id": message_id},
        }
        calls = [
            WebhookCall(url=url, body=json.dumps(b).encode(), headers=_auth(), description=d)
            for d, b in (("soft bounce", soft), ("delivery", delivered))
        ]
        return StatusCase(calls=calls, final_state=S.DELIVERY_STATE_DELIVERED)

    def batch_case(self, base_url: str) -> BatchCase:
        return BatchCase(
            call=WebhookCall(
                url=f"{base_url}/webhooks/email/postmark/main/inbound",
                body=_inbound(self.new_provider_message_id(), attachments=3),
                headers=_auth(),
            ),
            expected_items=frozenset(f"scan-{n}.pdf" for n in range(3)),
            items_of=lambda events: [
                a.filename for e in events if e.HasField("message") for a in e.message.attachments
            ],
        )

    def send_command(self, message_id: str) -> SendMessageCommand:
        return SendMessageCommand(
            message_id=message_id,
            channel="email",
            provider="postmark",
            attempt=1,
            message=Message(
                recipients=[Participant(channel="email", address="ana@example.es")],
                email=Email(subject="Your order", text="It shipped.", in_reply_to="<es-1@x>"),
            ),
        )


async def test_send_payload_carries_metadata_and_threading() -> None:
    fake = FakePostmark()
    case = TestPostmarkConformance()
    await fake.start()
    try:
        async with email_service(
            "email.postmark", case.connector_settings(fake.url), environ=case.environ()
        ) as (service, seen):
            command = case.send_command(str(uuid.uuid4()))
            routing_key, message = encode_command(command)
            await service.bus.publish(COMMANDS_EXCHANGE, routing_key, message, timeout=5)
            await seen.wait(lambda: any(e.type == "message.status" for e in seen.events))
    finally:
        await fake.stop()
    (call,) = fake.calls
    assert call.token == "pm-server-token-0123"
    assert call.payload["Metadata"] == {"gateway_message_id": command.message_id}
    headers = {h["Name"]: h["Value"] for h in call.payload["Headers"]}
    assert headers["In-Reply-To"] == "<es-1@x>"
    assert headers["Message-ID"] == f"<{command.message_id}@mail.shop.example>"
    (status,) = [e for e in seen.events if e.type == "message.status"]
    assert status.status.state == S.DELIVERY_STATE_SENT
