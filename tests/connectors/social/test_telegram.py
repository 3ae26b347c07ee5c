"""Telegram: update mapping, the webhook secret token, update_id dedup, Bot API sends."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from connectors.social.telegram import TelegramConnector, TelegramSettings, mapping
from connectors.social.telegram.connector import SECRET_HEADER
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.content_pb2 import (
    Attachment,
    Choice,
    ChoiceOption,
    Media,
    MediaKind,
    Text,
)
from gateway.api.v1.message_pb2 import Message
from gateway.api.v1.participant_pb2 import Participant
from gateway.contract import (
    AmbiguousSendError,
    AuthError,
    BadRequestError,
    PermanentError,
    TransientError,
)
from gateway.testing.fake_telegram import FakeTelegram
from tests.connectors.social import telegram_payloads as tg
from tests.connectors.social.support import Context
from tests.connectors.social.test_meta_signature import request

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
TOKEN = "7000000001:" + secrets.token_urlsafe(26)
SECRET = "s3cr3t_" + secrets.token_hex(8)


def mapped(kind: str, body: dict[str, Any]) -> Any:
    return mapping.map_update(tg.update(kind, body), account="support", received_at=NOW)


def test_text_with_entities() -> None:
    msg = tg.message(
        text="/start hello", entities=[{"offset": 0, "length": 6, "type": "bot_command"}]
    )
    event = mapped("message", msg)
    assert event.type == "message.received"
    assert (event.channel, event.provider, event.account) == ("telegram", "bot", "support")
    assert event.message.text.body == "/start hello"
    assert event.message.provider_message_id == f"{tg.PRIVATE_CHAT['id']}:{msg['message_id']}"
    assert event.message.sender.address == str(tg.USER["id"])
    assert event.message.sender.display_name == "Ada L"
    assert json.loads(event.attributes["telegram.entities"])[0]["type"] == "bot_command"
    assert event.attributes["telegram.chat_id"] == str(tg.PRIVATE_CHAT["id"])


def test_photo_takes_the_largest_size() -> None:
    event = mapped("message", tg.message(photo=tg.photo_sizes(), caption="look"))
    assert event.message.media.kind == MediaKind.MEDIA_KIND_IMAGE
    assert event.message.media.caption == "look"
    (attachment,) = event.message.attachments
    assert attachment.provider_media_id == "AgAD-large"
    assert attachment.size_bytes == 98000


@pytest.mark.parametrize(
    ("field", "body", "kind"),
    [
        (
            "document",
            {
                "file_id": "BQAD",
                "file_unique_id": "d",
                "file_name": "a.pdf",
                "mime_type": "application/pdf",
                "file_size": 5000,
            },
            MediaKind.MEDIA_KIND_DOCUMENT,
        ),
        (
            "voice",
            {
                "file_id": "AwAD",
                "file_unique_id": "v",
                "duration": 3,
                "mime_type": "audio/ogg",
                "file_size": 9000,
            },
            MediaKind.MEDIA_KIND_VOICE,
        ),
        (
            "video",
            {
                "file_id": "BAAD",
                "file_unique_id": "w",
                "width": 640,
                "height": 480,
                "duration": 5,
                "mime_type": "video/mp4",
            },
            MediaKind.MEDIA_KIND_VIDEO,
        ),
    ],
)
def test_files(field: str, body: dict[str, Any], kind: MediaKind.ValueType) -> None:
    event = mapped("message", tg.message(**{field: body}))
    assert event.message.media.kind == kind
    (attachment,) = event.message.attachments
    assert attachment.provider_media_id == body["file_id"]
    assert attachment.content_type == body["mime_type"]
    assert attachment.filename == body.get("file_name", "")


def test_location_and_contact() -> None:
    loc = mapped("message", tg.message(location={"latitude": 52.52, "longitude": 13.405}))
    assert (loc.message.location.latitude, loc.message.location.longitude) == (52.52, 13.405)
    contact = mapped(
        "message",
        tg.message(
            contact={
                "phone_number": "+4915112345678",
                "first_name": "Max",
                "last_name": "M",
                "user_id": 42,
            }
        ),
    )
    assert contact.message.contact.formatted_name == "Max M"
    assert list(contact.message.contact.phones) == ["+4915112345678"]
    assert contact.attributes["telegram.contact_user_id"] == "42"


def test_edited_message_channel_post_and_callback_query() -> None:
    msg = tg.message(text="fixed", edit_date=1_700_000_000)
    edit = mapped("edited_message", msg)
    assert edit.type == "message.edited"
    assert edit.edit.provider_message_id == f"{tg.PRIVATE_CHAT['id']}:{msg['message_id']}"
    assert edit.edit.message.text.body == "fixed"
    post = mapped("channel_post", tg.message(chat=tg.CHANNEL_CHAT, text="news"))
    assert post.message.sender.address == str(tg.CHANNEL_CHAT["id"])
    assert post.message.sender.display_name == "News"
    assert post.attributes["telegram.update_type"] == "channel_post"
    origin = tg.message(text="Pick", message_id=77)
    query = mapped(
        "callback_query",
        {
            "id": "4382bfdwdsb323b2d9",
            "from": tg.USER,
            "message": origin,
            "chat_instance": "-123",
            "data": "opt-2",
        },
    )
    assert query.message.choice_response.option_id == "opt-2"
    assert query.message.choice_response.in_response_to == f"{tg.PRIVATE_CHAT['id']}:77"
    assert query.attributes["telegram.callback_query_id"] == "4382bfdwdsb323b2d9"


def test_update_id_is_the_dedup_key() -> None:
    body = tg.update("message", tg.message(text="x"), uid=555)
    first = mapping.map_update(body, account="support", received_at=NOW)
    again = mapping.map_update(body, account="support", received_at=NOW)
    other_bot = mapping.map_update(body, account="sales", received_at=NOW)
    assert first is not None
    assert again is not None
    assert other_bot is not None
    assert first.id == again.id
    assert first.id != other_bot.id
    assert first.sequence == 555


def test_unmapped_kinds() -> None:
    assert (
        mapping.map_update({"update_id": 1, "poll_answer": {}}, account="a", received_at=NOW)
        is None
    )
    dice = mapped("message", tg.message(dice={"emoji": "\U0001f3b2", "value": 4}))
    assert dice.type == "message.unsupported"
    assert dice.attributes["telegram.unmapped_content"] == "dice"
    for bad in ({"message": {}}, {"update_id": "1"}, [1]):
        with pytest.raises(BadRequestError):
            mapping.map_update(bad, account="a", received_at=NOW)


# -- the connector ---------------------------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram(tokens=(TOKEN,)) as server:
        yield server


@pytest.fixture
async def connector(fake: FakeTelegram) -> AsyncIterator[TelegramConnector]:
    settings = TelegramSettings.model_validate(
        {
            "api_base_url": fake.url,
            "bots": {"support": {"token": {"env": "T"}, "secret_token": {"env": "S"}}},
        },
        context={"environ": {"T": TOKEN, "S": SECRET}},
    )
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as http:
        conn = TelegramConnector(Context(http=http), settings)
        await conn.start()
        yield conn
        await conn.stop()


def test_secret_token_must_be_telegram_shaped() -> None:
    with pytest.raises(ValueError, match="secret_token"):
        TelegramSettings.model_validate(
            {"bots": {"b": {"token": {"env": "T"}, "secret_token": {"env": "S"}}}},
            context={"environ": {"T": TOKEN, "S": "has spaces!"}},
        )


async def test_secret_token_check(connector: TelegramConnector) -> None:
    body = json.dumps(tg.update("message", tg.message(text="hi"))).encode()

    def with_header(value: str | None, account: str = "support") -> Any:
        req = request(body, {SECRET_HEADER: value} if value is not None else {})
        return type(req)(**{**req.__dict__, "path_params": {"account": account}})

    inbound = await connector.on_update(with_header(SECRET))
    assert len(inbound.events) == 1
    for value, status in (
        (None, 401),
        ("", 401),
        (SECRET[:-1], 403),
        (SECRET + "x", 403),
        (SECRET.upper(), 403),
    ):
        with pytest.raises(AuthError) as info:
            await connector.on_update(with_header(value))
        assert info.value.status == status
    with pytest.raises(AuthError):
        await connector.on_update(with_header(SECRET, account="nobody"))


def command(message: Message, **metadata: str) -> SendMessageCommand:
    return SendMessageCommand(
        message_id="gw-" + secrets.token_hex(4),
        channel="telegram",
        provider="bot",
        account="support",
        message=message,
        metadata=metadata,
    )


CHAT = [Participant(channel="telegram", address="123456789")]


async def test_sends(connector: TelegramConnector, fake: FakeTelegram) -> None:
    result = await connector.send(
        command(Message(recipients=CHAT, text=Text(body="hi"), reply_to="123456789:5"))
    )
    assert result.provider_message_id.startswith("123456789:")
    await connector.send(
        command(
            Message(
                recipients=CHAT,
                choice=Choice(
                    body="Pick",
                    options=[ChoiceOption(id="a", title="A"), ChoiceOption(id="b", title="B")],
                ),
            )
        )
    )
    await connector.send(
        command(
            Message(
                recipients=CHAT,
                media=Media(kind=MediaKind.MEDIA_KIND_IMAGE, caption="c"),
                attachments=[Attachment(url="https://cdn.example/p.jpg")],
            )
        )
    )
    await connector.send(
        command(
            Message(
                recipients=CHAT,
                media=Media(kind=MediaKind.MEDIA_KIND_DOCUMENT),
                attachments=[Attachment(provider_media_id="BQAD")],
            )
        )
    )
    edited = await connector.send(
        command(
            Message(text=Text(body="new"), reply_to="123456789:100"), **{"telegram.action": "edit"}
        )
    )
    assert edited.provider_message_id == "123456789:100"
    answered = await connector.send(
        command(
            Message(text=Text(body="Thanks!")),
            **{"telegram.action": "answer_callback", "telegram.callback_query_id": "q1"},
        )
    )
    assert answered.provider_message_id == "callback:q1"
    methods = [(c.method, c.params) for c in fake.calls]
    assert methods == [
        (
            "sendMessage",
            {
                "chat_id": "123456789",
                "text": "hi",
                "reply_parameters": {"message_id": 5, "allow_sending_without_reply": True},
            },
        ),
        (
            "sendMessage",
            {
                "chat_id": "123456789",
                "text": "Pick",
                "reply_markup": {
                    "inline_keyboard": [
                        [{"text": "A", "callback_data": "a"}],
                        [{"text": "B", "callback_data": "b"}],
                    ]
                },
            },
        ),
        (
            "sendPhoto",
            {"chat_id": "123456789", "photo": "https://cdn.example/p.jpg", "caption": "c"},
        ),
        ("sendDocument", {"chat_id": "123456789", "document": "BQAD"}),
        ("editMessageText", {"chat_id": "123456789", "message_id": 100, "text": "new"}),
        ("answerCallbackQuery", {"callback_query_id": "q1", "text": "Thanks!"}),
    ]
    assert {c.token for c in fake.calls} == {TOKEN}


async def test_errors_and_retry_after(connector: TelegramConnector, fake: FakeTelegram) -> None:
    cmd = command(Message(recipients=CHAT, text=Text(body="x")))
    fake.rate_limit_next(retry_after=7)
    with pytest.raises(TransientError) as limited:
        await connector.send(cmd)
    assert limited.value.retry_after == 7
    fake.server_error_next(502)
    with pytest.raises(TransientError):
        await connector.send(cmd)
    fake.reject_next()
    with pytest.raises(PermanentError, match="chat not found") as rejected:
        await connector.send(cmd)
    assert rejected.value.code == "400"
    assert TOKEN not in str(rejected.value)
    fake.hang_next(2.0)
    with pytest.raises(AmbiguousSendError):
        await connector.send(cmd)
    assert len(fake.calls) == 4
    for bad in (
        Message(recipients=CHAT, text=Text(body="")),
        Message(recipients=[Participant(address="not a chat")], text=Text(body="x")),
        Message(recipients=CHAT, text=Text(body="x"), reply_to="nochat"),
    ):
        with pytest.raises(PermanentError):
            await connector.send(command(bad))
    assert len(fake.calls) == 4


async def test_set_webhook(connector: TelegramConnector, fake: FakeTelegram) -> None:
    assert (
        await connector.set_webhook("support", "https://gw.example/webhooks/telegram/bot/support")
        is True
    )
    (call,) = fake.all_calls
    assert call.method == "setWebhook"
    assert call.params["secret_token"] == SECRET
    assert call.params["url"] == "https://gw.example/webhooks/telegram/bot/support"
    assert "callback_query" in call.params["allowed_updates"]
