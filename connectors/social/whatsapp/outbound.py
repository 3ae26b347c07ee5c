"""SendMessageCommand -> WhatsApp Cloud API message payload: pure functions, no I/O.

https://developers.facebook.com/docs/whatsapp/cloud-api/reference/messages

Content cases: ``text``, ``media`` (the first attachment, by ``link`` or by a
Meta media ``id``), ``location``, ``contact``, ``choice`` (reply buttons, up to
3, or a list), ``template``. ``reply_to`` becomes ``context.message_id``.

Actions the contract has no content case for ride in ``metadata``:

- ``whatsapp.action = reaction``: react to ``reply_to`` with
  ``whatsapp.emoji`` (empty removes the reaction);
- ``whatsapp.action = mark_read``: mark ``reply_to`` (a customer's message) read;
  with ``whatsapp.typing = true`` also show a typing indicator;
- ``whatsapp.list_button``: the label of a list's open button (default "Choose").
"""

from __future__ import annotations

from typing import Any

from connectors.social.whatsapp.mapping import wa_address
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.content_pb2 import ChoiceStyle, MediaKind
from gateway.contract import BadRequestError, PermanentError

MAX_TEXT_LENGTH = 4096
MAX_BUTTONS = 3
MAX_LIST_ROWS = 10
ACTION = "whatsapp.action"

_MEDIA_TYPES = {
    MediaKind.MEDIA_KIND_IMAGE: "image",
    MediaKind.MEDIA_KIND_AUDIO: "audio",
    MediaKind.MEDIA_KIND_VOICE: "audio",
    MediaKind.MEDIA_KIND_VIDEO: "video",
    MediaKind.MEDIA_KIND_DOCUMENT: "document",
    MediaKind.MEDIA_KIND_STICKER: "sticker",
}
_CAPTIONED = frozenset({"image", "video", "document"})


def recipient(command: SendMessageCommand) -> str:
    """The one recipient of a WhatsApp send, as E.164."""
    if len(command.message.recipients) != 1:
        raise PermanentError(
            "a WhatsApp message has exactly one recipient", code="invalid_recipient"
        )
    try:
        return wa_address(command.message.recipients[0].address)
    except BadRequestError as exc:
        raise PermanentError(str(exc), code="invalid_recipient") from exc


def is_template(command: SendMessageCommand) -> bool:
    """Template messages may be sent outside the customer-service window."""
    return command.message.WhichOneof("content") == "template"


def action(command: SendMessageCommand) -> str:
    """The metadata action of a command (empty: an ordinary message)."""
    return command.metadata.get(ACTION, "")


