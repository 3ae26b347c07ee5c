"""Postmark payloads -> gateway.api.v1: pure functions, no I/O.

Inbound webhook (JSON): https://postmarkapp.com/developer/webhooks/inbound-webhook
Delivery, Bounce, Open, Click, SpamComplaint webhooks (JSON, ``RecordType``):
https://postmarkapp.com/developer/webhooks/webhooks-overview
Bounce types: https://postmarkapp.com/developer/api/bounce-api#bounce-types
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any

from connectors.email.compose import data_url_content
from connectors.email.mapping import interaction_event, outbound_message_id, status_event
from connectors.email.webhooks import Attached, rebuild_mime
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.content_pb2 import Email
from gateway.api.v1.delivery_pb2 import DeliveryState, DeliveryStatus
from gateway.api.v1.envelope_pb2 import Event, RawPayload
from gateway.contract import BadRequestError, PermanentError

PROVIDER = "postmark"
S = DeliveryState

#: Bounce types that end the message: the address or content will not pass.
PERMANENT_BOUNCES = {
    "HardBounce",
    "BadEmailAddress",
    "ManuallyDeactivated",
    "SpamComplaint",
    "Blocked",
    "DMARCPolicy",
    "TemplateRenderingFailed",
    "Unconfirmed",
    "SMTPApiError",
}
#: Bounce types that are deferrals: the receiving side may accept later.
TRANSIENT_BOUNCES = {"Transient", "SoftBounce", "DnsError", "ChallengeVerification"}
INTERACTIONS = {"Open": "open", "Click": "click", "SpamComplaint": "spamreport"}


def _when(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    return str(value) if isinstance(value, str | int) and not isinstance(value, bool) else ""


def event(
    body: Any, *, account: str, received_at: datetime, raw: bytes, message_id_domain: str
) -> Event:
    """One Postmark delivery, bounce or engagement webhook as an event."""
    if not isinstance(body, dict):
        raise BadRequestError("Postmark webhook body must be a JSON object")
    record = _str(body, "RecordType")
    provider_id = _str(body, "MessageID")
    recipient = (_str(body, "Recipient") or _str(body, "Email")).lower()
    if not record or not provider_id:
        raise BadRequestError("Postmark webhook lacks RecordType or MessageID")
    metadata = body.get("Metadata")
    ours = ""
    if isinstance(metadata, dict) and isinstance(metadata.get("gateway_message_id"), str):
        ours = metadata["gateway_message_id"]
    payload = RawPayload(content_type="application/json", data=raw)
    if record == "Delivery":
        status = DeliveryStatus(
            state=S.DELIVERY_STATE_DELIVERED,
            provider_status="Delivery",
            reason=_str(body, "Details")[:1000],
            provider_message_id=provider_id,
            message_id=ours,
            recipient=recipient,
        )
        return status_event(
            provider=PROVIDER,
            account=account,
            kind="delivery",
            key=(provider_id, recipient or "-"),
            status=status,
            received_at=received_at,
            occurred_at=_when(body.get("DeliveredAt")),
            raw=payload,
        )
    if record == "Bounce":
        kind = _str(body, "Type")
        bounce_id = _str(body, "ID")
        if not bounce_id:
            raise BadRequestError("Postmark bounce lacks ID")
        if kind == "AutoResponder":
            state, permanent = S.DELIVERY_STATE_DELIVERED, False
        elif kind in TRANSIENT_BOUNCES:
            state, permanent = S.DELIVERY_STATE_QUEUED, False
        else:
            state = S.DELIVERY_STATE_FAILED
            permanent = kind in PERMANENT_BOUNCES or body.get("Inactive") is True
        status = DeliveryStatus(
            state=state,
            provider_status=kind or "Bounce",
            reason_code=_str(body, "TypeCode"),
            reason=(_str(body, "Description") + " " + _str(body, "Details")).strip()[:1000],
            permanent=permanent,
            provider_message_id=provider_id,
            message_id=ours,
            recipient=recipient,
        )
        return status_event(
            provider=PROVIDER,
            account=account,
            kind="bounce",
            key=(bounce_id,),
            status=status,
            received_at=received_at,
            occurred_at=_when(body.get("BouncedAt")),
            raw=payload,
        )
    occurred = _str(body, "ReceivedAt") or _str(body, "BouncedAt") or _str(body, "ChangedAt")
    link = _str(body, "OriginalLink")
    return interaction_event(
        provider=PROVIDER,
        account=account,
        key=(record, provider_id, recipient or "-", occurred or "-", link or "-"),
        interaction=INTERACTIONS.get(record, f"other:{record}"),
        recipient=recipient,
        provider_message_id=provider_id,
        message_id=ours,
        received_at=received_at,
        occurred_at=_when(occurred),
        raw=payload,
        url=link,
    )


def _addresses(value: Any) -> str:
    if not isinstance(value, list):
        return ""
    items = []
    for item in value:
        if isinstance(item, dict) and isinstance(item.get("Email"), str):
            name = item.get("Name") if isinstance(item.get("Name"), str) else ""
            items.append(f'"{name}" <{item["Email"]}>' if name else item["Email"])
    return ", ".join(items)


def inbound_mail(body: Any) -> tuple[bytes, str, list[str]]:
    """The raw mail of an inbound webhook, with sender and recipients."""
    if not isinstance(body, dict):
        raise BadRequestError("Postmark inbound body must be a JSON object")
    full = body.get("FromFull")
    sender: dict[str, Any] = full if isinstance(full, dict) else {}
    mail_from = str(sender.get("Email") or body.get("From") or "").lower()
    rcpt_to = [
        str(r["Email"]).lower()
        for r in body.get("ToFull") or []
        if isinstance(r, dict) and isinstance(r.get("Email"), str)
    ]
    if not rcpt_to and isinstance(body.get("OriginalRecipient"), str):
        rcpt_to = [body["OriginalRecipient"].lower()]
    raw_email = body.get("RawEmail")
    if isinstance(raw_email, str) and raw_email:
        return raw_email.encode("utf-8", "surrogateescape"), mail_from, rcpt_to
    headers: list[tuple[str, str]] = [
        ("From", _addresses([sender]) or _str(body, "From")),
        ("To", _addresses(body.get("ToFull")) or _str(body, "To")),
        ("Subject", _str(body, "Subject")),
    ]
    if _addresses(body.get("CcFull")):
        headers.append(("Cc", _addresses(body.get("CcFull"))))
    if _str(body, "Date"):
        headers.append(("Date", _str(body, "Date")))
    if _str(body, "ReplyTo"):
        headers.append(("Reply-To", _str(body, "ReplyTo")))
    listed = body.get("Headers")
    for item in listed if isinstance(listed, list) else []:
        if isinstance(item, dict) and isinstance(item.get("Name"), str):
            headers.append((item["Name"], str(item.get("Value") or "")))
    if not any(name.lower() == "message-id" for name, _ in headers) and _str(body, "MessageID"):
        # Postmark's own id when the mail had no Message-ID header.
        headers.append(("Message-ID", f"<{_str(body, 'MessageID')}@inbound.postmarkapp.com>"))
    attachments = []
    for index, item in enumerate(body.get("Attachments") or []):
        if not isinstance(item, dict):
            raise BadRequestError(f"attachment {index} is not an object")
        try:
            data = base64.b64decode(str(item.get("Content") or ""), validate=True)
        except binascii.Error as exc:
            raise BadRequestError(f"attachment {index} is not base64: {exc}") from exc
        attachments.append(
            Attached(
                filename=str(item.get("Name") or f"attachment-{index}"),
                content_type=str(item.get("ContentType") or "application/octet-stream"),
                data=data,
                content_id=str(item.get("ContentID") or ""),
            )
        )
    raw = rebuild_mime(
        headers,
        text=_str(body, "TextBody"),
        html=_str(body, "HtmlBody"),
        attachments=attachments,
    )
    return raw, mail_from, rcpt_to


def email_payload(
    command: SendMessageCommand,
    *,
    from_address: str,
    from_name: str,
    message_stream: str,
    message_id_domain: str,
) -> dict[str, Any]:
    """A ``POST /email`` body for ``command``; bad content is a PermanentError.

    The gateway's message id goes in ``Metadata.gateway_message_id`` (Postmark
    echoes metadata in its delivery and bounce webhooks) and in our own
    ``Message-ID`` header.
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
    if not text and not html:
        raise PermanentError("nothing to send: no text or html", code="empty_message")
    sender = message.sender.address or from_address
    if "@" not in sender:
        raise PermanentError("no sender address", code="no_sender")
    headers = [
        {"Name": "Message-ID", "Value": outbound_message_id(command.message_id, message_id_domain)}
    ]
    references = list(content.references)
    if content.in_reply_to:
        headers.append({"Name": "In-Reply-To", "Value": content.in_reply_to})
        if content.in_reply_to not in references:
            references.append(content.in_reply_to)
    if references:
        headers.append({"Name": "References", "Value": " ".join(references)})
    for header in content.headers:
        if "\r" in header.value or "\n" in header.value:
            raise PermanentError(f"header {header.name!r} has a line break", code="invalid_header")
        headers.append({"Name": header.name, "Value": header.value})
    payload: dict[str, Any] = {
        "From": f'"{from_name}" <{sender}>' if from_name else sender,
        "To": ", ".join(r.address for r in message.recipients),
        "Subject": subject,
        "Headers": headers,
        "Metadata": {"gateway_message_id": command.message_id},
        "MessageStream": message_stream,
    }
    if text:
        payload["TextBody"] = text
    if html:
        payload["HtmlBody"] = html
    attachments = []
    for attachment in message.attachments:
        data, ctype = data_url_content(attachment)
        item = {
            "Name": attachment.filename or "attachment",
            "Content": base64.b64encode(data).decode(),
            "ContentType": ctype,
        }
        if attachment.content_id:
            item["ContentID"] = f"cid:{attachment.content_id}"
        attachments.append(item)
    if attachments:
        payload["Attachments"] = attachments
    return payload
