"""WhatsApp Cloud API webhook payloads -> gateway.api.v1 events: pure functions, no I/O.

Payload shapes: https://developers.facebook.com/docs/whatsapp/cloud-api/webhooks/components
and https://developers.facebook.com/docs/whatsapp/cloud-api/webhooks/payload-examples

One webhook may carry several ``entry[]``, each several ``changes[]``, each
several ``messages[]`` and ``statuses[]``: every item becomes one event.

What the contract has no field for goes to ``attributes`` (``whatsapp.*``):
referral / click-to-WhatsApp ad context, the media ``sha256`` Meta computed,
``voice`` / ``animated`` flags, list-reply descriptions, forwarded flags,
every contact of a multi-contact message (the content carries the first),
pricing and conversation of statuses.

Edits and revokes: Meta documents ``type: "edit"`` (``edit.original_message_id``
and ``edit.message``, the new content in the shape of an ordinary message) and
``type: "revoke"`` (``revoke.original_message_id``) on the ``messages`` field,
but only for WhatsApp Business app numbers onboarded to the Cloud API
("Coexistence"); plain Cloud API numbers never receive them, and Meta has at
times delivered edits as ``unsupported`` instead (published as
``message.unsupported`` here). They map to ``message.edited`` (``Edit``) and
``message.deleted`` (``Delete``), keyed by the original message id; neither
opens the customer-service window (only a new customer message does).
https://developers.facebook.com/documentation/business-messaging/whatsapp/webhooks/reference/messages/edit
https://developers.facebook.com/documentation/business-messaging/whatsapp/webhooks/reference/messages/revoke
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from connectors.social.meta.envelope import items, raw_item, required, text, unix_time
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
from gateway.api.v1.delivery_pb2 import DeliveryState, DeliveryStatus
from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.message_pb2 import Delete, Direction, Edit, Message, Reaction
from gateway.api.v1.participant_pb2 import Participant, ParticipantRole
from gateway.contract import BadRequestError, inbound_event_id
from gateway.contract.ids import conversation_id
from gateway.contract.times import timestamp

CHANNEL = "whatsapp"
PROVIDER = "meta"
OBJECT = "whatsapp_business_account"

S = DeliveryState

#: Status ``status`` -> canonical state.
STATUS_MAP: Mapping[str, DeliveryState.ValueType] = {
    "sent": S.DELIVERY_STATE_SENT,
    "delivered": S.DELIVERY_STATE_DELIVERED,
    "read": S.DELIVERY_STATE_READ,
    "failed": S.DELIVERY_STATE_FAILED,
}

#: Failure codes a later send may get past (throttling, temporary outages).
TRANSIENT_FAILURE_CODES = frozenset({"130429", "131000", "131016", "131048", "131056"})

MEDIA_KINDS: Mapping[str, MediaKind.ValueType] = {
    "image": MediaKind.MEDIA_KIND_IMAGE,
    "audio": MediaKind.MEDIA_KIND_AUDIO,
    "video": MediaKind.MEDIA_KIND_VIDEO,
    "document": MediaKind.MEDIA_KIND_DOCUMENT,
    "sticker": MediaKind.MEDIA_KIND_STICKER,
}

#: Message ``type``s that carry nothing the contract can hold: published as
#: ``message.unsupported`` with the provider's error details in attributes.
UNSUPPORTED_TYPES = frozenset({"unsupported", "unknown", "system", "order", "request_welcome"})

EVENT_TYPES = (
    "message.received",
    "message.status",
    "message.reaction",
    "message.edited",
    "message.deleted",
    "message.unsupported",
)
#: Message ``type``s that change an earlier message rather than send a new one.
AMENDMENT_TYPES = frozenset({"edit", "revoke"})
INBOUND_CONTENT = ("text", "media", "location", "contact", "choice_response")


@dataclass(kw_only=True)
class Batch:
    """What one webhook maps to."""

    events: list[Event] = field(default_factory=list)
    #: ``(account, customer address, when)`` of every inbound message: opens the
    #: 24-hour customer-service window.
    customer_messages: list[tuple[str, str, datetime]] = field(default_factory=list)
    #: Items left out, with the reason (logged by the connector).
    skipped: list[str] = field(default_factory=list)


def wa_address(wa_id: str) -> str:
    """A WhatsApp id (international digits) as E.164."""
    digits = wa_id.removeprefix("+")
    if not digits.isascii() or not digits.isdigit() or not 6 <= len(digits) <= 15:
        raise BadRequestError(f"malformed WhatsApp id {wa_id!r}", code="invalid_phone")
    return "+" + digits


def _participant(address: str, role: ParticipantRole.ValueType, name: str = "") -> Participant:
    return Participant(channel=CHANNEL, address=address, role=role, display_name=name)


def map_webhook(
    entries: list[Mapping[str, Any]],
    *,
    account_of: Callable[[str], str],
    received_at: datetime,
) -> Batch:
    """Every message and status of every change of every entry.

    ``account_of`` maps a ``phone_number_id`` to our account key.
    """
    batch = Batch()
    for entry in entries:
        for change in items(entry, "changes"):
            field_name = text(change, "field")
            value = change.get("value")
            if field_name != "messages":
                batch.skipped.append(f"change field {field_name!r} is not a messaging event")
                continue
            if not isinstance(value, dict):
                raise BadRequestError("change value is not an object")
            _map_change(value, account_of=account_of, received_at=received_at, batch=batch)
    return batch


def _map_change(
    value: Mapping[str, Any],
    *,
    account_of: Callable[[str], str],
    received_at: datetime,
    batch: Batch,
) -> None:
    metadata = value.get("metadata")
    if not isinstance(metadata, dict):
        raise BadRequestError("change value without metadata")
    phone_number_id = required(metadata, "phone_number_id")
    account = account_of(phone_number_id)
    business = wa_address(required(metadata, "display_phone_number"))
    names = {
        text(c, "wa_id"): text(c["profile"], "name") if isinstance(c.get("profile"), dict) else ""
        for c in items(value, "contacts")
    }
    for message in items(value, "messages"):
        event = inbound_message(
            message,
            account=account,
            business=business,
            names=names,
            received_at=received_at,
        )
        event.attributes["whatsapp.phone_number_id"] = phone_number_id
        batch.events.append(event)
        if text(message, "type") not in AMENDMENT_TYPES | {"system"}:
            customer = wa_address(required(message, "from"))
            batch.customer_messages.append(
                (account, customer, unix_time(message.get("timestamp")) or received_at)
            )
    for status in items(value, "statuses"):
        status_ev = status_event(status, account=account, received_at=received_at)
        if status_ev is None:
            batch.skipped.append(f"status {text(status, 'status')!r} has no canonical state")
            continue
        status_ev.attributes["whatsapp.phone_number_id"] = phone_number_id
        batch.events.append(status_ev)
    for error in items(value, "errors"):
        # Errors about the webhook subscription itself, not about one message.
        batch.events.append(_change_error(error, account=account, received_at=received_at))


def _base_event(
    *,
    event_id: str,
    type_: str,
    account: str,
    occurred_at: datetime | None,
    received_at: datetime,
    item: Mapping[str, Any],
) -> Event:
    return Event(
        id=event_id,
        type=type_,
        channel=CHANNEL,
        provider=PROVIDER,
        account=account,
        occurred_at=timestamp(occurred_at or received_at),
        received_at=timestamp(received_at),
        raw=raw_item(item),
    )


def _error_attributes(errors: Any, event: Event) -> None:
    if not isinstance(errors, list) or not errors or not isinstance(errors[0], dict):
        return
    first = errors[0]
    event.attributes["whatsapp.error_code"] = text(first, "code")
    event.attributes["whatsapp.error_title"] = text(first, "title")[:300]
    details = first.get("error_data")
    if isinstance(details, dict) and details.get("details"):
        event.attributes["whatsapp.error_details"] = str(details["details"])[:500]


def inbound_message(
    message: Mapping[str, Any],
    *,
    account: str,
    business: str,
    names: Mapping[str, str],
    received_at: datetime,
) -> Event:
    """One ``messages[]`` item as an event (message, reaction or unsupported)."""
    wamid = required(message, "id")
    wa_id = required(message, "from")
    customer = wa_address(wa_id)
    kind = required(message, "type")
    occurred_at = unix_time(message.get("timestamp"))
    sender = _participant(customer, ParticipantRole.PARTICIPANT_ROLE_CUSTOMER, names.get(wa_id, ""))
    conversation = conversation_id(CHANNEL, business, customer)

    if kind == "reaction":
        reaction = message.get("reaction")
        if not isinstance(reaction, dict):
            raise BadRequestError("reaction message without reaction")
        event = _base_event(
            event_id=inbound_event_id(PROVIDER, account, "whatsapp.reaction", wamid),
            type_="message.reaction",
            account=account,
            occurred_at=occurred_at,
            received_at=received_at,
            item=message,
        )
        # No emoji means the customer removed their reaction.
        event.reaction.CopyFrom(
            Reaction(
                provider_message_id=required(reaction, "message_id"),
                emoji=text(reaction, "emoji"),
                sender=sender,
            )
        )
        event.conversation_id = conversation
        return event

    if kind == "revoke":
        revoke = message.get("revoke")
        if not isinstance(revoke, dict):
            raise BadRequestError("revoke message without revoke")
        event = _base_event(
            event_id=inbound_event_id(PROVIDER, account, "whatsapp.revoke", wamid),
            type_="message.deleted",
            account=account,
            occurred_at=occurred_at,
            received_at=received_at,
            item=message,
        )
        event.delete.CopyFrom(
            Delete(provider_message_id=required(revoke, "original_message_id"), sender=sender)
        )
        event.conversation_id = conversation
        event.attributes["whatsapp.message_id"] = wamid
        return event

    if kind == "edit":
        return _edit_event(
            message,
            account=account,
            business=business,
            names=names,
            received_at=received_at,
        )

    if kind in UNSUPPORTED_TYPES or (kind not in MEDIA_KINDS and kind not in _CONTENT_TYPES):
        event = _base_event(
            event_id=inbound_event_id(PROVIDER, account, "whatsapp.message", wamid),
            type_="message.unsupported",
            account=account,
            occurred_at=occurred_at,
            received_at=received_at,
            item=message,
        )
        event.conversation_id = conversation
        event.attributes["whatsapp.type"] = kind
        event.attributes["whatsapp.from"] = customer
        event.attributes["whatsapp.message_id"] = wamid
        _error_attributes(message.get("errors"), event)
        system = message.get("system")
        if isinstance(system, dict):
            event.attributes["whatsapp.system_type"] = text(system, "type")
            event.attributes["whatsapp.system_body"] = text(system, "body")[:500]
            if system.get("wa_id"):
                event.attributes["whatsapp.system_new_wa_id"] = text(system, "wa_id")
        return event

    result = Message(
        direction=Direction.DIRECTION_INBOUND,
        sender=sender,
        recipients=[_participant(business, ParticipantRole.PARTICIPANT_ROLE_BUSINESS)],
        provider_message_id=wamid,
    )
    event = _base_event(
        event_id=inbound_event_id(PROVIDER, account, "whatsapp.message", wamid),
        type_="message.received",
        account=account,
        occurred_at=occurred_at,
        received_at=received_at,
        item=message,
    )
    event.conversation_id = conversation
    context = message.get("context")
    if isinstance(context, dict):
        result.reply_to = text(context, "id")
        if context.get("forwarded") or context.get("frequently_forwarded"):
            event.attributes["whatsapp.forwarded"] = (
                "frequently" if context.get("frequently_forwarded") else "true"
            )
        product = context.get("referred_product")
        if isinstance(product, dict):
            event.attributes["whatsapp.referred_product_catalog_id"] = text(product, "catalog_id")
            event.attributes["whatsapp.referred_product_id"] = text(product, "product_retailer_id")
    referral = message.get("referral")
    if isinstance(referral, dict):
        for key, value in referral.items():
            if isinstance(value, str | int) and not isinstance(value, bool):
                event.attributes[f"whatsapp.referral.{key}"] = str(value)[:500]
    body = message.get(kind)
    if not isinstance(body, dict) and kind != "contacts":
        raise BadRequestError(f"{kind} message without its {kind} object")

    if kind == "text":
        assert isinstance(body, dict)
        result.text.CopyFrom(Text(body=text(body, "body"), format=TextFormat.TEXT_FORMAT_PLAIN))
    elif kind in MEDIA_KINDS:
        assert isinstance(body, dict)
        media_kind = MEDIA_KINDS[kind]
        if kind == "audio" and body.get("voice") is True:
            media_kind = MediaKind.MEDIA_KIND_VOICE
        caption = text(body, "caption")
        result.media.CopyFrom(Media(kind=media_kind, caption=caption))
        result.attachments.append(
            Attachment(
                provider_media_id=required(body, "id"),
                content_type=text(body, "mime_type"),
                filename=text(body, "filename"),
                caption=caption,
            )
        )
        if body.get("sha256"):
            event.attributes["whatsapp.media_sha256"] = text(body, "sha256")
        if "animated" in body:
            event.attributes["whatsapp.animated"] = "true" if body["animated"] else "false"
    elif kind == "location":
        assert isinstance(body, dict)
        try:
            latitude, longitude = float(body["latitude"]), float(body["longitude"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequestError("location without numeric latitude/longitude") from exc
        result.location.CopyFrom(
            Location(
                latitude=latitude,
                longitude=longitude,
                name=text(body, "name"),
                address=text(body, "address"),
            )
        )
        if body.get("url"):
            event.attributes["whatsapp.location_url"] = text(body, "url")
    elif kind == "contacts":
        cards = [contact_card(c) for c in items(message, "contacts")]
        if not cards:
            raise BadRequestError("contacts message without contacts")
        result.contact.CopyFrom(cards[0])
        event.attributes["whatsapp.contacts_count"] = str(len(cards))
        if len(cards) > 1:
            # The content holds one card; every card is kept here.
            event.attributes["whatsapp.contacts"] = json.dumps(
                message["contacts"], ensure_ascii=False
            )
    elif kind == "interactive":
        assert isinstance(body, dict)
        reply_kind = text(body, "type")
        reply = body.get(reply_kind)
        if reply_kind not in ("button_reply", "list_reply") or not isinstance(reply, dict):
            raise BadRequestError(f"unknown interactive reply {reply_kind!r}")
        result.choice_response.CopyFrom(
            ChoiceResponse(
                option_id=required(reply, "id"),
                title=text(reply, "title"),
                in_response_to=result.reply_to,
            )
        )
        event.attributes["whatsapp.interactive_type"] = reply_kind
        if reply.get("description"):
            event.attributes["whatsapp.option_description"] = text(reply, "description")
    elif kind == "button":
        # A quick-reply button of a template message.
        assert isinstance(body, dict)
        result.choice_response.CopyFrom(
            ChoiceResponse(
                option_id=text(body, "payload") or text(body, "text"),
                title=text(body, "text"),
                in_response_to=result.reply_to,
            )
        )
        event.attributes["whatsapp.interactive_type"] = "template_button"
    event.message.CopyFrom(result)
    return event


_CONTENT_TYPES = frozenset({"text", "location", "contacts", "interactive", "button"})


def _edit_event(
    message: Mapping[str, Any],
    *,
    account: str,
    business: str,
    names: Mapping[str, str],
    received_at: datetime,
) -> Event:
    """A ``type: "edit"`` item: the new content of ``edit.original_message_id``."""
    wamid = required(message, "id")
    edit = message.get("edit")
    if not isinstance(edit, dict):
        raise BadRequestError("edit message without edit")
    original = required(edit, "original_message_id")
    inner = edit.get("message")
    if not isinstance(inner, dict):
        raise BadRequestError("edit without the edited message")
    if text(inner, "type") in AMENDMENT_TYPES | {"reaction"}:
        raise BadRequestError(f"an edit cannot carry a {text(inner, 'type')!r} message")
    # The new content has the shape of an ordinary message without its own
    # id/from/timestamp: map it as the original message, sent by the same customer.
    content = inbound_message(
        {**inner, "id": original, "from": required(message, "from"), "timestamp": ""},
        account=account,
        business=business,
        names=names,
        received_at=received_at,
    )
    event = _base_event(
        event_id=inbound_event_id(PROVIDER, account, "whatsapp.edit", wamid),
        type_="message.edited",
        account=account,
        occurred_at=unix_time(message.get("timestamp")),
        received_at=received_at,
        item=message,
    )
    event.conversation_id = content.conversation_id
    event.attributes["whatsapp.message_id"] = wamid
    if content.WhichOneof("payload") != "message":
        # Content the contract cannot hold: the edit is reported, its content is not.
        event.type = "message.unsupported"
        event.attributes["whatsapp.type"] = "edit"
        event.attributes["whatsapp.edited_type"] = text(inner, "type")
        event.attributes["whatsapp.original_message_id"] = original
        return event
    for key, value in content.attributes.items():
        event.attributes[key] = value
    event.edit.CopyFrom(Edit(provider_message_id=original, message=content.message))
    return event


def contact_card(contact: Mapping[str, Any]) -> ContactCard:
    """A ``contacts[]`` item as a contact card."""
    name = contact.get("name")
    org = contact.get("org")
    return ContactCard(
        formatted_name=text(name, "formatted_name") if isinstance(name, dict) else "",
        phones=[text(p, "phone") or text(p, "wa_id") for p in items(contact, "phones")],
        emails=[text(e, "email") for e in items(contact, "emails")],
        organization=text(org, "company") if isinstance(org, dict) else "",
    )


def status_event(status: Mapping[str, Any], *, account: str, received_at: datetime) -> Event | None:
    """One ``statuses[]`` item as a ``message.status`` event (None: no canonical state)."""
    wamid = required(status, "id")
    provider_status = required(status, "status").lower()
    state = STATUS_MAP.get(provider_status)
    if state is None:
        return None
    code, reason = "", ""
    errors = status.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        code = text(errors[0], "code")
        reason = text(errors[0], "title") or text(errors[0], "message")
        details = errors[0].get("error_data")
        if isinstance(details, dict) and details.get("details"):
            reason = f"{reason}: {details['details']}" if reason else str(details["details"])
    recipient = text(status, "recipient_id")
    gateway_id = text(status, "biz_opaque_callback_data")
    event = _base_event(
        event_id=inbound_event_id(
            PROVIDER, account, "whatsapp.status", wamid, provider_status, code or "-"
        ),
        type_="message.status",
        account=account,
        occurred_at=unix_time(status.get("timestamp")),
        received_at=received_at,
        item=status,
    )
    event.causation_id = gateway_id
    event.status.CopyFrom(
        DeliveryStatus(
            state=state,
            provider_status=provider_status,
            reason_code=code,
            reason=reason[:500],
            permanent=state == S.DELIVERY_STATE_FAILED and code not in TRANSIENT_FAILURE_CODES,
            provider_message_id=wamid,
            message_id=gateway_id,
            attempt=1,
            recipient=wa_address(recipient) if recipient else "",
        )
    )
    conversation = status.get("conversation")
    if isinstance(conversation, dict):
        event.attributes["whatsapp.conversation_id"] = text(conversation, "id")
        origin = conversation.get("origin")
        if isinstance(origin, dict):
            event.attributes["whatsapp.conversation_origin"] = text(origin, "type")
    pricing = status.get("pricing")
    if isinstance(pricing, dict):
        for key in ("category", "pricing_model", "billable", "type"):
            if key in pricing:
                event.attributes[f"whatsapp.pricing_{key}"] = str(pricing[key]).lower()
    return event


def _change_error(error: Mapping[str, Any], *, account: str, received_at: datetime) -> Event:
    digest = json.dumps(error, sort_keys=True)
    event = _base_event(
        event_id=inbound_event_id(PROVIDER, account, "whatsapp.error", digest),
        type_="message.unsupported",
        account=account,
        occurred_at=None,
        received_at=received_at,
        item=error,
    )
    event.attributes["whatsapp.type"] = "error"
    _error_attributes([error], event)
    return event
