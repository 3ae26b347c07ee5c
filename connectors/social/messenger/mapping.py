"""Messenger and Instagram messaging webhooks -> gateway.api.v1 events: pure functions.

Both use the Messenger Platform envelope: ``{"object": "page" | "instagram",
"entry": [{"id": <page or IG account id>, "time", "messaging": [...]}]}``;
every ``entry[] x messaging[]`` item becomes one event.
https://developers.facebook.com/docs/messenger-platform/webhooks
https://developers.facebook.com/docs/messenger-platform/instagram/features/webhook

Item kinds: ``message`` (text, attachments, quick replies, replies, Instagram
story replies and mentions, Instagram deletes), ``postback``, ``reaction``,
``read``, ``delivery`` (Messenger only: Instagram does not report delivery),
``message_edit`` and ``referral``. Echoes of our own sends (``is_echo``) are
not customer messages and are skipped.

Messenger ``read`` names a watermark (everything before it was read), not a
message: it becomes a ``message.read`` event. Instagram ``read`` names the
message (``mid``): it becomes a READ status of that message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from connectors.social.meta.envelope import items, raw_item, required, text, unix_time
from gateway.api.v1.content_pb2 import (
    Attachment,
    ChoiceResponse,
    Location,
    Media,
    MediaKind,
    Text,
    TextFormat,
)
from gateway.api.v1.delivery_pb2 import DeliveryState, DeliveryStatus
from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.message_pb2 import Delete, Direction, Edit, Message, Reaction, Read
from gateway.api.v1.participant_pb2 import Participant, ParticipantRole
from gateway.contract import BadRequestError, inbound_event_id
from gateway.contract.ids import conversation_id
from gateway.contract.times import timestamp

PROVIDER = "meta"
OBJECTS = {"messenger": "page", "instagram": "instagram"}

S = DeliveryState

MEDIA_KINDS: Mapping[str, MediaKind.ValueType] = {
    "image": MediaKind.MEDIA_KIND_IMAGE,
    "video": MediaKind.MEDIA_KIND_VIDEO,
    "audio": MediaKind.MEDIA_KIND_AUDIO,
    "file": MediaKind.MEDIA_KIND_DOCUMENT,
    "sticker": MediaKind.MEDIA_KIND_STICKER,
    # Instagram: a story that mentions us, and shared reels.
    "story_mention": MediaKind.MEDIA_KIND_IMAGE,
    "ig_reel": MediaKind.MEDIA_KIND_VIDEO,
    "reel": MediaKind.MEDIA_KIND_VIDEO,
}

EVENT_TYPES = (
    "message.received",
    "message.status",
    "message.reaction",
    "message.read",
    "message.edited",
    "message.deleted",
    "message.unsupported",
    "conversation.referral",
)
INBOUND_CONTENT = ("text", "media", "location", "choice_response")


@dataclass(kw_only=True)
class Batch:
    """What one webhook maps to."""

    events: list[Event] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def map_webhook(
    entries: list[Mapping[str, Any]],
    *,
    channel: str,
    account_of: Callable[[str], str],
    received_at: datetime,
) -> Batch:
    """Every messaging item of every entry."""
    batch = Batch()
    for entry in entries:
        account = account_of(required(entry, "id"))
        for item in items(entry, "messaging"):
            event = map_item(item, channel=channel, account=account, received_at=received_at)
            if isinstance(event, str):
                batch.skipped.append(event)
            else:
                batch.events.extend(event)
        for _ in items(entry, "standby"):
            # Handover protocol: another app owns the thread right now.
            batch.skipped.append("standby item (thread owned by another app)")
    return batch


def _event(
    channel: str,
    account: str,
    kind: str,
    ids: tuple[str, ...],
    type_: str,
    item: Mapping[str, Any],
    received_at: datetime,
) -> Event:
    occurred = unix_time(item.get("timestamp"), millis=True) or received_at
    return Event(
        id=inbound_event_id(PROVIDER, account, f"{channel}.{kind}", *ids),
        type=type_,
        channel=channel,
        provider=PROVIDER,
        account=account,
        occurred_at=timestamp(occurred),
        received_at=timestamp(received_at),
        raw=raw_item(item),
    )


def _id_of(item: Mapping[str, Any], side: str) -> str:
    who = item.get(side)
    if not isinstance(who, dict):
        raise BadRequestError(f"messaging item without {side}")
    return required(who, "id")


def map_item(
    item: Mapping[str, Any], *, channel: str, account: str, received_at: datetime
) -> list[Event] | str:
    """One messaging item as events, or the reason it is skipped."""
    sender_id = _id_of(item, "sender")
    business_id = _id_of(item, "recipient")
    customer = Participant(
        channel=channel, address=sender_id, role=ParticipantRole.PARTICIPANT_ROLE_CUSTOMER
    )
    conversation = conversation_id(channel, business_id, sender_id)
    stamp = text(item, "timestamp") or "-"

    def new(kind: str, ids: tuple[str, ...], type_: str) -> Event:
        event = _event(channel, account, kind, ids, type_, item, received_at)
        event.conversation_id = conversation
        return event

    message = item.get("message")
    if isinstance(message, dict):
        if message.get("is_echo"):
            return "echo of a message we sent"
        mid = required(message, "mid")
        if message.get("is_deleted"):
            event = new("delete", (mid,), "message.deleted")
            event.delete.CopyFrom(Delete(provider_message_id=mid, sender=customer))
            return [event]
        return [_message(message, mid, customer, business_id, new)]
    postback = item.get("postback")
    if isinstance(postback, dict):
        payload = text(postback, "payload")
        mid = text(postback, "mid")
        event = new(
            "postback", (mid,) if mid else (sender_id, stamp, payload or "-"), "message.received"
        )
        event.message.CopyFrom(
            Message(
                direction=Direction.DIRECTION_INBOUND,
                sender=customer,
                recipients=[_business(channel, business_id)],
                provider_message_id=mid,
                choice_response=ChoiceResponse(option_id=payload, title=text(postback, "title")),
            )
        )
        event.attributes[f"{channel}.interactive_type"] = "postback"
        _referral(postback.get("referral"), event, channel)
        return [event]
    reaction = item.get("reaction")
    if isinstance(reaction, dict):
        mid = required(reaction, "mid")
        action = text(reaction, "action", "react")
        event = new("reaction", (mid, sender_id, action, stamp), "message.reaction")
        emoji = text(reaction, "emoji") or text(reaction, "reaction")
        event.reaction.CopyFrom(
            Reaction(
                provider_message_id=mid, emoji="" if action == "unreact" else emoji, sender=customer
            )
        )
        if reaction.get("reaction"):
            event.attributes[f"{channel}.reaction"] = text(reaction, "reaction")
        return [event]
    read = item.get("read")
    if isinstance(read, dict):
        mid = text(read, "mid")
        if mid:
            # Instagram: the message that was read.
            event = new("status", (mid, "read"), "message.status")
            event.status.CopyFrom(
                DeliveryStatus(
                    state=S.DELIVERY_STATE_READ,
                    provider_status="read",
                    provider_message_id=mid,
                    attempt=1,
                    recipient=sender_id,
                )
            )
            return [event]
        watermark = required(read, "watermark")
        event = new("read", (sender_id, watermark), "message.read")
        event.read.CopyFrom(Read(reader=customer))
        event.attributes[f"{channel}.watermark"] = watermark
        return [event]
    delivery = item.get("delivery")
    if isinstance(delivery, dict):
        mids = delivery.get("mids") or []
        if not isinstance(mids, list) or not all(isinstance(m, str) and m for m in mids):
            raise BadRequestError("delivery.mids is not a list of ids")
        events = []
        for mid in mids:
            event = new("status", (mid, "delivered"), "message.status")
            event.status.CopyFrom(
                DeliveryStatus(
                    state=S.DELIVERY_STATE_DELIVERED,
                    provider_status="delivered",
                    provider_message_id=mid,
                    attempt=1,
                    recipient=sender_id,
                )
            )
            events.append(event)
        if not events:
            return "delivery without mids (watermark only)"
        return events
    edit = item.get("message_edit")
    if isinstance(edit, dict):
        mid = required(edit, "mid")
        count = text(edit, "num_edit", "1")
        event = new("edit", (mid, count), "message.edited")
        event.edit.CopyFrom(
            Edit(
                provider_message_id=mid,
                message=Message(
                    direction=Direction.DIRECTION_INBOUND,
                    sender=customer,
                    provider_message_id=mid,
                    text=Text(body=text(edit, "text"), format=TextFormat.TEXT_FORMAT_PLAIN),
                ),
            )
        )
        event.attributes[f"{channel}.num_edit"] = count
        return [event]
    referral = item.get("referral")
    if isinstance(referral, dict):
        event = new(
            "referral", (sender_id, stamp, text(referral, "ref") or "-"), "conversation.referral"
        )
        _referral(referral, event, channel)
        event.attributes[f"{channel}.sender_id"] = sender_id
        return [event]
    return f"unknown messaging item ({', '.join(sorted(k for k in item if k not in _COMMON))})"


_COMMON = frozenset({"sender", "recipient", "timestamp"})


def _business(channel: str, business_id: str) -> Participant:
    return Participant(
        channel=channel, address=business_id, role=ParticipantRole.PARTICIPANT_ROLE_BUSINESS
    )


def _referral(referral: Any, event: Event, channel: str) -> None:
    if isinstance(referral, dict):
        for key, value in referral.items():
            if isinstance(value, str | int) and not isinstance(value, bool):
                event.attributes[f"{channel}.referral.{key}"] = str(value)[:500]


def _message(
    message: Mapping[str, Any],
    mid: str,
    customer: Participant,
    business_id: str,
    new: Callable[[str, tuple[str, ...], str], Event],
) -> Event:
    channel = customer.channel
    body = text(message, "text")
    result = Message(
        direction=Direction.DIRECTION_INBOUND,
        sender=customer,
        recipients=[_business(channel, business_id)],
        provider_message_id=mid,
    )
    if message.get("is_unsupported"):
        event = new("message", (mid,), "message.unsupported")
        event.attributes[f"{channel}.message_id"] = mid
        event.attributes[f"{channel}.sender_id"] = customer.address
        return event
    event = new("message", (mid,), "message.received")
    reply_to = message.get("reply_to")
    if isinstance(reply_to, dict):
        result.reply_to = text(reply_to, "mid")
        story = reply_to.get("story")
        if isinstance(story, dict):
            # An Instagram story reply: the story is the context, not content.
            event.attributes["instagram.story_reply.id"] = text(story, "id")
            event.attributes["instagram.story_reply.url"] = text(story, "url")
    _referral(message.get("referral"), event, channel)
    media: list[tuple[MediaKind.ValueType, Attachment]] = []
    location: Location | None = None
    for attachment in items(message, "attachments"):
        kind = text(attachment, "type")
        payload = attachment.get("payload")
        payload = payload if isinstance(payload, dict) else {}
        if kind in MEDIA_KINDS:
            media.append(
                (
                    MEDIA_KINDS[kind],
                    Attachment(
                        url=text(payload, "url"),
                        provider_media_id=text(payload, "attachment_id")
                        or text(payload, "sticker_id")
                        or text(payload, "reel_video_id"),
                    ),
                )
            )
            if kind == "story_mention":
                event.attributes["instagram.story_mention"] = "true"
        elif kind == "location" and isinstance(payload.get("coordinates"), dict):
            coordinates = payload["coordinates"]
            try:
                location = Location(
                    latitude=float(coordinates["lat"]),
                    longitude=float(coordinates["long"]),
                    name=text(attachment, "title"),
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise BadRequestError("location attachment without coordinates") from exc
        else:
            # share, fallback, template, ig_post ...: kept as a link.
            event.attributes[f"{channel}.attachment.{kind or 'unknown'}"] = text(payload, "url")
    quick_reply = message.get("quick_reply")
    if isinstance(quick_reply, dict):
        result.choice_response.CopyFrom(
            ChoiceResponse(option_id=text(quick_reply, "payload"), title=body)
        )
        event.attributes[f"{channel}.interactive_type"] = "quick_reply"
    elif media:
        result.media.CopyFrom(Media(kind=media[0][0], caption=body))
    elif location is not None:
        result.location.CopyFrom(location)
    elif body:
        result.text.CopyFrom(Text(body=body, format=TextFormat.TEXT_FORMAT_PLAIN))
    else:
        event.type = "message.unsupported"
        event.attributes[f"{channel}.message_id"] = mid
        event.attributes[f"{channel}.sender_id"] = customer.address
        return event
    # Every media item of the message, never only the first.
    result.attachments.extend(a for _, a in media)
    event.message.CopyFrom(result)
    return event
