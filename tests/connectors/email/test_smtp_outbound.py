"""Outbound email: MIME composition, and submission through the runtime's
CommandWorker to a local aiosmtpd relay (STARTTLS, implicit TLS, AUTH, errors)."""

from __future__ import annotations

import base64
import ssl
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from connectors.email.compose import compose
from connectors.email.mapping import gateway_message_id
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.content_pb2 import Attachment, Email, Header, Text
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.message_pb2 import Message
from gateway.api.v1.participant_pb2 import Participant
from gateway.contract import PermanentError, new_id
from gateway.runtime.codec import encode_command
from gateway.runtime.topology import COMMANDS_EXCHANGE
from gateway.testing.fake_email import FakeSmtpRelay
from tests.connectors.email.support import Collected, email_service, self_signed

S = DeliveryState
NOW = datetime(2026, 11, 2, 10, 0, tzinfo=UTC)
DOMAIN = "mail.shop.example"
PNG = b"\x89PNG\r\n\x1a\nlogo-bytes"


def data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def command(**email: Any) -> SendMessageCommand:
    fields: dict[str, Any] = {
        "subject": "Your order 42",
        "text": "Hello Ana,\nyour order shipped.",
        "html": '<p>Hello <b>Ana</b></p><img src="cid:logo@shop">',
        "in_reply_to": "<es-1@example.es>",
        "references": ["<root-0@example.es>"],
        **email,
    }
    content = Email(**fields)
    message = Message(
        recipients=[Participant(channel="email", address="ana@example.es", display_name="Ana")],
        email=content,
        attachments=[
            Attachment(
                url=data_url(PNG, "image/png"),
                content_type="image/png",
                content_id="logo@shop",
                inline=True,
                filename="logo.png",
            ),
            Attachment(
                url=data_url(b"%PDF-1.7 invoice", "application/pdf"), filename="invoice.pdf"
            ),
        ],
    )
    created = Timestamp()
    created.FromDatetime(NOW)
    return SendMessageCommand(
        message_id=new_id(),
        channel="email",
        provider="smtp",
        message=message,
        created_at=created,
        attempt=1,
    )


def parts(msg: EmailMessage) -> list[str]:
    return [part.get_content_type() for part in msg.walk()]


def test_compose_builds_alternative_related_and_mixed() -> None:
    cmd = command()
    msg = compose(
        cmd,
        from_address="support@shop.example",
        from_name="Shop",
        message_id_domain=DOMAIN,
        now=NOW,
    )
    parsed = message_from_bytes(msg.as_bytes(), policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    assert parts(parsed) == [
        "multipart/mixed",
        "multipart/alternative",
        "text/plain",
        "multipart/related",
        "text/html",
        "image/png",
        "application/pdf",
    ]
    assert parsed["From"] == "Shop <support@shop.example>"
    assert parsed["To"] == "Ana <ana@example.es>"
    assert parsed["Message-ID"] == f"<{cmd.message_id}@{DOMAIN}>"
    assert gateway_message_id(parsed["Message-ID"], DOMAIN) == cmd.message_id
    assert parsed["In-Reply-To"] == "<es-1@example.es>"
    assert parsed["References"] == "<root-0@example.es> <es-1@example.es>"
    logo = next(p for p in parsed.walk() if p.get_content_type() == "image/png")
    assert logo["Content-ID"] == "<logo@shop>"
    assert logo.get_content_disposition() == "inline"
    assert logo.get_payload(decode=True) == PNG
    pdf = next(p for p in parsed.walk() if p.get_content_type() == "application/pdf")
    assert pdf.get_filename() == "invoice.pdf"


def test_html_only_gets_a_plain_text_alternative_and_text_content_is_plain() -> None:
    cmd = command(text="")
    msg = compose(cmd, from_address="s@shop.example", message_id_domain=DOMAIN, now=NOW)
    plain = next(p for p in msg.walk() if p.get_content_type() == "text/plain")
    assert isinstance(plain, EmailMessage)
    assert plain.get_content().strip() == "Hello Ana"
    text_cmd = SendMessageCommand(
        message_id=new_id(),
        message=Message(
            recipients=[Participant(address="bob@example.org")], text=Text(body="Just text")
        ),
    )
    simple = compose(text_cmd, from_address="s@shop.example", message_id_domain=DOMAIN, now=NOW)
    assert simple.get_content_type() == "text/plain"
    assert simple.get_content().strip() == "Just text"


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (
            {"headers": [Header(name="X-Evil", value="a\r\nBcc: victim@example.org")]},
            "invalid_header",
        ),
        ({"headers": [Header(name="Bcc", value="victim@example.org")]}, "reserved_header"),
        ({"subject": "line\nbreak"}, "invalid_header"),
    ],
)
def test_header_injection_is_a_permanent_error(change: dict[str, Any], code: str) -> None:
    with pytest.raises(PermanentError) as caught:
        compose(command(**change), from_address="s@shop.example", message_id_domain=DOMAIN, now=NOW)
    assert caught.value.code == code


def test_remote_attachment_urls_are_refused() -> None:
    cmd = command()
    cmd.message.attachments[1].url = "http://169.254.169.254/latest/meta-data"
    with pytest.raises(PermanentError) as caught:
        compose(cmd, from_address="s@shop.example", message_id_domain=DOMAIN, now=NOW)
    assert caught.value.code == "unsupported_attachment"


