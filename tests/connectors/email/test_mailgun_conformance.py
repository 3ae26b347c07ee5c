"""The Mailgun email connector passes the connector conformance suite.

Inbound webhooks are route forwards with the raw MIME (``body-mime``) signed
per Mailgun's documented scheme (HMAC-SHA256 of timestamp + token, computed
here independently); status callbacks are event webhooks carrying the
gateway's id in ``user-variables``; sends go to a fake Messages API.

Mailgun has no batched webhook: each forward or event is one request. The
nearest thing is one forwarded mail with several attachments, so the two
batch checks are restated for that: every attachment is in the event, and
after a failed publish the retry emits the mail once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Sequence
from email.message import EmailMessage
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
from gateway.testing.fake_email_mailgun import FakeMailgun
from tests.connectors.email.support import email_service

S = DeliveryState
KEY = "mailgun-signing-key-conformance-0123"


def _signature(key: str = KEY, *, age: int = 0) -> dict[str, str]:
    timestamp, token = str(int(time.time()) - age), uuid.uuid4().hex
    digest = hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()
    return {"timestamp": timestamp, "token": token, "signature": digest}


def _mail(provider_message_id: str, attachments: int = 0) -> bytes:
    mail = EmailMessage()
    mail["From"] = "Ana <ana@example.es>"
    mail["To"] = "support@shop.example"
    mail["Subject"] = "Pedido"
    mail["Message-ID"] = provider_message_id
    mail.set_content("¿Dónde está mi pedido?")
    for n in range(attachments):
        mail.add_attachment(f"%PDF {n}".encode(), "application", "pdf", filename=f"scan-{n}.pdf")
    return mail.as_bytes()


def _forward(base_url: str, raw: bytes, signature: dict[str, str], **kw: str) -> WebhookCall:
    boundary = "cgmailgun" + uuid.uuid4().hex
    fields = {**signature, "recipient": "support@shop.example", "sender": "ana@example.es"}
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    )
    body += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="body-mime"\r\n\r\n'.encode()
        + raw
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return WebhookCall(
        url=kw.get("url", f"{base_url}/webhooks/email/mailgun/main/inbound/mime"),
        body=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        description=kw.get("description", ""),
    )


class TestMailgunConformance(ConnectorConformance):
    connector = "email.mailgun"

    def connector_settings(self, api_base_url: str) -> dict[str, Any]:
        return {
            "api_base_url": api_base_url,
            "message_id_domain": "mail.shop.example",
            "accounts": {
                "main": {
                    "webhook_signing_key": {"env": "MG_SIGNING_KEY"},
                    "api_key": {"env": "MG_API_KEY"},
                    "domain": "mg.shop.example",
                    "from_address": "support@shop.example",
                }
            },
        }

    def environ(self) -> dict[str, str]:
        return {"MG_SIGNING_KEY": KEY, "MG_API_KEY": "key-live-0123456789abcdef"}

    def fake_provider(self) -> FakeProvider:
        return FakeMailgun()

    def new_provider_message_id(self) -> str:
        return f"<{uuid.uuid4().hex}@mail.example.es>"

    def inbound_webhook(self, base_url: str, provider_message_id: str) -> WebhookCall:
        return _forward(base_url, _mail(provider_message_id), _signature())

    def forgeries(self, base_url: str, provider_message_id: str) -> Sequence[WebhookCall]:
        raw = _mail(provider_message_id)
        swapped = _signature()
        swapped["token"] = uuid.uuid4().hex
        broken = _signature()
        broken["signature"] = "not-hex"
        return [
            _forward(base_url, raw, _signature("another-key"), description="wrong signing key"),
            _forward(base_url, raw, _signature(age=3600), description="an hour-old timestamp"),
            _forward(base_url, raw, swapped, description="token swapped"),
            _forward(base_url, raw, broken, description="malformed signature"),
            _forward(
                base_url,
                raw,
                _signature(),
                url=f"{base_url}/webhooks/email/mailgun/nobody/inbound/mime",
                description="unknown account",
            ),
        ]

    def status_case(self, base_url: str, provider_message_id: str, message_id: str) -> StatusCase:
        url = f"{base_url}/webhooks/email/mailgun/main/events"

        def call(name: str, **extra: Any) -> WebhookCall:
            data = {
                "event": name,
                "id": uuid.uuid4().hex,
                "timestamp": time.time(),
                "recipient": "ana@example.es",
                "message": {"headers": {"message-id": provider_message_id.strip("<>")}},
                "user-variables": {"gateway_message_id": message_id},
                **extra,
            }
            body = json.dumps({"signature": _signature(), "event-data": data}).encode()
            return WebhookCall(
                url=url, body=body, headers={"Content-Type": "application/json"}, description=name
            )

        calls = [
            call("accepted"),
            call("failed", severity="temporary", **{"delivery-status": {"code": 452}}),
            call("delivered", **{"delivery-status": {"code": 250}}),
        ]
        return StatusCase(calls=calls, final_state=S.DELIVERY_STATE_DELIVERED)

    def batch_case(self, base_url: str) -> BatchCase:
        return BatchCase(
            call=_forward(
                base_url, _mail(self.new_provider_message_id(), attachments=3), _signature()
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
            provider="mailgun",
            attempt=1,
            message=Message(
                recipients=[Participant(channel="email", address="ana@example.es")],
                email=Email(subject="Your order", text="It shipped.", in_reply_to="<es-1@x>"),
            ),
        )


async def test_send_form_carries_user_variable_and_threading() -> None:
    fake = FakeMailgun()
    case = TestMailgunConformance()
    await fake.start()
    try:
        async with email_service(
            "email.mailgun", case.connector_settings(fake.url), environ=case.environ()
        ) as (service, seen):
            command = case.send_command(str(uuid.uuid4()))
            routing_key, message = encode_command(command)
            await service.bus.publish(COMMANDS_EXCHANGE, routing_key, message, timeout=5)
            await seen.wait(lambda: any(e.type == "message.status" for e in seen.events))
    finally:
        await fake.stop()
    (call,) = fake.calls
    assert (call.domain, call.login) == ("mg.shop.example", "api")
    assert call.fields["v:gateway_message_id"] == command.message_id
    assert call.fields["h:In-Reply-To"] == "<es-1@x>"
    assert call.fields["h:Message-Id"] == f"<{command.message_id}@mail.shop.example>"
    (status,) = [e for e in seen.events if e.type == "message.status"]
    assert status.status.state == S.DELIVERY_STATE_QUEUED
    assert status.status.provider_message_id.endswith("@mg.shop.example>")
