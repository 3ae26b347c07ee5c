"""Telegram Bot API updates in the documented shapes (https://core.telegram.org/bots/api#update)."""

from __future__ import annotations

import itertools
import time
from typing import Any

USER = {"id": 123456789, "is_bot": False, "first_name": "Ada", "last_name": "L", "username": "ada"}
PRIVATE_CHAT = {"id": 123456789, "type": "private", "first_name": "Ada", "username": "ada"}
CHANNEL_CHAT = {"id": -1001234567890, "type": "channel", "title": "News"}

_update_ids = itertools.count(int(time.time() * 1000) % 10**9)
_message_ids = itertools.count(1)


def update_id() -> int:
    return next(_update_ids)


def message(
    chat: dict[str, Any] = PRIVATE_CHAT, message_id: int | None = None, **content: Any
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "message_id": message_id if message_id is not None else next(_message_ids),
        "chat": chat,
        "date": int(time.time()),
        **content,
    }
    if chat["type"] != "channel":
        item["from"] = USER
    else:
        item["sender_chat"] = chat
    return item


def update(kind: str, body: dict[str, Any], uid: int | None = None) -> dict[str, Any]:
    return {"update_id": uid if uid is not None else update_id(), kind: body}


def photo_sizes() -> list[dict[str, Any]]:
    return [
        {
            "file_id": "AgAD-small",
            "file_unique_id": "s",
            "file_size": 1200,
            "width": 90,
            "height": 67,
        },
        {
            "file_id": "AgAD-large",
            "file_unique_id": "l",
            "file_size": 98000,
            "width": 1280,
            "height": 960,
        },
        {
            "file_id": "AgAD-medium",
            "file_unique_id": "m",
            "file_size": 21000,
            "width": 320,
            "height": 240,
        },
    ]
