"""SendMessageCommand -> Messenger / Instagram Send API body: pure functions, no I/O.

https://developers.facebook.com/docs/messenger-platform/reference/send-api
https://developers.facebook.com/docs/messenger-platform/instagram/features/send-message

Content: ``text``; ``media`` (the first attachment by URL or reusable
``attachment_id``); ``choice`` as quick replies (up to 13) or, with
``CHOICE_STYLE_BUTTONS``, a button template of postback buttons (up to 3).
``metadata``:

- ``<channel>.tag``: send as ``MESSAGE_TAG`` with that tag (outside the
  standard 24-hour window, e.g. ``HUMAN_AGENT``); default ``RESPONSE``;
- ``<channel>.action``: ``mark_seen`` / ``typing_on`` / ``typing_off`` (a
  sender action instead of a message);
- ``<channel>.action = reaction``: react to ``reply_to`` (a message id, ``mid``)
  with ``<channel>.emoji`` (sender action ``react``, payload ``{message_id,
  reaction}``); an empty emoji removes our reaction (sender action ``unreact``,
  payload ``{message_id}``).
  https://developers.facebook.com/documentation/business-messaging/messenger-platform/send-messages/sender-actions

``reply_to`` on an ordinary message becomes the Send API's top-level
``reply_to: {"mid": ...}`` (the message shows as a reply to that one); the
parameter is listed in the Page Messages reference
(https://developers.facebook.com/docs/graph-api/reference/page/messages).
"""

from __future__ import annotations

from typing import Any

from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.content_pb2 import ChoiceStyle, MediaKind
from gateway.contract import PermanentError

MAX_TEXT_LENGTH = 2000
MAX_QUICK_REPLIES = 13
MAX_BUTTONS = 3
SENDER_ACTIONS = frozenset({"mark_seen", "typing_on", "typing_off"})
#: The metadata action that reacts to (or, with an empty emoji, unreacts from) ``reply_to``.
REACTION = "reaction"

_ATTACHMENT_TYPES = {
    MediaKind.MEDIA_KIND_IMAGE: "image",
    MediaKind.MEDIA_KIND_STICKER: "image",
    MediaKind.MEDIA_KIND_VIDEO: "video",
    MediaKind.MEDIA_KIND_AUDIO: "audio",
    MediaKind.MEDIA_KIND_VOICE: "audio",
    MediaKind.MEDIA_KIND_DOCUMENT: "file",
}


def build_payload(command: SendMessageCommand, channel: str) -> dict[str, Any]:
    """The ``POST /<page-id>/messages`` body of ``command``."""
    message = command.message
    if len(message.recipients) != 1 or not message.recipients[0].address:
        raise PermanentError(
            f"a {channel} message has exactly one recipient", code="invalid_recipient"
        )
    body: dict[str, Any] = {"recipient": {"id": message.recipients[0].address}}
    action = command.metadata.get(f"{channel}.action", "")
    if action == REACTION:
        return _reaction(command, channel, body)
    if action:
        if action not in SENDER_ACTIONS:
            raise PermanentError(f"unknown {channel}.action {action!r}", code="unsupported_content")
        body["sender_action"] = action
        return body
    tag = command.metadata.get(f"{channel}.tag", "")
    body["messaging_type"] = "MESSAGE_TAG" if tag else "RESPONSE"
    if tag:
        body["tag"] = tag
    content = message.WhichOneof("content")
    if content == "text":
        if not message.text.body:
            raise PermanentError("nothing to send: empty text", code="empty_message")
        if len(message.text.body) > MAX_TEXT_LENGTH:
            raise PermanentError(
                f"{channel} text is at most {MAX_TEXT_LENGTH} characters", code="text_too_long"
            )
        body["message"] = {"text": message.text.body}
    elif content == "media":
        if len(message.attachments) != 1:
            raise PermanentError("send one attachment per message", code="unsupported_content")
        attachment = message.attachments[0]
        kind = _ATTACHMENT_TYPES.get(message.media.kind)
        if kind is None:
            raise PermanentError("media kind not set", code="unsupported_content")
        if attachment.provider_media_id:
            payload: dict[str, Any] = {"attachment_id": attachment.provider_media_id}
        elif attachment.url.startswith("https://"):
            payload = {"url": attachment.url, "is_reusable": True}
        else:
            raise PermanentError(
                "media needs an https URL or an attachment id", code="unsupported_content"
            )
        body["message"] = {"attachment": {"type": kind, "payload": payload}}
    elif content == "choice":
        choice = message.choice
        if not choice.body or not choice.options:
            raise PermanentError("a choice needs a body and options", code="invalid_choice")
        if choice.style == ChoiceStyle.CHOICE_STYLE_BUTTONS:
            if len(choice.options) > MAX_BUTTONS:
                raise PermanentError(f"at most {MAX_BUTTONS} buttons", code="invalid_choice")
            body["message"] = {
                "attachment": {
                    "type": "template",
                    "payload": {
                        "template_type": "button",
                        "text": choice.body,
                        "buttons": [
                            {"type": "postback", "title": o.title[:20], "payload": o.id}
                            for o in choice.options
                        ],
                    },
                }
            }
        else:
            if len(choice.options) > MAX_QUICK_REPLIES:
                raise PermanentError(
                    f"at most {MAX_QUICK_REPLIES} quick replies", code="invalid_choice"
                )
            body["message"] = {
                "text": choice.body,
                "quick_replies": [
                    {"content_type": "text", "title": o.title[:20], "payload": o.id}
                    for o in choice.options
                ],
            }
    else:
        raise PermanentError(
            f"{channel} cannot send {content or 'an empty message'}", code="unsupported_content"
        )
    if message.reply_to:
        body["reply_to"] = {"mid": message.reply_to}
    return body


def _reaction(command: SendMessageCommand, channel: str, body: dict[str, Any]) -> dict[str, Any]:
    """The ``react`` / ``unreact`` sender action on the message ``reply_to`` names."""
    target = command.message.reply_to
    if not target:
        raise PermanentError(
            "a reaction needs reply_to (the message reacted to)", code="invalid_reaction"
        )
    emoji = command.metadata.get(f"{channel}.emoji", "")
    if emoji:
        body["sender_action"] = "react"
        body["payload"] = {"message_id": target, "reaction": emoji}
    else:
        body["sender_action"] = "unreact"
        body["payload"] = {"message_id": target}
    return body
