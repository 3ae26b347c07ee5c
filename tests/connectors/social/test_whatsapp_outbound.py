"""WhatsApp sends against the fake Graph API: payloads, call counts, errors, the 24h window."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import aiohttp
import pytest

from connectors.social.meta import signature
from connectors.social.whatsapp import WhatsAppConnector, WhatsAppSettings
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.content_pb2 import (
    Attachment,
    Choice,
    ChoiceOption,
    ChoiceStyle,
    Location,
    Media,
    MediaKind,
    Template,
    Text,
)
from gateway.api.v1.message_pb2 import Message
from gateway.api.v1.participant_pb2 import Participant
from gateway.contract import AmbiguousSendError, PermanentError, TransientError
from gateway.testing.fake_meta import FakeMeta
from tests.connectors.social import whatsapp_payloads as wa
from tests.connectors.social.support import Context
from tests.connectors.social.test_meta_signature import request

TOKEN = "EAAG" + secrets.token_hex(16)
CUSTOMER = "+" + wa.CUSTOMER


@pytest.fixture
async def fake() -> AsyncIterator[FakeMeta]:
    async with FakeMeta(tokens=(TOKEN,)) as server:
        yield server


@pytest.fixture
async def connector(fake: FakeMeta) -> AsyncIterator[tuple[WhatsAppConnector, Context]]:
    settings = WhatsAppSettings.model_validate(
        {
            "app_secret": {"env": "S"},
            "verify_token": {"env": "V"},
            "graph_base_url": fake.url,
            "accounts": {
                "main": {"phone_number_id": wa.PHONE_NUMBER_ID, "access_token": {"env": "T"}}
            },
        },
        context={"environ": {"S": secrets.token_hex(8), "V": "verify1", "T": TOKEN}},
    )
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as http:
        ctx = Context(http=http)
        conn = WhatsAppConnector(ctx, settings)
        await conn.start()
        yield conn, ctx
        await conn.stop()


def command(message: Message, **metadata: str) -> SendMessageCommand:
    message.recipients.append(Participant(channel="whatsapp", address=CUSTOMER))
    return SendMessageCommand(
        message_id="gw-" + secrets.token_hex(4),
        channel="whatsapp",
        provider="meta",
        account="main",
        message=message,
        metadata=metadata,
    )


def open_window(conn: WhatsAppConnector, ctx: Context) -> None:
    conn.customer_wrote("main", CUSTOMER, ctx.clock - timedelta(hours=1))


async def test_text_with_reply_context(
    connector: tuple[WhatsAppConnector, Context], fake: FakeMeta
) -> None:
    conn, ctx = connector
    open_window(conn, ctx)
    cmd = command(Message(text=Text(body="See https://example.com"), reply_to="wamid.IN"))
    result = await conn.send(cmd)
    assert result.provider_message_id.startswith("wamid.")
    (call,) = fake.calls
    assert call.path == f"/v21.0/{wa.PHONE_NUMBER_ID}/messages"
    assert call.token == TOKEN
    assert call.body == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": wa.CUSTOMER,
        "context": {"message_id": "wamid.IN"},
        "biz_opaque_callback_data": cmd.message_id,
        "type": "text",
        "text": {"body": "See https://example.com", "preview_url": True},
    }


async def test_outside_the_window_only_templates_go_out(
    connector: tuple[WhatsAppConnector, Context], fake: FakeMeta
) -> None:
    conn, ctx = connector
    with pytest.raises(PermanentError) as info:
        await conn.send(command(Message(text=Text(body="hello"))))
    assert info.value.code == "outside_service_window"
    assert "template" in str(info.value)
    conn.customer_wrote("main", CUSTOMER, ctx.clock - timedelta(hours=24, seconds=1))
    with pytest.raises(PermanentError, match="24-hour"):
        await conn.send(command(Message(text=Text(body="hello"))))
    assert fake.calls == []  # rejected up front, nothing reached Meta
    template = Template(name="hello_world", language="en_US", parameters={"2": "b", "1": "a"})
    await conn.send(command(Message(template=template)))
    (call,) = fake.calls
    assert call.body["template"] == {
        "name": "hello_world",
        "language": {"code": "en_US"},
        "components": [
            {
                "type": "body",
                "parameters": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            }
        ],
    }


async def test_an_inbound_webhook_opens_the_window(
    connector: tuple[WhatsAppConnector, Context], fake: FakeMeta
) -> None:
    conn, ctx = connector
    body = wa.body(wa.webhook(wa.change([wa.text_message("hi")])))
    secret = conn._settings.app_secret.get_secret_value()
    req = request(body, {signature.SIGNATURE_HEADER: signature.compute_signature(body, secret)})
    inbound = await conn.on_webhook(req)
    assert len(inbound.events) == 1
    assert conn.window_open("main", CUSTOMER)
    await conn.send(command(Message(text=Text(body="hello back"))))
    assert len(fake.calls) == 1
    ctx.clock += timedelta(hours=25)
    assert not conn.window_open("main", CUSTOMER)


@pytest.mark.parametrize(
    ("message", "metadata", "expected_type", "expected"),
    [
        (
            Message(
                media=Media(kind=MediaKind.MEDIA_KIND_IMAGE, caption="look"),
                attachments=[Attachment(url="https://cdn.example/a.jpg")],
            ),
            {},
            "image",
            {"link": "https://cdn.example/a.jpg", "caption": "look"},
        ),
        (
            Message(
                media=Media(kind=MediaKind.MEDIA_KIND_DOCUMENT),
                attachments=[Attachment(provider_media_id="9001", filename="a.pdf")],
            ),
            {},
            "document",
            {"id": "9001", "filename": "a.pdf"},
        ),
        (
            Message(location=Location(latitude=1.5, longitude=2.5, name="HQ")),
            {},
            "location",
            {"latitude": 1.5, "longitude": 2.5, "name": "HQ"},
        ),
        (
            Message(
                choice=Choice(
                    body="Pick one",
                    options=[ChoiceOption(id="y", title="Yes"), ChoiceOption(id="n", title="No")],
                    style=ChoiceStyle.CHOICE_STYLE_BUTTONS,
                )
            ),
            {},
            "interactive",
            {
                "body": {"text": "Pick one"},
                "type": "button",
                "action": {
                    "buttons": [
                        {"type": "reply", "reply": {"id": "y", "title": "Yes"}},
                        {"type": "reply", "reply": {"id": "n", "title": "No"}},
                    ]
                },
            },
        ),
        (
            Message(
                choice=Choice(
                    body="Colours",
                    options=[ChoiceOption(id="r", title="Red", description="warm")],
                    style=ChoiceStyle.CHOICE_STYLE_LIST,
                )
            ),
            {"whatsapp.list_button": "See colours"},
            "interactive",
            {
                "body": {"text": "Colours"},
                "type": "list",
                "action": {
                    "button": "See colours",
                    "sections": [
                        {
                            "title": "Options",
                            "rows": [{"id": "r", "title": "Red", "description": "warm"}],
                        }
                    ],
                },
            },
        ),
        (
            Message(reply_to="wamid.TARGET"),
            {"whatsapp.action": "reaction", "whatsapp.emoji": "\U0001f44d"},
            "reaction",
            {"message_id": "wamid.TARGET", "emoji": "\U0001f44d"},
        ),
    ],
)
async def test_content_payloads(
    connector: tuple[WhatsAppConnector, Context],
    fake: FakeMeta,
    message: Message,
    metadata: dict[str, str],
    expected_type: str,
    expected: dict[str, Any],
) -> None:
    conn, ctx = connector
    open_window(conn, ctx)
    copy = Message()
    copy.CopyFrom(message)
    await conn.send(command(copy, **metadata))
    (call,) = fake.calls
    assert call.body["type"] == expected_type
    assert call.body[expected_type] == expected


async def test_mark_as_read(connector: tuple[WhatsAppConnector, Context], fake: FakeMeta) -> None:
    conn, _ = connector  # no window needed: a read receipt is not a message
    result = await conn.send(
        command(Message(reply_to="wamid.IN"), **{"whatsapp.action": "mark_read"})
    )
    assert result.provider_message_id == "wamid.IN"
    (call,) = fake.calls
    assert call.body == {
        "messaging_product": "whatsapp",
        "status": "read",
        "message_id": "wamid.IN",
    }
    await conn.send(
        command(
            Message(reply_to="wamid.IN2"),
            **{"whatsapp.action": "mark_read", "whatsapp.typing": "true"},
        )
    )
    assert fake.calls[1].body["typing_indicator"] == {"type": "text"}


async def test_errors_carry_the_retry_decision(
    connector: tuple[WhatsAppConnector, Context], fake: FakeMeta
) -> None:
    conn, ctx = connector
    open_window(conn, ctx)
    cmd = command(Message(text=Text(body="x")))
    fake.rate_limit_next(retry_after=3)
    with pytest.raises(TransientError) as limited:
        await conn.send(cmd)
    assert limited.value.retry_after == 3
    fake.throttle_next()  # a 400 with throttling code 80007
    with pytest.raises(TransientError) as throttled:
        await conn.send(cmd)
    assert throttled.value.code == "80007"
    fake.server_error_next(503)
    with pytest.raises(TransientError):
        await conn.send(cmd)
    fake.reject_next(131026, "Message undeliverable")
    with pytest.raises(PermanentError) as rejected:
        await conn.send(cmd)
    assert rejected.value.code == "131026"
    fake.hang_next(2.0)
    with pytest.raises(AmbiguousSendError):
        await conn.send(cmd)
    assert len(fake.calls) == 5


async def test_invalid_commands_never_reach_meta(
    connector: tuple[WhatsAppConnector, Context], fake: FakeMeta
) -> None:
    conn, ctx = connector
    open_window(conn, ctx)
    too_many = Choice(body="b", options=[ChoiceOption(id=str(i), title="t") for i in range(4)])
    for bad in (
        Message(text=Text(body="")),
        Message(choice=too_many),
        Message(
            media=Media(kind=MediaKind.MEDIA_KIND_IMAGE),
            attachments=[Attachment(url="http://insecure.example/a.jpg")],
        ),
        Message(reply_to="x"),
    ):
        with pytest.raises(PermanentError):
            await conn.send(command(bad, **({"whatsapp.action": "poke"} if bad.reply_to else {})))
    assert fake.calls == []
