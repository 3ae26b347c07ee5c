"""Mailgun payloads -> gateway.api.v1: pure functions, no I/O.

Event webhooks (JSON ``{"signature": {...}, "event-data": {...}}``):
https://documentation.mailgun.com/docs/mailgun/user-manual/events/webhooks
Routes' ``forward()`` (form fields, or ``body-mime`` when the route URL ends in ``mime``):
https://documentation.mailgun.com/docs/mailgun/user-manual/receive-forward-store/
"""

from __future__ import annotations

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
from connectors.email.webhooks import Attached, FormPart, rebuild_mime
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.content_pb2 import Email
from gateway.api.v1.delivery_pb2 import DeliveryState, DeliveryStatus
from gateway.api.v1.envelope_pb2 import Event, RawPayload
from gateway.contract import BadRequestError, PermanentError

PROVIDER = "mailgun"
S = DeliveryState

STATES: dict[str, tuple[DeliveryState.ValueType, bool]] = {
    "accepted": (S.DELIVERY_STATE_QUEUED, False),
    "delivered": (S.DELIVERY_STATE_DELIVERED, False),
    "rejected": (S.DELIVERY_STATE_FAILED, True),
}
INTERACTIONS = {"opened", "clicked", "unsubscribed", "complained"}


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def event_signature(body: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``event-data`` and ``signature`` objects of an event webhook."""
    if not isinstance(body, dict):
        raise BadRequestError("Mailgun event webhook body must be a JSON object")
    data, signature = body.get("event-data"), body.get("signature")
    if not isinstance(data, dict) or not isinstance(signature, dict):
        raise BadRequestError("Mailgun event webhook lacks event-data or signature")
    return data, {k: str(v) for k, v in signature.items() if isinstance(v, str | int)}


def event(
    data: dict[str, Any], *, account: str, received_at: datetime, raw: bytes, message_id_domain: str
) -> Event:
    """One Mailgun event as a status or interaction event."""
    name, event_id = data.get("event"), data.get("id")
    recipient = str(data.get("recipient") or "").lower()
    if not isinstance(name, str) or not isinstance(event_id, str) or not event_id:
        raise BadRequestError("Mailgun event lacks event or id")
    message = _object(data.get("message"))
    headers = _object(message.get("headers"))
    header_id = str(headers.get("message-id") or "")
    variables = data.get("user-variables")
    ours = ""
    if isinstance(variables, dict) and isinstance(variables.get("gateway_message_id"), str):
        ours = variables["gateway_message_id"]
    elif header_id and message_id_domain:
        ours = gateway_message_id(header_id, message_id_domain)
    stamp = data.get("timestamp")
    when = (
        datetime.fromtimestamp(stamp, UTC)
        if isinstance(stamp, int | float) and not isinstance(stamp, bool)
        else None
    )
    payload = RawPayload(content_type="application/json", data=raw)
    provider_id = f"<{header_id.strip('<>')}>" if header_id else ""
    if name in STATES or name == "failed":
        delivery = _object(data.get("delivery-status"))
        if name == "failed":
            permanent = data.get("severity") == "permanent"
            # A temporary failure is a deferral: Mailgun keeps retrying.
            state = S.DELIVERY_STATE_FAILED if permanent else S.DELIVERY_STATE_QUEUED
        else:
            state, permanent = STATES[name]
        status = DeliveryStatus(
            state=state,
            provider_status=name if name != "failed" else f"failed:{data.get('severity', '')}",
            reason_code=str(delivery.get("code") or data.get("reason") or ""),
            reason=str(delivery.get("description") or delivery.get("message") or "")[:1000],
            permanent=permanent,
            provider_message_id=provider_id,
            message_id=ours,
            recipient=recipient,
        )
        return status_event(
            provider=PROVIDER,
            account=account,
            kind="event",
            key=(event_id,),
            status=status,
            received_at=received_at,
            occurred_at=when,
            raw=payload,
        )
    return interaction_event(
        provider=PROVIDER,
        account=account,
        key=(event_id,),
        interaction={"opened": "open", "clicked": "click"}.get(name, name)
        if name in INTERACTIONS
        else f"other:{name}",
        recipient=recipient,
        provider_message_id=provider_id,
        message_id=ours,
        received_at=received_at,
        occurred_at=when,
        raw=payload,
        url=str(data.get("url") or ""),
    )


def _value(fields: Sequence[FormPart], name: str) -> str:
    return next((p.text for p in fields if p.name == name and p.filename is None), "")


def signature_fields(fields: Sequence[FormPart]) -> tuple[str, str, str]:
    """``timestamp``, ``token`` and ``signature`` of a route forward."""
    return _value(fields, "timestamp"), _value(fields, "token"), _value(fields, "signature")


def inbound_mail(fields: Sequence[FormPart]) -> tuple[bytes, str, list[str]]:
    """The raw mail of a route forward, with envelope sender and recipients."""
    mail_from = _value(fields, "sender").lower()
    rcpt_to = [r.strip().lower() for r in _value(fields, "recipient").split(",") if r.strip()]
    mime = next((p.data for p in fields if p.name == "body-mime"), b"")
    if mime:
        return mime, mail_from, rcpt_to
    headers_json = _value(fields, "message-headers")
    try:
        pairs = json.loads(headers_json) if headers_json else []
    except ValueError as exc:
        raise BadRequestError(f"message-headers is not JSON: {exc}") from exc
    if not isinstance(pairs, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs
    ):
        raise BadRequestError("message-headers must be a list of [name, value] pairs")
    headers = [(name, value) for name, value in pairs]
    if not headers:
        headers = [
            ("From", _value(fields, "from")),
            ("Subject", _value(fields, "subject")),
            ("Message-ID", _value(fields, "Message-Id")),
        ]
    try:
        content_ids = json.loads(_value(fields, "content-id-map") or "{}")
    except ValueError:
        content_ids = {}
    cid_of = (
        {v: k.strip("<>") for k, v in content_ids.items()} if isinstance(content_ids, dict) else {}
    )
    attachments = [
        Attached(
            filename=p.filename or p.name,
            content_type=p.content_type,
            data=p.data,
            content_id=str(cid_of.get(p.name, "")),
        )
        for p in fields
        if p.filename is not None
    ]
    raw = rebuild_mime(
        headers,
        text=_value(fields, "body-plain"),
        html=_value(fields, "body-html"),
        attachments=attachments,
    )
    return raw, mail_from, rcpt_to


def send_form(
    command: SendMessageCommand, *, from_address: str, from_name: str, message_id_domain: str
) -> tuple[list[tuple[str, str]], list[tuple[str, bytes, str, str]]]:
    """Form fields and files of a Messages API send; bad content is a PermanentError.

    The gateway's message id is the user variable ``gateway_message_id``
    (echoed in every event's ``user-variables``) and our own Message-Id.
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
    fields = [("from", f'"{from_name}" <{sender}>' if from_name else sender)]
    fields += [("to", r.address) for r in message.recipients]
    fields.append(("subject", subject))
    if text:
        fields.append(("text", text))
    if html:
        fields.append(("html", html))
    fields.append(("h:Message-Id", outbound_message_id(command.message_id, message_id_domain)))
    references = list(content.references)
    if content.in_reply_to:
        fields.append(("h:In-Reply-To", content.in_reply_to))
        if content.in_reply_to not in references:
            references.append(content.in_reply_to)
    if references:
        fields.append(("h:References", " ".join(references)))
    for header in content.headers:
        if "\r" in header.value or "\n" in header.value:
            raise PermanentError(f"header {header.name!r} has a line break", code="invalid_header")
        fields.append((f"h:{header.name}", header.value))
    fields.append(("v:gateway_message_id", command.message_id))
    files = []
    for attachment in message.attachments:
        data, ctype = data_url_content(attachment)
        inline = attachment.inline and attachment.content_id
        # Mailgun names an inline part's Content-ID after its filename.
        filename = attachment.content_id if inline else (attachment.filename or "attachment")
        files.append(("inline" if inline else "attachment", data, filename, ctype))
    return fields, files
