"""SendGrid payloads -> gateway.api.v1: pure functions, no I/O.

Event Webhook (a JSON array of events):
https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/event
Inbound Parse (multipart/form-data; raw MIME in ``email`` with "POST the raw,
full MIME message", else split fields):
https://www.twilio.com/docs/sendgrid/for-developers/parsing-email/setting-up-the-inbound-parse-webhook
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from connectors.email.compose import data_url_content
from connectors.email.mapping import (
    gateway_message_id,
    interaction_event,
    outbound_message_id,
    status_event,
)
from connectors.email.webhooks import Attached, FormPart, raw_header_pairs, rebuild_mime
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.content_pb2 import Email
from gateway.api.v1.delivery_pb2 import DeliveryState, DeliveryStatus
from gateway.api.v1.envelope_pb2 import Event, RawPayload
from gateway.contract import BadRequestError, PermanentError

PROVIDER = "sendgrid"
S = DeliveryState

#: Delivery events -> (state, permanent). ``deferred`` is transient: SendGrid retries.
STATUS_MAP: dict[str, tuple[DeliveryState.ValueType, bool]] = {
    "processed": (S.DELIVERY_STATE_QUEUED, False),
    "deferred": (S.DELIVERY_STATE_QUEUED, False),
    "delivered": (S.DELIVERY_STATE_DELIVERED, False),
    "bounce": (S.DELIVERY_STATE_FAILED, True),
    "dropped": (S.DELIVERY_STATE_FAILED, True),
}
#: Engagement events: interactions, never states.
INTERACTIONS = {
    "open",
    "click",
    "spamreport",
    "unsubscribe",
    "group_unsubscribe",
    "group_resubscribe",
}


def _when(value: Any) -> datetime | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    return None


def _our_id(item: dict[str, Any], domain: str) -> str:
    custom = item.get("gateway_message_id")
    if isinstance(custom, str) and custom:
        return custom
    smtp_id = item.get("smtp-id")
    return gateway_message_id(smtp_id, domain) if isinstance(smtp_id, str) and domain else ""


def events_from_webhook(
    body: Any, *, account: str, received_at: datetime, raw: bytes, message_id_domain: str
) -> list[Event]:
    """Every item of an Event Webhook batch as an event."""
    if not isinstance(body, list):
        raise BadRequestError("SendGrid event webhook body must be a JSON array")
    events: list[Event] = []
    payload = RawPayload(content_type="application/json", data=raw)
    for index, item in enumerate(body):
        if not isinstance(item, dict):
            raise BadRequestError(f"event {index} is not an object")
        name, event_id = item.get("event"), item.get("sg_event_id")
        recipient = item.get("email")
        if not isinstance(name, str) or not isinstance(event_id, str) or not event_id:
            raise BadRequestError(f"event {index} lacks event or sg_event_id")
        if not isinstance(recipient, str):
            raise BadRequestError(f"event {index} lacks email")
        provider_id = str(item.get("sg_message_id") or item.get("smtp-id") or "")
        ours = _our_id(item, message_id_domain)
        when = _when(item.get("timestamp"))
        if name in STATUS_MAP:
            state, permanent = STATUS_MAP[name]
            if name == "bounce" and item.get("type") == "blocked":
                permanent = False  # a block (reputation, content) may clear up
            status = DeliveryStatus(
                state=state,
                provider_status=name,
                reason_code=str(item.get("status") or item.get("type") or ""),
                reason=str(item.get("reason") or item.get("response") or "")[:1000],
                permanent=permanent,
                provider_message_id=provider_id,
                message_id=ours,
                recipient=recipient.lower(),
            )
            attempt = item.get("attempt")
            if isinstance(attempt, str) and attempt.isdigit():
                status.attempt = int(attempt)
            events.append(
                status_event(
                    provider=PROVIDER,
                    account=account,
                    kind="event",
                    key=(event_id,),
                    status=status,
                    received_at=received_at,
                    occurred_at=when,
                    raw=payload,
                )
            )
        else:
            # Engagement, and any event type SendGrid adds later: kept, never a state.
            events.append(
                interaction_event(
                    provider=PROVIDER,
                    account=account,
                    key=(event_id,),
                    interaction=name if name in INTERACTIONS else f"other:{name}",
                    recipient=recipient.lower(),
                    provider_message_id=provider_id,
                    message_id=ours,
                    received_at=received_at,
                    occurred_at=when,
                    raw=payload,
                    url=str(item.get("url") or ""),
                )
            )
    return events


def _field(fields: Sequence[FormPart], name: str, charsets: dict[str, Any] | None = None) -> str:
    for part in fields:
        if part.name == name and part.filename is None:
            charset = str((charsets or {}).get(name) or "utf-8")
            try:
                return part.data.decode(charset, errors="replace")
            except (LookupError, ValueError):  # a charset name Python does not know
                return part.text
    return ""


def inbound_mail(fields: Sequence[FormPart]) -> tuple[bytes, str, list[str]]:
    """The raw mail of an Inbound Parse post, with envelope sender and recipients."""
    envelope: dict[str, Any] = {}
    text = _field(fields, "envelope")
    if text:
        try:
            loaded = json.loads(text)
        except ValueError as exc:
            raise BadRequestError(f"envelope field is not JSON: {exc}") from exc
        if isinstance(loaded, dict):
            envelope = loaded
    mail_from = str(envelope.get("from") or "").lower()
    rcpt = envelope.get("to")
    rcpt_to = [str(r).lower() for r in rcpt] if isinstance(rcpt, list) else []
    raw = next((p.data for p in fields if p.name == "email"), b"")
    if raw:
        return raw, mail_from, rcpt_to
    headers = _field(fields, "headers")
    if not headers:
        raise BadRequestError("inbound parse post has neither email nor headers")
    try:
        info = json.loads(_field(fields, "attachment-info") or "{}")
        content_ids = json.loads(_field(fields, "content-ids") or "{}")
    except ValueError as exc:
        raise BadRequestError(f"attachment-info/content-ids is not JSON: {exc}") from exc
    cid_of = {v: k for k, v in content_ids.items()} if isinstance(content_ids, dict) else {}
    attachments = []
    for part in fields:
        if part.filename is None and not part.name.startswith("attachment"):
            continue
        if part.name in ("attachment-info", "attachments"):
            continue
        meta = info.get(part.name, {}) if isinstance(info, dict) else {}
        attachments.append(
            Attached(
                filename=str(meta.get("filename") or part.filename or part.name),
                content_type=str(meta.get("type") or part.content_type),
                data=part.data,
                content_id=str(cid_of.get(part.name, "")),
            )
        )
    try:
        charsets = json.loads(_field(fields, "charsets") or "{}")
    except ValueError:
        charsets = {}
    charsets = charsets if isinstance(charsets, dict) else {}
    raw = rebuild_mime(
        raw_header_pairs(headers),
        text=_field(fields, "text", charsets),
        html=_field(fields, "html", charsets),
        attachments=attachments,
    )
    return raw, mail_from, rcpt_to


def mail_send_payload(
    command: SendMessageCommand,
    *,
    from_address: str,
    from_name: str,
    message_id_domain: str,
) -> dict[str, Any]:
    """A v3 Mail Send body for ``command``; bad content is a PermanentError.

    The gateway's message id rides as the custom arg ``gateway_message_id``
    (SendGrid echoes custom args in every Event Webhook item) and in our own
    ``Message-ID`` header, so events and replies map back.
    """
    message = command.message
    if not message.recipients:
        raise PermanentError("an email needs at least one recipient", code="invalid_recipient")
    if message.HasField("email"):
        content = message.email
        subject, text, html = content.subject, content.text, content.html
    elif message.HasField("text"):
        content = Email()
        subject, text, html = "", message.text.body, ""
    else:
        raise PermanentError("email sends text or email content only", code="unsupported_content")
    parts = []
    if text:
        parts.append({"type": "text/plain", "value": text})
    if html:
        parts.append({"type": "text/html", "value": html})
    if not parts:
        raise PermanentError("nothing to send: no text or html", code="empty_message")
    headers = {"Message-ID": outbound_message_id(command.message_id, message_id_domain)}
    references = list(content.references)
    if content.in_reply_to:
        headers["In-Reply-To"] = content.in_reply_to
        if content.in_reply_to not in references:
            references.append(content.in_reply_to)
    if references:
        headers["References"] = " ".join(references)
    for header in content.headers:
        if "\r" in header.value or "\n" in header.value:
            raise PermanentError(f"header {header.name!r} has a line break", code="invalid_header")
        headers[header.name] = header.value
    sender = message.sender.address or from_address
    if "@" not in sender:
        raise PermanentError("no sender address", code="no_sender")
    payload: dict[str, Any] = {
        "personalizations": [
            {
                "to": [
                    {"email": r.address, **({"name": r.display_name} if r.display_name else {})}
                    for r in message.recipients
                ],
                "custom_args": {"gateway_message_id": command.message_id},
            }
        ],
        "from": {"email": sender, **({"name": from_name} if from_name else {})},
        "subject": subject or " ",
        "content": parts,
        "headers": headers,
    }
    attachments = []
    for attachment in message.attachments:
        data, ctype = data_url_content(attachment)
        item = {
            "content": base64.b64encode(data).decode(),
            "type": ctype,
            "filename": attachment.filename or "attachment",
            "disposition": "inline"
            if attachment.inline and attachment.content_id
            else "attachment",
        }
        if attachment.content_id:
            item["content_id"] = attachment.content_id
        attachments.append(item)
    if attachments:
        payload["attachments"] = attachments
    return payload