def build_payload(command: SendMessageCommand) -> dict[str, Any]:
    """The ``POST /<phone-number-id>/messages`` body of ``command``."""
    message = command.message
    kind = action(command)
    if kind == "mark_read":
        if not message.reply_to:
            raise PermanentError("mark_read needs reply_to (the message to mark)", code="invalid")
        receipt: dict[str, Any] = {
            "messaging_product": "whatsapp",
            "status": "read",
            "message_id": message.reply_to,
        }
        if command.metadata.get("whatsapp.typing") == "true":
            # Shows "typing..." to the customer until we answer (or 25 s pass).
            receipt["typing_indicator"] = {"type": "text"}
        return receipt
    payload: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": recipient(command).removeprefix("+"),
    }
    if kind == "reaction":
        if not message.reply_to:
            raise PermanentError(
                "a reaction needs reply_to (the message reacted to)", code="invalid"
            )
        payload["type"] = "reaction"
        payload["reaction"] = {
            "message_id": message.reply_to,
            "emoji": command.metadata.get("whatsapp.emoji", ""),
        }
        return payload
    if kind:
        raise PermanentError(f"unknown whatsapp.action {kind!r}", code="unsupported_content")
    if message.reply_to:
        payload["context"] = {"message_id": message.reply_to}
    if command.message_id:
        # Echoed as biz_opaque_callback_data on every status webhook of this message.
        payload["biz_opaque_callback_data"] = command.message_id[:512]
    content = message.WhichOneof("content")
    if content == "text":
        body = message.text.body
        if not body:
            raise PermanentError("nothing to send: empty text", code="empty_message")
        if len(body) > MAX_TEXT_LENGTH:
            raise PermanentError(
                f"WhatsApp text is at most {MAX_TEXT_LENGTH} characters", code="text_too_long"
            )
        payload["type"] = "text"
        payload["text"] = {"body": body, "preview_url": "http://" in body or "https://" in body}
    elif content == "media":
        if len(message.attachments) != 1:
            raise PermanentError(
                "a WhatsApp media message carries exactly one attachment",
                code="unsupported_content",
            )
        media_type = _MEDIA_TYPES.get(message.media.kind)
        if media_type is None:
            raise PermanentError("media kind not set", code="unsupported_content")
        attachment = message.attachments[0]
        item: dict[str, Any] = {}
        if attachment.provider_media_id:
            item["id"] = attachment.provider_media_id
        elif attachment.url.startswith("https://"):
            item["link"] = attachment.url
        else:
            raise PermanentError(
                "media needs an https link or a Meta media id", code="unsupported_content"
            )
        caption = message.media.caption or attachment.caption
        if caption and media_type in _CAPTIONED:
            item["caption"] = caption
        if media_type == "document" and attachment.filename:
            item["filename"] = attachment.filename
        payload["type"] = media_type
        payload[media_type] = item
    elif content == "location":
        loc = message.location
        payload["type"] = "location"
        payload["location"] = {"latitude": loc.latitude, "longitude": loc.longitude}
        if loc.name:
            payload["location"]["name"] = loc.name
        if loc.address:
            payload["location"]["address"] = loc.address
    elif content == "contact":
        card = message.contact
        payload["type"] = "contacts"
        contact: dict[str, Any] = {
            "name": {"formatted_name": card.formatted_name, "first_name": card.formatted_name},
            "phones": [{"phone": p} for p in card.phones],
        }
        if card.emails:
            contact["emails"] = [{"email": e} for e in card.emails]
        if card.organization:
            contact["org"] = {"company": card.organization}
        payload["contacts"] = [contact]
    elif content == "choice":
        payload["type"] = "interactive"
        payload["interactive"] = _interactive(command)
    elif content == "template":
        payload["type"] = "template"
        payload["template"] = _template(command)
    else:
        raise PermanentError(
            f"WhatsApp cannot send {content or 'an empty message'}", code="unsupported_content"
        )
    return payload


def _interactive(command: SendMessageCommand) -> dict[str, Any]:
    choice = command.message.choice
    if not choice.body or not choice.options:
        raise PermanentError("a choice needs a body and options", code="invalid_choice")
    interactive: dict[str, Any] = {"body": {"text": choice.body}}
    if choice.header:
        interactive["header"] = {"type": "text", "text": choice.header}
    if choice.footer:
        interactive["footer"] = {"text": choice.footer}
    if choice.style == ChoiceStyle.CHOICE_STYLE_LIST:
        if len(choice.options) > MAX_LIST_ROWS:
            raise PermanentError(f"a list has at most {MAX_LIST_ROWS} rows", code="invalid_choice")
        rows = []
        for option in choice.options:
            row = {"id": option.id, "title": option.title[:24]}
            if option.description:
                row["description"] = option.description[:72]
            rows.append(row)
        interactive["type"] = "list"
        interactive["action"] = {
            "button": command.metadata.get("whatsapp.list_button", "Choose")[:20],
            "sections": [{"title": (choice.header or "Options")[:24], "rows": rows}],
        }
    else:
        if len(choice.options) > MAX_BUTTONS:
            raise PermanentError(
                f"WhatsApp shows at most {MAX_BUTTONS} reply buttons; use a list",
                code="invalid_choice",
            )
        interactive["type"] = "button"
        interactive["action"] = {
            "buttons": [
                {"type": "reply", "reply": {"id": o.id, "title": o.title[:20]}}
                for o in choice.options
            ]
        }
    return interactive


def _template(command: SendMessageCommand) -> dict[str, Any]:
    template = command.message.template
    if not template.name or not template.language:
        raise PermanentError("a template needs a name and a language", code="invalid_template")
    result: dict[str, Any] = {"name": template.name, "language": {"code": template.language}}
    params = dict(template.parameters)
    if params:
        if all(k.isdigit() for k in params):
            # Positional {{1}}, {{2}} ... in order.
            parameters = [{"type": "text", "text": params[k]} for k in sorted(params, key=int)]
        else:
            parameters = [
                {"type": "text", "parameter_name": k, "text": v} for k, v in sorted(params.items())
            ]
        result["components"] = [{"type": "body", "parameters": parameters}]
    return result
