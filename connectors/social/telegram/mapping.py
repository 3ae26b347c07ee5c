"""Telegram Bot API updates -> gateway.api.v1 events: pure functions, no I/O.

https://core.telegram.org/bots/api#update and #message

One webhook carries one ``Update``; its ``update_id`` is the dedup key (the
event id derives from it, so Telegram's retries of an update give one event).
Kinds mapped: ``message`` and ``channel_post`` (text with entities, photo at
its largest size, document, voice, video, audio, sticker, location, contact),
``edited_message`` / ``edited_channel_post`` (``message.edited``) and
``callback_query`` (an inline-keyboard press: a ``ChoiceResponse``). Other
update kinds are acknowledged and not published.

Message ids are unique per chat only, so provider message ids are
``<chat_id>:<message_id>``. Files are referenced by ``file_id``
(``Attachment.provider_media_id``): a download URL would contain the bot
token, so none is put in an event. Entities, chat type and media-group ids
go to ``attributes`` (``telegram.*``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from gateway.api.v1.content_pb2 import (
    Attachment,
    ChoiceResponse,
    ContactCard,
    Location,
    Media,
    MediaKind,
    Text,
    TextFormat,
)
from gateway.api.v1.envelope_pb2 import Event, RawPayload
from gateway.api.v1.message_pb2 import Direction, Edit, Message
from gateway.api.v1.participant_pb2 import Participant, ParticipantRole
from gateway.contract import BadRequestError, inbound_event_id
from gateway.contract.ids import conversation_id
from gateway.contract.times import timestamp

CHANNEL = "telegram"
PROVIDER = "bot"

EVENT_TYPES = ("message.received", "message.edited", "message.unsupported", "message.status")
INBOUND_CONTENT = ("text", "media", "location", "contact", "choice_response")

_MEDIA: tuple[tuple[str, MediaKind.ValueType], ...] = (
    ("document", MediaKind.MEDIA_KIND_DOCUMENT),
    ("voice", MediaKind.MEDIA_KIND_VOICE),
    ("video", MediaKind.MEDIA_KIND_VIDEO),
    ("video_note", MediaKind.MEDIA_KIND_VIDEO),
    ("audio", MediaKind.MEDIA_KIND_AUDIO),
    ("animation", MediaKind.MEDIA_KIND_VIDEO),
    ("sticker", MediaKind.MEDIA_KIND_STICKER),
)


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise BadRequestError(f"{where} is not an object")
    return value


def _int(parent: Mapping[str, Any], name: str) -> int:
    value = parent.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequestError(f"missing or non-integer {name}")
    return value


def _str(parent: Mapping[str, Any], name: str) -> str:
    value = parent.get(name)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadRequestError(f"{name} is not a string")
    return str(value)


def message_key(chat_id: int | str, message_id: int | str) -> str:
    """Provider message id: Telegram message ids are unique per chat only."""
    return f"{chat_id}:{message_id}"


def parse_message_key(key: str) -> tuple[str, int]:
    """``(chat_id, message_id)`` of a provider message id (a PermanentError-worthy 400 if odd)."""
    chat, _, message = key.rpartition(":")
    if not chat or not message.isdigit():
        raise BadRequestError(f"not a Telegram message id (<chat_id>:<message_id>): {key!r}")
    return chat, int(message)


def _user(user: Any, role: ParticipantRole.ValueType) -> Participant:
    who = _object(user, "from")
    name = " ".join(p for p in (_str(who, "first_name"), _str(who, "last_name")) if p)
    if not name:
        name = _str(who, "title") or _str(who, "username")
    return Participant(channel=CHANNEL, address=str(_int(who, "id")), display_name=name, role=role)


def map_update(update: Any, *, account: str, received_at: datetime) -> Event | None:
    """The event of one update (None: a kind we do not publish)."""
    body = _object(update, "update")
    update_id = _int(body, "update_id")
    raw = RawPayload(content_type="application/json", data=json.dumps(body).encode())
    base = Event(
        id=inbound_event_id(PROVIDER, account, "update", str(update_id)),
        channel=CHANNEL,
        provider=PROVIDER,
        account=account,
        received_at=timestamp(received_at),
        sequence=update_id,
        raw=raw,
    )
    for kind in ("message", "channel_post"):
        if kind in body:
            message = _message(_object(body[kind], kind), account, base)
            base.attributes["telegram.update_type"] = kind
            if message.WhichOneof("content") is None:
                # Nothing the contract holds (a poll, dice, service message): raw has it.
                base.type = "message.unsupported"
                base.attributes["telegram.message_id"] = message.provider_message_id
                return base
            base.type = "message.received"
            base.message.CopyFrom(message)
            return base
    for kind in ("edited_message", "edited_channel_post"):
        if kind in body:
            message = _message(_object(body[kind], kind), account, base)
            base.type = "message.edited"
            base.edit.CopyFrom(
                Edit(provider_message_id=message.provider_message_id, message=message)
            )
            base.attributes["telegram.update_type"] = kind
            edited = body[kind].get("edit_date")
            if isinstance(edited, int):
                base.occurred_at.CopyFrom(timestamp(datetime.fromtimestamp(edited, UTC)))
            return base
    if "callback_query" in body:
        query = _object(body["callback_query"], "callback_query")
        presser = _user(query.get("from"), ParticipantRole.PARTICIPANT_ROLE_CUSTOMER)
        origin = query.get("message")
        in_response_to = ""
        chat_id = ""
        if isinstance(origin, dict) and isinstance(origin.get("chat"), dict):
            chat_id = str(_int(origin["chat"], "id"))
            in_response_to = message_key(chat_id, _int(origin, "message_id"))
        query_id = _str(query, "id")
        if not query_id:
            raise BadRequestError("callback_query without id")
        base.type = "message.received"
        base.occurred_at.CopyFrom(timestamp(received_at))
        base.message.CopyFrom(
            Message(
                direction=Direction.DIRECTION_INBOUND,
                sender=presser,
                recipients=[_bot(account)],
                reply_to=in_response_to,
                provider_message_id=f"callback:{query_id}",
                choice_response=ChoiceResponse(
                    option_id=_str(query, "data"), in_response_to=in_response_to
                ),
            )
        )
        base.attributes["telegram.update_type"] = "callback_query"
        base.attributes["telegram.callback_query_id"] = query_id
        if chat_id:
            base.attributes["telegram.chat_id"] = chat_id
            base.conversation_id = conversation_id(CHANNEL, account, chat_id)
        return base
    return None


def _bot(account: str) -> Participant:
    return Participant(
        channel=CHANNEL, address=account, role=ParticipantRole.PARTICIPANT_ROLE_BUSINESS
    )


def _largest(sizes: Any) -> Mapping[str, Any]:
    if not isinstance(sizes, list) or not sizes:
        raise BadRequestError("photo is not a non-empty list of sizes")
    objects = [_object(s, "photo size") for s in sizes]

    def area(size: Mapping[str, Any]) -> tuple[int, int]:
        width, height = size.get("width", 0), size.get("height", 0)
        pixels = width * height if isinstance(width, int) and isinstance(height, int) else 0
        file_size = size.get("file_size", 0)
        return pixels, file_size if isinstance(file_size, int) else 0

    return max(objects, key=area)


def _message(message: Mapping[str, Any], account: str, event: Event) -> Message:
    chat = _object(message.get("chat"), "chat")
    chat_id = str(_int(chat, "id"))
    message_id = _int(message, "message_id")
    if "from" in message:
        sender = _user(message["from"], ParticipantRole.PARTICIPANT_ROLE_CUSTOMER)
    else:
        # Channel posts are sent on behalf of the chat.
        sender = _user(
            message.get("sender_chat") or chat, ParticipantRole.PARTICIPANT_ROLE_CUSTOMER
        )
    date = message.get("date")
    if isinstance(date, int):
        event.occurred_at.CopyFrom(timestamp(datetime.fromtimestamp(date, UTC)))
    event.conversation_id = conversation_id(CHANNEL, account, chat_id)
    event.attributes["telegram.chat_id"] = chat_id
    event.attributes["telegram.chat_type"] = _str(chat, "type")
    result = Message(
        direction=Direction.DIRECTION_INBOUND,
        sender=sender,
        recipients=[_bot(account)],
        provider_message_id=message_key(chat_id, message_id),
    )
    reply = message.get("reply_to_message")
    if isinstance(reply, dict) and isinstance(reply.get("message_id"), int):
        result.reply_to = message_key(chat_id, reply["message_id"])
    if message.get("media_group_id"):
        event.attributes["telegram.media_group_id"] = _str(message, "media_group_id")
    caption = _str(message, "caption")
    entities = message.get("entities") or message.get("caption_entities")
    if isinstance(entities, list) and entities:
        # Bot commands, mentions, links, formatting: offsets in UTF-16 code units.
        event.attributes["telegram.entities"] = json.dumps(entities, separators=(",", ":"))
    if "text" in message:
        result.text.CopyFrom(Text(body=_str(message, "text"), format=TextFormat.TEXT_FORMAT_PLAIN))
    elif "photo" in message:
        size = _largest(message["photo"])
        result.media.CopyFrom(Media(kind=MediaKind.MEDIA_KIND_IMAGE, caption=caption))
        result.attachments.append(_attachment(size, caption, "image/jpeg"))
    elif "location" in message:
        loc = _object(message["location"], "location")
        try:
            result.location.CopyFrom(
                Location(latitude=float(loc["latitude"]), longitude=float(loc["longitude"]))
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequestError("location without latitude/longitude") from exc
        venue = message.get("venue")
        if isinstance(venue, dict):
            result.location.name = _str(venue, "title")
            result.location.address = _str(venue, "address")
    elif "contact" in message:
        contact = _object(message["contact"], "contact")
        name = " ".join(p for p in (_str(contact, "first_name"), _str(contact, "last_name")) if p)
        result.contact.CopyFrom(
            ContactCard(
                formatted_name=name,
                phones=[_str(contact, "phone_number")] if contact.get("phone_number") else [],
                vcard=_str(contact, "vcard"),
            )
        )
        if contact.get("user_id"):
            event.attributes["telegram.contact_user_id"] = _str(contact, "user_id")
    else:
        for field, kind in _MEDIA:
            if field in message:
                item = _object(message[field], field)
                result.media.CopyFrom(Media(kind=kind, caption=caption))
                result.attachments.append(_attachment(item, caption, ""))
                break
        else:
            # A dice, poll, service message ...: the content is in raw.
            kinds = sorted(k for k in message if k not in _ENVELOPE_FIELDS)
            event.attributes["telegram.unmapped_content"] = ",".join(kinds)
    return result


_ENVELOPE_FIELDS = frozenset(
    {
        "message_id",
        "from",
        "sender_chat",
        "chat",
        "date",
        "edit_date",
        "reply_to_message",
        "message_thread_id",
        "is_topic_message",
        "media_group_id",
        "caption",
        "entities",
        "caption_entities",
        "author_signature",
    }
)


def _attachment(item: Mapping[str, Any], caption: str, default_type: str) -> Attachment:
    file_id = _str(item, "file_id")
    if not file_id:
        raise BadRequestError("media without file_id")
    size = item.get("file_size")
    return Attachment(
        provider_media_id=file_id,
        content_type=_str(item, "mime_type") or default_type,
        filename=_str(item, "file_name"),
        size_bytes=size if isinstance(size, int) else 0,
        caption=caption,
    )