def outbound_section(relay: FakeSmtpRelay, **submission: Any) -> dict[str, Any]:
    return {
        "message_id_domain": DOMAIN,
        "from_address": "support@shop.example",
        "from_name": "Shop",
        "submission": {"host": "127.0.0.1", "port": relay.port, "security": "none", **submission},
    }


async def send_and_wait(service: Any, seen: Collected, cmd: SendMessageCommand) -> Any:
    routing_key, message = encode_command(cmd)
    await service.bus.publish(COMMANDS_EXCHANGE, routing_key, message, timeout=5.0)

    def statuses() -> list[Any]:
        return [
            e
            for e in seen.events
            if e.type == "message.status" and e.status.message_id == cmd.message_id
        ]

    await seen.wait(lambda: bool(statuses()))
    (event,) = statuses()
    return event


async def test_send_delivers_mime_to_the_relay_and_reports_sent() -> None:
    relay = FakeSmtpRelay()
    await relay.start()
    try:
        async with email_service("email.smtp", outbound_section(relay)) as (service, seen):
            cmd = command()
            event = await send_and_wait(service, seen, cmd)
    finally:
        await relay.stop()
    assert event.status.state == S.DELIVERY_STATE_SENT
    assert event.status.provider_message_id == f"<{cmd.message_id}@{DOMAIN}>"
    (submitted,) = relay.messages
    assert submitted.rcpt_tos == ["ana@example.es"]
    assert submitted.mail_from == "support@shop.example"
    parsed = message_from_bytes(submitted.data, policy=policy.default)
    assert parsed["Message-ID"] == f"<{cmd.message_id}@{DOMAIN}>"
    assert parsed["In-Reply-To"] == "<es-1@example.es>"
    assert "multipart/alternative" in [p.get_content_type() for p in parsed.walk()]


def tls_relay(tmp_path: Path, **kw: Any) -> tuple[FakeSmtpRelay, Path]:
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return FakeSmtpRelay(tls_context=context, username="shop", password="s3cret-pw", **kw), cert


@pytest.mark.parametrize(("security", "implicit"), [("starttls", False), ("tls", True)])
async def test_send_over_tls_with_auth(tmp_path: Path, security: str, implicit: bool) -> None:
    relay, cert = tls_relay(tmp_path, implicit_tls=implicit)
    await relay.start()
    environ = {"RELAY_PASSWORD": "s3cret-pw"}
    section = outbound_section(
        relay,
        security=security,
        username="shop",
        password={"env": "RELAY_PASSWORD"},
        ca_file=str(cert),
    )
    try:
        async with email_service("email.smtp", section, environ=environ) as (service, seen):
            event = await send_and_wait(service, seen, command())
    finally:
        await relay.stop()
    assert event.status.state == S.DELIVERY_STATE_SENT
    (submitted,) = relay.messages
    assert submitted.tls
    assert submitted.authenticated_as == "shop"


async def test_wrong_password_is_one_permanent_failure(tmp_path: Path) -> None:
    relay, cert = tls_relay(tmp_path)
    await relay.start()
    section = outbound_section(
        relay, security="starttls", username="shop", password={"env": "P"}, ca_file=str(cert)
    )
    try:
        async with email_service("email.smtp", section, environ={"P": "wrong-pw"}) as (
            service,
            seen,
        ):
            event = await send_and_wait(service, seen, command())
    finally:
        await relay.stop()
    assert event.status.state == S.DELIVERY_STATE_FAILED
    assert event.status.permanent
    assert event.status.reason_code == "smtp_auth"
    assert relay.calls == []


@pytest.mark.parametrize(
    ("replies", "state", "permanent", "calls"),
    [
        (["451 4.3.0 try later"], S.DELIVERY_STATE_SENT, False, 2),
        (["451 4.3.0 a", "452 4.3.1 b", "421 4.3.2 c"], S.DELIVERY_STATE_FAILED, False, 3),
        (["554 5.7.1 spam"], S.DELIVERY_STATE_FAILED, True, 1),
    ],
)
async def test_relay_replies_decide_retries(
    replies: list[str], state: int, permanent: bool, calls: int
) -> None:
    relay = FakeSmtpRelay()
    for reply in replies:
        relay.reply_next(reply)
    await relay.start()
    try:
        async with email_service("email.smtp", outbound_section(relay)) as (service, seen):
            event = await send_and_wait(service, seen, command())
    finally:
        await relay.stop()
    assert event.status.state == state
    assert event.status.permanent == permanent
    assert len(relay.calls) == calls


async def test_refused_recipient_is_permanent_and_a_hang_is_ambiguous() -> None:
    relay = FakeSmtpRelay()
    relay.refuse_recipient("ana@example.es")
    await relay.start()
    try:
        async with email_service("email.smtp", outbound_section(relay, timeout=0.5)) as (
            service,
            seen,
        ):
            refused = await send_and_wait(service, seen, command())
            relay._script.refused_rcpt.clear()
            relay.hang_next(2.0)
            hung = await send_and_wait(service, seen, command())
    finally:
        await relay.stop()
    assert refused.status.state == S.DELIVERY_STATE_FAILED
    assert refused.status.permanent
    assert refused.status.reason_code == "smtp_rcpt"
    assert hung.status.state == S.DELIVERY_STATE_FAILED
    assert hung.status.reason_code == "ambiguous_send"
    assert len(relay.calls) == 1  # the hung message was not submitted again
