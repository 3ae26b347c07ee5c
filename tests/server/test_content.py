"""Content adaptation against manifests (rules SendMessage and PreviewMessage share)."""

from __future__ import annotations

from gateway.api.v1.connector_pb2 import ConnectorLimits, ConnectorManifest
from gateway.api.v1.content_pb2 import (
    Attachment,
    ChoiceResponse,
    ContactCard,
    Email,
    Media,
    Text,
)
from gateway.api.v1.gateway_service_pb2 import AdaptationKind
from gateway.api.v1.message_pb2 import Message
from gateway.contract import registry
from gateway.server.content import adapt

TEXT_ONLY = ConnectorManifest(
    channel="chat",
    provider="acme",
    outbound_content=["text"],
    limits=ConnectorLimits(max_text_length=20),
)


def test_media_on_a_text_only_connector_is_a_violation_not_a_silent_drop() -> None:
    vonage = registry.load("sms.vonage").manifest
    message = Message(text=Text(body="see"), attachments=[Attachment(url="https://x.test/a.jpg")])
    out = adapt(message, vonage)
    assert [v.field for v in out.violations] == ["message.attachments"]
    assert "cannot send media" in out.violations[0].description
    media = Message(media=Media(caption="c"), attachments=[Attachment(url="https://x.test/a.jpg")])
    fields = {v.field for v in adapt(media, vonage).violations}
    assert fields == {"message.media", "message.attachments"}


def test_degraded_text_is_checked_against_the_length_limit() -> None:
    contact = ContactCard(formatted_name="Ada Lovelace", phones=["+441234567890"])
    out = adapt(Message(contact=contact), TEXT_ONLY)
    assert out.message.text.body == "Ada Lovelace\n+441234567890"
    assert [v.field for v in out.violations] == ["message.contact"]
    assert "at most 20" in out.violations[0].description
    assert out.adaptations[0].kind == AdaptationKind.ADAPTATION_KIND_DEGRADED_TO_TEXT


def test_email_without_text_part_cannot_degrade() -> None:
    out = adapt(Message(email=Email(subject="s", html="<b>x</b>")), TEXT_ONLY)
    assert [v.field for v in out.violations] == ["message.email.text"]
    assert out.adaptations[0].kind == AdaptationKind.ADAPTATION_KIND_DROPPED


def test_supported_content_is_untouched_and_not_sms() -> None:
    message = Message(text=Text(body="hello"))
    out = adapt(message, TEXT_ONLY)
    assert out.message == message
    assert not out.adaptations
    assert not out.violations
    assert out.sms is None  # segments only for the SMS channel


def test_choice_response_degrades_to_its_title() -> None:
    out = adapt(Message(choice_response=ChoiceResponse(option_id="1", title="Yes")), TEXT_ONLY)
    assert out.message.text.body == "Yes"


def test_attachment_size_limit() -> None:
    manifest = ConnectorManifest(
        channel="mms",
        provider="acme",
        outbound_content=["text", "media"],
        limits=ConnectorLimits(max_attachments=2, max_attachment_bytes=1000),
    )
    message = Message(
        media=Media(),
        attachments=[Attachment(url="https://x.test/a", size_bytes=2000), Attachment()],
    )
    fields = [v.field for v in adapt(message, manifest).violations]
    assert fields == ["message.attachments[0].size_bytes", "message.attachments[1].url"]
