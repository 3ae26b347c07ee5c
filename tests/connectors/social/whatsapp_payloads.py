"""WhatsApp Cloud API webhook payloads in the shapes Meta documents.

https://developers.facebook.com/docs/whatsapp/cloud-api/webhooks/payload-examples
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

WABA_ID = "102290129340398"
PHONE_NUMBER_ID = "106540352242922"
DISPLAY_PHONE = "15550783881"
CUSTOMER = "16505551234"
CUSTOMER_NAME = "Sheena Nelson"


def wamid() -> str:
    """A fresh WhatsApp message id."""
    return "wamid.HBgL" + uuid.uuid4().hex.upper()


def message(kind: str, body: Any, *, wa_id: str = CUSTOMER, **extra: Any) -> dict[str, Any]:
    """One ``messages[]`` item."""
    item: dict[str, Any] = {
        "from": wa_id,
        "id": extra.pop("id", None) or wamid(),
        "timestamp": str(int(time.time())),
        "type": kind,
    }
    if body is not None:
        item[kind] = body
    item.update(extra)
    return item


def text_message(body: str = "Does it come in another color?", **extra: Any) -> dict[str, Any]:
    return message("text", {"body": body}, **extra)


def status(
    message_id: str,
    state: str,
    *,
    callback_data: str | None = None,
    error_code: int | None = None,
) -> dict[str, Any]:
    """One ``statuses[]`` item."""
    item: dict[str, Any] = {
        "id": message_id,
        "status": state,
        "timestamp": str(int(time.time())),
        "recipient_id": CUSTOMER,
    }
    if state in ("sent", "delivered"):
        item["conversation"] = {
            "id": "CONVERSATION_ID",
            "expiration_timestamp": str(int(time.time()) + 86400),
            "origin": {"type": "service"},
        }
        item["pricing"] = {"billable": True, "pricing_model": "CBP", "category": "service"}
    if callback_data:
        item["biz_opaque_callback_data"] = callback_data
    if error_code is not None:
        item["errors"] = [
            {
                "code": error_code,
                "title": "Message undeliverable",
                "message": "Message undeliverable",
                "error_data": {"details": "Message could not be delivered"},
                "href": "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/",
            }
        ]
    return item


def change(
    messages: list[dict[str, Any]] | None = None,
    statuses: list[dict[str, Any]] | None = None,
    *,
    phone_number_id: str = PHONE_NUMBER_ID,
) -> dict[str, Any]:
    """One ``changes[]`` item (field ``messages``)."""
    value: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": DISPLAY_PHONE, "phone_number_id": phone_number_id},
    }
    if messages:
        senders = sorted({m["from"] for m in messages})
        value["contacts"] = [{"profile": {"name": CUSTOMER_NAME}, "wa_id": s} for s in senders]
        value["messages"] = messages
    if statuses:
        value["statuses"] = statuses
    return {"value": value, "field": "messages"}


def webhook(*changes: dict[str, Any], entries: int = 1) -> dict[str, Any]:
    """The envelope; ``changes`` spread over ``entries`` entries in order."""
    per = max(1, len(changes) // entries)
    entry_list = [
        {"id": WABA_ID, "changes": list(changes[i : i + per])} for i in range(0, len(changes), per)
    ]
    return {"object": "whatsapp_business_account", "entry": entry_list}


def body(payload: dict[str, Any]) -> bytes:
    """Serialized as Meta does: compact, non-ASCII escaped (``\\u00e9``)."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=True).encode()


def edit_message(original_id: str, new_message: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A ``type: "edit"`` item (Coexistence numbers only): ``new_message`` is the edited
    content in the shape of an ordinary message, without id/from/timestamp."""
    return message("edit", {"original_message_id": original_id, "message": new_message}, **extra)


def revoke_message(original_id: str, **extra: Any) -> dict[str, Any]:
    """A ``type: "revoke"`` item (Coexistence numbers only): the customer deleted a message."""
    return message("revoke", {"original_message_id": original_id}, **extra)
