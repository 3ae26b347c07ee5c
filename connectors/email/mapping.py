"""Pure functions: a :class:`~connectors.email.mime.ParsedMail` to ``gateway.api.v1`` events.

Shared by every email connector (SMTP, IMAP and the providers' inbound webhooks):

- an ordinary mail is one ``message.received`` event with ``Email`` content;
- a delivery status notification is one ``message.status`` event per reported
  recipient (delivered / relayed -> DELIVERED, failed -> FAILED permanent,
  delayed -> QUEUED, not permanent);
- an auto-reply (out of office ...) is a ``message.status`` DELIVERED event
  for the mail it answers (the mailbox evidently got it), never a message;
- a message breaking the MIME caps becomes a ``message.quarantined`` event
  carrying the raw bytes, for the quarantine routing key.

Contract gaps, carried in ``attributes``: the envelope sender and recipients
(``email.mail_from``, ``email.rcpt_to``), Cc (``email.cc``), the auto-reply
reason (``email.auto_reply``) and the thread root (``email.thread_root``).
Attachment bytes have no field of their own: the whole raw message is in
``Event.raw`` (``message/rfc822``) and each ``Attachment`` names its part by
Content-ID, filename and SHA-256.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Sequence
from datetime import datetime

from connectors.email.mime import MailAddress, ParsedMail, thread_root
from gateway.api.v1.content_pb2 import Attachment, Email, Header
from gateway.api.v1.delivery_pb2 import DeliveryState, DeliveryStatus
from gateway.api.v1.envelope_pb2 import Event, RawPayload
from gateway.api.v1.message_pb2 import Direction, Message
from gateway.api.v1.participant_pb2 import Participant, ParticipantRole
from gateway.contract.ids import NAMESPACE, inbound_event_id
from gateway.contract.times import timestamp

CHANNEL = "email"
RFC822 = "message/rfc822"
S = DeliveryState

#: Headers kept verbatim in ``Email.headers`` (the rest are in ``Event.raw``).
MAX_KEPT_HEADERS = 200

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def outbound_message_id(message_id: str, domain: str) -> str:
    """The Message-ID header of a mail the gateway sends: ``<message id@domain>``."""
    return f"<{message_id}@{domain}>"


def gateway_message_id(header_id: str, domain: str) -> str:
    """The gateway message id inside one of our Message-IDs, else ``""``."""
    local, at, host = header_id.strip().strip("<>").partition("@")
    if not at or host.lower() != domain.lower() or not _UUID.match(local):
        return ""
    return local


def conversation_of(root_message_id: str) -> str:
    """Stable conversation id of an email thread, from its root Message-ID.

    Message-IDs are globally unique, so the thread is the conversation
    whichever of our mailboxes sees it.
    """
    return str(
        uuid.uuid5(NAMESPACE, "\x1f".join(("conversation", CHANNEL, "thread", root_message_id)))
    )


def _participant(address: MailAddress, role: ParticipantRole.ValueType) -> Participant:
    return Participant(
        channel=CHANNEL, address=address.address, display_name=address.name, role=role
    )


def _raw_id(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _envelope(
    event: Event, mail_from: str, rcpt_to: Sequence[str], mail: ParsedMail | None
) -> None:
    if mail_from:
        event.attributes["email.mail_from"] = mail_from
    if rcpt_to:
        event.attributes["email.rcpt_to"] = ",".join(rcpt_to)
    if mail is not None and mail.cc:
        event.attributes["email.cc"] = ",".join(a.address for a in mail.cc)


def message_event(
    mail: ParsedMail,
    *,
    provider: str,
    account: str,
    raw: bytes,
    received_at: datetime,
    mail_from: str = "",
    rcpt_to: Sequence[str] = (),
    message_id_domain: str = "",
) -> Event:
    """A ``message.received`` event for an ordinary inbound mail."""
    email = Email(
        subject=mail.subject,
        text=mail.text,
        html=mail.html,
        message_id=mail.message_id,
        in_reply_to=mail.in_reply_to,
        references=list(mail.references),
        quoted_text=mail.quoted_text,
        headers=[Header(name=n, value=v) for n, v in mail.headers[:MAX_KEPT_HEADERS]],
    )
    sender = mail.sender or (MailAddress(address=mail_from.lower()) if mail_from else None)
    recipients = [a.address for a in mail.to] or list(rcpt_to)
    message = Message(
        direction=Direction.DIRECTION_INBOUND,
        recipients=[
            Participant(channel=CHANNEL, address=r, role=ParticipantRole.PARTICIPANT_ROLE_BUSINESS)
            for r in recipients
        ],
        provider_message_id=mail.message_id,
        reply_to=mail.in_reply_to,
        email=email,
        attachments=[
            Attachment(
                content_type=a.content_type,
                size_bytes=a.size,
                filename=a.filename,
                sha256=a.sha256,
                content_id=a.content_id,
                inline=a.inline,
            )
            for a in mail.attachments
        ],
    )
    if sender is not None:
        message.sender.CopyFrom(_participant(sender, ParticipantRole.PARTICIPANT_ROLE_CUSTOMER))
    root = thread_root(mail)
    event = Event(
        id=inbound_event_id(provider, account, "message", mail.message_id or _raw_id(raw)),
        type="message.received",
        channel=CHANNEL,
        provider=provider,
        account=account,
        occurred_at=timestamp(mail.date or received_at),
        received_at=timestamp(received_at),
        conversation_id=conversation_of(root) if root else "",
        raw=RawPayload(content_type=RFC822, data=raw),
        message=message,
    )
    if root:
        event.attributes["email.thread_root"] = root
    if mail.reply_to:
        event.attributes["email.reply_to"] = ",".join(a.address for a in mail.reply_to)
    ours = gateway_message_id(mail.in_reply_to, message_id_domain) if message_id_domain else ""
    if ours:
        # A reply to a mail we sent: link it to that message.
        event.causation_id = ours
    _envelope(event, mail_from, rcpt_to, mail)
    return event


_DSN_STATES: dict[str, tuple[DeliveryState.ValueType, bool]] = {
    "delivered": (S.DELIVERY_STATE_DELIVERED, False),
    "relayed": (S.DELIVERY_STATE_DELIVERED, False),
    "expanded": (S.DELIVERY_STATE_DELIVERED, False),
    "failed": (S.DELIVERY_STATE_FAILED, True),
    "delayed": (S.DELIVERY_STATE_QUEUED, False),
}


def status_event(
    *,
    provider: str,
    account: str,
    kind: str,
    key: Sequence[str],
    status: DeliveryStatus,
    received_at: datetime,
    occurred_at: datetime | None,
    raw: RawPayload | None,
) -> Event:
    """A ``message.status`` event; its id derives from ``kind`` and ``key``."""
    event = Event(
        id=inbound_event_id(provider, account, kind, *key),
        type="message.status",
        channel=CHANNEL,
        provider=provider,
        account=account,
        occurred_at=timestamp(occurred_at or received_at),
        received_at=timestamp(received_at),
        causation_id=status.message_id,
        status=status,
    )
    if raw is not None:
        event.raw.CopyFrom(raw)
    return event


def status_events(
    mail: ParsedMail,
    *,
    provider: str,
    account: str,
    raw: bytes,
    received_at: datetime,
    message_id_domain: str = "",
) -> list[Event]:
    """``message.status`` events for a DSN (one per recipient) or an auto-reply."""
    own_id = mail.message_id or _raw_id(raw)
    payload = RawPayload(content_type=RFC822, data=raw)
    if mail.kind == "auto_reply":
        about = mail.in_reply_to or (mail.references[-1] if mail.references else "")
        status = DeliveryStatus(
            state=S.DELIVERY_STATE_DELIVERED,
            provider_status="auto_replied",
            reason_code="auto_reply",
            reason=mail.auto_reason,
            provider_message_id=about,
            message_id=gateway_message_id(about, message_id_domain) if message_id_domain else "",
            recipient=mail.sender.address if mail.sender else "",
        )
        event = status_event(
            provider=provider,
            account=account,
            kind="auto_reply",
            key=(own_id,),
            status=status,
            received_at=received_at,
            occurred_at=mail.date,
            raw=payload,
        )
        event.attributes["email.auto_reply"] = mail.auto_reason
        return [event]
    original = mail.dsn_original_message_id
    ours = gateway_message_id(original, message_id_domain) if message_id_domain and original else ""
    events: list[Event] = []
    for recipient in mail.dsn_recipients or ():
        state, permanent = _DSN_STATES.get(recipient.action, (S.DELIVERY_STATE_UNSPECIFIED, False))
        if state == S.DELIVERY_STATE_UNSPECIFIED:
            # An action RFC 3464 does not define: decide by the status class.
            if recipient.status.startswith("5"):
                state, permanent = S.DELIVERY_STATE_FAILED, True
            elif recipient.status.startswith("4"):
                state, permanent = S.DELIVERY_STATE_QUEUED, False
            elif recipient.status.startswith("2"):
                state, permanent = S.DELIVERY_STATE_DELIVERED, False
            else:
                continue
        status = DeliveryStatus(
            state=state,
            provider_status=recipient.action or "unknown",
            reason_code=recipient.status,
            reason=recipient.diagnostic,
            permanent=permanent,
            provider_message_id=original,
            message_id=ours,
            recipient=recipient.recipient,
        )
        events.append(
            status_event(
                provider=provider,
                account=account,
                kind="dsn",
                key=(own_id, recipient.recipient or "-", recipient.action or "-"),
                status=status,
                received_at=received_at,
                occurred_at=mail.date,
                raw=payload,
            )
        )
    return events


def events_for(
    mail: ParsedMail,
    *,
    provider: str,
    account: str,
    raw: bytes,
    received_at: datetime,
    mail_from: str = "",
    rcpt_to: Sequence[str] = (),
    message_id_domain: str = "",
) -> list[Event]:
    """The events one inbound mail stands for (a message, or statuses)."""
    if mail.kind == "message":
        return [
            message_event(
                mail,
                provider=provider,
                account=account,
                raw=raw,
                received_at=received_at,
                mail_from=mail_from,
                rcpt_to=rcpt_to,
                message_id_domain=message_id_domain,
            )
        ]
    events = status_events(
        mail,
        provider=provider,
        account=account,
        raw=raw,
        received_at=received_at,
        message_id_domain=message_id_domain,
    )
    for event in events:
        _envelope(event, mail_from, rcpt_to, None)
    return events


def quarantine_event(
    raw: bytes,
    *,
    provider: str,
    account: str,
    reason: str,
    detail: str,
    received_at: datetime,
    mail_from: str = "",
    rcpt_to: Sequence[str] = (),
) -> Event:
    """A ``message.quarantined`` event carrying a mail that broke the MIME caps."""
    event = Event(
        id=inbound_event_id(provider, account, "quarantine", _raw_id(raw)),
        type="message.quarantined",
        channel=CHANNEL,
        provider=provider,
        account=account,
        received_at=timestamp(received_at),
        occurred_at=timestamp(received_at),
        raw=RawPayload(content_type=RFC822, data=raw),
    )
    event.attributes["email.quarantine_reason"] = reason
    event.attributes["email.quarantine_detail"] = detail[:500]
    _envelope(event, mail_from, rcpt_to, None)
    return event


def interaction_event(
    *,
    provider: str,
    account: str,
    key: Sequence[str],
    interaction: str,
    recipient: str,
    provider_message_id: str,
    message_id: str,
    received_at: datetime,
    occurred_at: datetime | None,
    raw: RawPayload | None,
    url: str = "",
) -> Event:
    """A ``message.interaction`` event: an open, click, complaint or unsubscribe.

    These are not delivery states (an open pixel proves little, a click may be
    a link scanner), so they never move a message's status. The contract has
    no payload for them: an open carries a ``Read`` payload, every one names
    itself in ``email.interaction`` (and ``email.url`` for clicks).
    """
    event = Event(
        id=inbound_event_id(provider, account, "interaction", *key),
        type="message.interaction",
        channel=CHANNEL,
        provider=provider,
        account=account,
        occurred_at=timestamp(occurred_at or received_at),
        received_at=timestamp(received_at),
        causation_id=message_id,
    )
    if interaction == "open":
        event.read.reader.CopyFrom(
            Participant(
                channel=CHANNEL, address=recipient, role=ParticipantRole.PARTICIPANT_ROLE_CUSTOMER
            )
        )
        event.read.provider_message_id = provider_message_id
    event.attributes["email.interaction"] = interaction
    event.attributes["email.recipient"] = recipient
    if provider_message_id:
        event.attributes["email.provider_message_id"] = provider_message_id
    if message_id:
        event.attributes["email.message_id"] = message_id
    if url:
        event.attributes["email.url"] = url[:2000]
    if raw is not None:
        event.raw.CopyFrom(raw)
    return event
