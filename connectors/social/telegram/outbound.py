"""SendMessageCommand -> Telegram Bot API method and parameters: pure functions, no I/O.

https://core.telegram.org/bots/api#available-methods

- ``text`` -> ``sendMessage``; ``choice`` -> ``sendMessage`` with an inline
  keyboard (one button per row, ``callback_data`` = option id);
- ``media`` -> ``sendPhoto`` / ``sendDocument`` / ``sendVideo`` /
  ``sendAudio`` / ``sendVoice`` / ``sendSticker`` (a URL or a ``file_id``);
- ``location`` -> ``sendLocation``;
- ``reply_to`` (``<chat_id>:<message_id>``) -> ``reply_parameters``.

``metadata`` actions (no content case in the contract):

- ``telegram.action = edit``: ``editMessageText`` of ``reply_to`` with the text;
- ``telegram.action = answer_callback``: ``answerCallbackQuery`` of
  ``telegram.callback_query_id`` (the text, if any, is shown as a notification).
"""

from __future__ import annotations

from typing import Any

from connectors.social.telegram.mapping import parse_message_key
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.content_pb2 import MediaKind
from gateway.contract import BadRequestError, PermanentError

MAX_TEXT_LENGTH = 4096
MAX_CAPTION_LENGTH = 1024
MAX_CALLBACK_DATA_BYTES = 64
ACTION = "telegram.action"

_MEDIA_METHODS = {
    MediaKind.MEDIA_KIND_IMAGE: ("sendPhoto", "photo"),
    MediaKind.MEDIA_KIND_DOCUMENT: ("sendDocument", "document"),
    MediaKind.MEDIA_KIND_VIDEO: ("sendVideo", "video"),
    MediaKind.MEDIA_KIND_AUDIO: ("sendAudio", "audio"),
    MediaKind.MEDIA_KIND_VOICE: ("sendVoice", "voice"),
    MediaKind.MEDIA_KIND_STICKER: ("sendSticker", "sticker"),
}


def _key(value: str) -> tuple[str, int]:
    try:
        return parse_message_key(value)
    except BadRequestError as exc:
        raise PermanentError(str(exc), code="invalid_reply_to") from exc


def _chat(command: SendMessageCommand) -> str:
    recipients = command.message.recipients
    if len(recipients) != 1 or not recipients[0].address:
        raise PermanentError("a Telegram message has exactly one chat", code="invalid_recipient")
    chat = recipients[0].address
    if not (chat.lstrip("-").isdigit() or (chat.startswith("@") and len(chat) > 1)):
        raise PermanentError(
            f"not a Telegram chat id or @channel: {chat!r}", code="invalid_recipient"
        )
    return chat


def build_call(command: SendMessageCommand) -> tuple[str, dict[str, Any]]:
    """``(method, parameters)`` of ``command``."""
    message = command.message
    action = command.metadata.get(ACTION, "")
    if action == "answer_callback":
        query_id = command.metadata.get("telegram.callback_query_id", "")
        if not query_id:
            raise PermanentError("answer_callback needs telegram.callback_query_id", code="invalid")
        params: dict[str, Any] = {"callback_query_id": query_id}
        if message.HasField("text") and message.text.body:
            params["text"] = message.text.body[:200]
        return "answerCallbackQuery", params
    if action == "edit":
        if not message.reply_to or not message.HasField("text") or not message.text.body:
            raise PermanentError("edit needs reply_to and the new text", code="invalid")
        chat, message_id = _key(message.reply_to)
        return "editMessageText", {
            "chat_id": chat,
            "message_id": message_id,
            "text": message.text.body,
        }
    if action:
        raise PermanentError(f"unknown telegram.action {action!r}", code="unsupported_content")
    params = {"chat_id": _chat(command)}
    if message.reply_to:
        chat, message_id = _key(message.reply_to)
        params["reply_parameters"] = {"message_id": message_id, "allow_sending_without_reply": True}
        if chat != params["chat_id"]:
            params["reply_parameters"]["chat_id"] = chat
    content = message.WhichOneof("content")
    if content == "text":
        body = message.text.body
        if not body:
            raise PermanentError("nothing to send: empty text", code="empty_message")
        if len(body) > MAX_TEXT_LENGTH:
            raise PermanentError(f"at most {MAX_TEXT_LENGTH} characters", code="text_too_long")
        params["text"] = body
        return "sendMessage", params
    if content == "choice":
        choice = message.choice
        if not choice.body or not choice.options:
            raise PermanentError("a choice needs a body and options", code="invalid_choice")
        rows = []
        for option in choice.options:
            if not 1 <= len(option.id.encode()) <= MAX_CALLBACK_DATA_BYTES:
                raise PermanentError(
                    f"option id must be 1-{MAX_CALLBACK_DATA_BYTES} bytes (callback_data)",
                    code="invalid_choice",
                )
            rows.append([{"text": option.title or option.id, "callback_data": option.id}])
        params["text"] = choice.body
        params["reply_markup"] = {"inline_keyboard": rows}
        return "sendMessage", params
    if content == "media":
        if len(message.attachments) != 1:
            raise PermanentError("send one attachment per message", code="unsupported_content")
        method_field = _MEDIA_METHODS.get(message.media.kind)
        if method_field is None:
            raise PermanentError("media kind not set", code="unsupported_content")
        method, field = method_field
        attachment = message.attachments[0]
        if attachment.provider_media_id:
            params[field] = attachment.provider_media_id
        elif attachment.url.startswith(("https://", "http://")):
            params[field] = attachment.url
        else:
            raise PermanentError("media needs a URL or a file_id", code="unsupported_content")
        caption = message.media.caption or attachment.caption
        if caption and field != "sticker":
            params["caption"] = caption[:MAX_CAPTION_LENGTH]
        return method, params
    if content == "location":
        params["latitude"] = message.location.latitude
        params["longitude"] = message.location.longitude
        return "sendLocation", params
    raise PermanentError(
        f"telegram cannot send {content or 'an empty message'}", code="unsupported_content"
    )
