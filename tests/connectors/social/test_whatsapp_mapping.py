"""WhatsApp webhook items of every documented type -> gateway.api.v1 events."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from connectors.social.meta.envelope import envelope
from connectors.social.whatsapp import mapping
from gateway.api.v1.content_pb2 import MediaKind
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.envelope_pb2 import Event
from gateway.contract import BadRequestError
from tests.connectors.social import whatsapp_payloads as wa
from tests.connectors.social.test_meta_signature import request

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
S = DeliveryState


def map_one(message: dict[str, Any]) -> Event:
    batch = mapping.map_webhook(
        envelope(request(wa.body(wa.webhook(wa.change([message])))), mapping.OBJECT),
        account_of=lambda pid: "main",
        received_at=NOW,
    )
    (event,) = batch.events
    return event


def test_text_message() -> None:
    item = wa.text_message("caf\u00e9 \U0001f600")
    event = map_one(item)
    assert event.type == "message.received"
    assert (event.channel, event.provider, event.account) == ("whatsapp", "meta", "main")
    assert event.message.text.body == "caf\u00e9 \U0001f600"
    assert event.message.provider_message_id == item["id"]
    assert event.message.sender.address == "+" + wa.CUSTOMER
    assert event.message.sender.display_name == wa.CUSTOMER_NAME
    assert event.message.recipients[0].address == "+" + wa.DISPLAY_PHONE
    assert event.occurred_at.seconds == int(item["timestamp"])
    assert event.attributes["whatsapp.phone_number_id"] == wa.PHONE_NUMBER_ID
    assert event.conversation_id
    # Deterministic id: the same item maps to the same event id.
    assert map_one(item).id == event.id


@pytest.mark.parametrize(
    ("kind", "body", "expected_kind"),
    [
        (
            "image",
            {"caption": "the red one", "mime_type": "image/jpeg", "sha256": "abc=", "id": "1001"},
            MediaKind.MEDIA_KIND_IMAGE,
        ),
        (
            "audio",
            {"mime_type": "audio/ogg; codecs=opus", "id": "1002", "voice": True},
            MediaKind.MEDIA_KIND_VOICE,
        ),
        (
            "audio",
            {"mime_type": "audio/mpeg", "id": "1003", "voice": False},
            MediaKind.MEDIA_KIND_AUDIO,
        ),
        (
            "video",
            {"mime_type": "video/mp4", "id": "1004", "caption": "clip"},
            MediaKind.MEDIA_KIND_VIDEO,
        ),
        (
            "document",
            {"filename": "invoice.pdf", "mime_type": "application/pdf", "id": "1005"},
            MediaKind.MEDIA_KIND_DOCUMENT,
        ),
        (
            "sticker",
            {"mime_type": "image/webp", "id": "1006", "animated": False},
            MediaKind.MEDIA_KIND_STICKER,
        ),
    ],
)
def test_media_messages_carry_the_media_id(
    kind: str, body: dict[str, Any], expected_kind: MediaKind.ValueType
) -> None:
    event = map_one(wa.message(kind, body))
    assert event.message.WhichOneof("content") == "media"
    assert event.message.media.kind == expected_kind
    (attachment,) = event.message.attachments
    assert attachment.provider_media_id == body["id"]
    assert attachment.content_type == body["mime_type"]
    assert attachment.filename == body.get("filename", "")
    assert event.message.media.caption == body.get("caption", "")


def test_location() -> None:
    event = map_one(
        wa.message(
            "location",
            {
                "latitude": 37.483,
                "longitude": -122.148,
                "name": "HQ",
                "address": "1 Hacker Way",
                "url": "https://example.com",
            },
        )
    )
    loc = event.message.location
    assert (loc.latitude, loc.longitude, loc.name, loc.address) == (
        37.483,
        -122.148,
        "HQ",
        "1 Hacker Way",
    )
    assert event.attributes["whatsapp.location_url"] == "https://example.com"


def test_contacts_keep_every_contact() -> None:
    contacts = [
        {
            "name": {"formatted_name": "Barbara Johnson", "first_name": "Barbara"},
            "phones": [{"phone": "+1 (940) 555-1234", "type": "HOME", "wa_id": "19405551234"}],
            "emails": [{"email": "bjohnson@example.com", "type": "WORK"}],
            "org": {"company": "Social Media Inc"},
        },
        {"name": {"formatted_name": "Bob"}, "phones": [{"phone": "+1 650 555 0100"}]},
    ]
    event = map_one(wa.message("contacts", None, contacts=contacts))
    card = event.message.contact
    assert card.formatted_name == "Barbara Johnson"
    assert list(card.phones) == ["+1 (940) 555-1234"]
    assert list(card.emails) == ["bjohnson@example.com"]
    assert card.organization == "Social Media Inc"
    assert event.attributes["whatsapp.contacts_count"] == "2"
    assert "Bob" in event.attributes["whatsapp.contacts"]


def test_interactive_button_and_list_replies() -> None:
    context = {"from": wa.DISPLAY_PHONE, "id": "wamid.ORIGINAL"}
    button = map_one(
        wa.message(
            "interactive",
            {"type": "button_reply", "button_reply": {"id": "yes-1", "title": "Yes"}},
            context=context,
        )
    )
    assert button.message.choice_response.option_id == "yes-1"
    assert button.message.choice_response.title == "Yes"
    assert button.message.choice_response.in_response_to == "wamid.ORIGINAL"
    assert button.message.reply_to == "wamid.ORIGINAL"
    listed = map_one(
        wa.message(
            "interactive",
            {
                "type": "list_reply",
                "list_reply": {"id": "row-2", "title": "Blue", "description": "Navy blue"},
            },
            context=context,
        )
    )
    assert listed.message.choice_response.option_id == "row-2"
    assert listed.attributes["whatsapp.option_description"] == "Navy blue"
    assert listed.attributes["whatsapp.interactive_type"] == "list_reply"


def test_template_quick_reply_button() -> None:
    event = map_one(
        wa.message(
            "button",
            {"payload": "STOP_PROMOS", "text": "Stop promotions"},
            context={"from": wa.DISPLAY_PHONE, "id": "wamid.TEMPLATE"},
        )
    )
    assert event.message.choice_response.option_id == "STOP_PROMOS"
    assert event.message.choice_response.title == "Stop promotions"
    assert event.message.choice_response.in_response_to == "wamid.TEMPLATE"


def test_reaction_and_its_removal() -> None:
    event = map_one(wa.message("reaction", {"message_id": "wamid.TARGET", "emoji": "\U0001f44d"}))
    assert event.type == "message.reaction"
    assert event.reaction.provider_message_id == "wamid.TARGET"
    assert event.reaction.emoji == "\U0001f44d"
    assert event.reaction.sender.address == "+" + wa.CUSTOMER
    removed = map_one(wa.message("reaction", {"message_id": "wamid.TARGET"}))
    assert removed.reaction.emoji == ""
    assert removed.id != event.id


def test_referral_from_a_click_to_whatsapp_ad() -> None:
    event = map_one(
        wa.text_message(
            "I saw your ad",
            referral={
                "source_url": "https://fb.me/ad",
                "source_id": "120208",
                "source_type": "ad",
                "headline": "Winter sale",
                "media_type": "image",
                "ctwa_clid": "ARAkLkA8rmlFeiCktEJQ",
            },
        )
    )
    assert event.attributes["whatsapp.referral.source_type"] == "ad"
    assert event.attributes["whatsapp.referral.ctwa_clid"] == "ARAkLkA8rmlFeiCktEJQ"
    assert event.message.text.body == "I saw your ad"


def test_unsupported_message_with_errors() -> None:
    event = map_one(
        wa.message(
            "unsupported",
            None,
            errors=[
                {
                    "code": 131051,
                    "title": "Message type unknown",
                    "message": "Message type unknown",
                    "error_data": {"details": "Message type is currently not supported."},
                }
            ],
        )
    )
    assert event.type == "message.unsupported"
    assert event.WhichOneof("payload") is None
    assert event.attributes["whatsapp.error_code"] == "131051"
    assert "not supported" in event.attributes["whatsapp.error_details"]


@pytest.mark.parametrize(
    ("state", "expected", "code", "permanent"),
    [
        ("sent", S.DELIVERY_STATE_SENT, None, False),
        ("delivered", S.DELIVERY_STATE_DELIVERED, None, False),
        ("read", S.DELIVERY_STATE_READ, None, False),
        ("failed", S.DELIVERY_STATE_FAILED, 131026, True),
        ("failed", S.DELIVERY_STATE_FAILED, 131047, True),
        ("failed", S.DELIVERY_STATE_FAILED, 130429, False),
    ],
)
def test_statuses_map_to_canonical_states(
    state: str, expected: DeliveryState.ValueType, code: int | None, permanent: bool
) -> None:
    item = wa.status("wamid.OUT", state, callback_data="gw-123", error_code=code)
    batch = mapping.map_webhook(
        envelope(request(wa.body(wa.webhook(wa.change(statuses=[item])))), mapping.OBJECT),
        account_of=lambda pid: "main",
        received_at=NOW,
    )
    (event,) = batch.events
    assert event.type == "message.status"
    status = event.status
    assert status.state == expected
    assert status.provider_status == state
    assert status.message_id == "gw-123"
    assert event.causation_id == "gw-123"
    assert status.provider_message_id == "wamid.OUT"
    assert status.recipient == "+" + wa.CUSTOMER
    assert status.reason_code == (str(code) if code else "")
    assert status.permanent is permanent
    assert batch.customer_messages == []


def test_unknown_status_and_other_fields_are_skipped_not_refused() -> None:
    payload = wa.webhook(wa.change(statuses=[wa.status("wamid.X", "deleted")]))
    payload["entry"][0]["changes"].append(
        {"field": "message_template_status_update", "value": {"event": "APPROVED"}}
    )
    batch = mapping.map_webhook(
        envelope(request(wa.body(payload)), mapping.OBJECT),
        account_of=lambda pid: "main",
        received_at=NOW,
    )
    assert batch.events == []
    assert len(batch.skipped) == 2


def test_every_item_of_every_change_of_every_entry() -> None:
    changes = [
        wa.change([wa.text_message(str(n)) for n in range(5)], [wa.status(wa.wamid(), "sent")])
        for _ in range(6)
    ]
    batch = mapping.map_webhook(
        envelope(request(wa.body(wa.webhook(*changes, entries=3))), mapping.OBJECT),
        account_of=lambda pid: "main",
        received_at=NOW,
    )
    assert sum(e.type == "message.received" for e in batch.events) == 30
    assert sum(e.type == "message.status" for e in batch.events) == 6
    assert len({e.id for e in batch.events}) == 36
    assert len(batch.customer_messages) == 30


@pytest.mark.parametrize(
    "payload",
    [
        {"object": "page", "entry": []},
        {"object": "whatsapp_business_account"},
        {"object": "whatsapp_business_account", "entry": {"id": "1"}},
        {"object": "whatsapp_business_account", "entry": [{"changes": "x"}]},
        [1, 2],
    ],
)
def test_malformed_envelopes_are_400(payload: Any) -> None:
    with pytest.raises(BadRequestError):
        mapping.map_webhook(
            envelope(request(wa.body(payload)), mapping.OBJECT),  # type: ignore[arg-type]
            account_of=lambda pid: "main",
            received_at=NOW,
        )


def test_malformed_sender_is_400() -> None:
    with pytest.raises(BadRequestError):
        map_one(wa.text_message(wa_id="not-a-number"))
