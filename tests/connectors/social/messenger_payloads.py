"""Messenger and Instagram webhook payloads in the shapes Meta documents.

https://developers.facebook.com/docs/messenger-platform/reference/webhook-events
https://developers.facebook.com/docs/messenger-platform/instagram/features/webhook
"""

from __future__ import annotations

import time
import uuid
from typing import Any

PAGE_ID = "110198307491234"
IG_ID = "17841405822304914"
PSID = "6543210987654321"


def mid() -> str:
    return "m_" + uuid.uuid4().hex


def item(kind: str, body: Any, *, business: str = PAGE_ID, sender: str = PSID) -> dict[str, Any]:
    """One ``messaging[]`` item."""
    return {
        "sender": {"id": sender},
        "recipient": {"id": business},
        "timestamp": int(time.time() * 1000),
        kind: body,
    }


def webhook(obj: str, business: str, *batches: list[dict[str, Any]]) -> dict[str, Any]:
    """The envelope: one entry per list of items."""
    return {
        "object": obj,
        "entry": [
            {"id": business, "time": int(time.time() * 1000), "messaging": messaging}
            for messaging in batches
        ],
    }
