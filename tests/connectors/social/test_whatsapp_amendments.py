"""WhatsApp edits and revokes (documented for Coexistence numbers) -> Edit / Delete events."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from connectors.social.meta.envelope import envelope
from connectors.social.whatsapp import mapping
from gateway.api.v1.content_pb2 import MediaKind
from gateway.contract import BadRequestError, registry
from tests.connectors.social import whatsapp_payloads as wa
from tests.connectors.social.test_meta_signature import request

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def map_items(*messages: dict[str, Any]) -> mapping.Batch:
    return mapping.map_webhook(
        envelope(request(wa.body(wa.webhook(wa.change(list(messages))))), mapping.OBJECT),
        account_of=lambda pid: "main",
        received_at=NOW,
    )


def test_text_edit_is_an_edit_of_the_original() -> None:
    original = wa.wamid()
    item = wa.edit_message(
        original, {"context": {"id": "wamid.CTX"}, "type": "text", "text": {"body": "fixed"}}
    )
    batch = map_items(item)
    (event,) = batch.events
    assert event.type == "message.edited"
    assert event.WhichOneof("payload") == "edit"
    assert event.edit.provider_message_id == original
    assert event.edit.message.text.body == "fixed"
    assert event.edit.message.provider_message_id == original
    assert event.edit.message.reply_to == "wamid.CTX"
    assert event.edit.message.sender.address == "+" + wa.CUSTOMER
    assert event.edit.message.sender.display_name == wa.CUSTOMER_NAME
    assert event.attributes["whatsapp.message_id"] == item["id"]
    assert event.conversation_id
    # An edit is no new customer message: it does not open the service window.
    assert batch.customer_messages == []


def test_caption_edit_of_media() -> None:
    image = {
        "caption": "new caption",
        "mime_type": "image/jpeg",
        "sha256": "c2hh",
        "id": "1234567890",
        "url": "https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=1",
    }
    (event,) = map_items(
        wa.edit_message(wa.wamid(), {"context": {"id": "c"}, "type": "image", "image": image})
    ).events
    assert event.type == "message.edited"
    assert event.edit.message.media.kind == MediaKind.MEDIA_KIND_IMAGE
    assert event.edit.message.media.caption == "new caption"
    assert event.edit.message.attachments[0].provider_media_id == "1234567890"
    assert event.attributes["whatsapp.media_sha256"] == "c2hh"


def test_two_edits_of_one_message_are_two_events() -> None:
    original = wa.wamid()
    first = wa.edit_message(original, {"type": "text", "text": {"body": "a"}})
    second = wa.edit_message(original, {"type": "text", "text": {"body": "b"}})
    events = map_items(first, second).events
    assert [e.edit.message.text.body for e in events] == ["a", "b"]
    assert events[0].id != events[1].id
    # The same edit delivered again (Meta's retry) has the same id: deduplicated.
    assert map_items(first).events[0].id == events[0].id


def test_revoke_is_a_delete() -> None:
    original = wa.wamid()
    batch = map_items(wa.revoke_message(original))
    (event,) = batch.events
    assert event.type == "message.deleted"
    assert event.delete.provider_message_id == original
    assert event.delete.sender.address == "+" + wa.CUSTOMER
    assert batch.customer_messages == []


def test_edit_with_content_the_contract_cannot_hold_is_unsupported() -> None:
    original = wa.wamid()
    (event,) = map_items(
        wa.edit_message(original, {"type": "unsupported", "unsupported": {"type": "poll"}})
    ).events
    assert event.type == "message.unsupported"
    assert event.attributes["whatsapp.type"] == "edit"
    assert event.attributes["whatsapp.original_message_id"] == original


@pytest.mark.parametrize(
    "item",
    [
        wa.message("revoke", None),
        wa.message("revoke", {}),
        wa.message("edit", None),
        wa.message("edit", {"original_message_id": "wamid.X"}),
        wa.message("edit", {"message": {"type": "text", "text": {"body": "x"}}}),
        wa.edit_message("wamid.X", {"type": "reaction", "reaction": {"message_id": "y"}}),
    ],
)
def test_malformed_amendments_are_400(item: dict[str, Any]) -> None:
    with pytest.raises(BadRequestError):
        map_items(item)


def test_manifest_lists_edits_and_deletes() -> None:
    manifest = registry.load("whatsapp.meta").manifest
    assert {"message.edited", "message.deleted"} <= set(manifest.event_types)
