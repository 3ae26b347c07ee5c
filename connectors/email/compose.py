"""A ``SendMessageCommand`` as an RFC 5322 message (outbound MIME).

- text and HTML make ``multipart/alternative`` (HTML alone gets a plain-text
  alternative with the tags stripped); inline parts with a Content-ID go in
  ``multipart/related`` beside the HTML, other attachments in ``multipart/mixed``;
- ``Message-ID`` is ``<gateway message id@message_id_domain>``, so replies,
  auto-replies and bounces map back to the message
  (:func:`connectors.email.mapping.gateway_message_id`);
- ``In-Reply-To`` / ``References`` come from the ``Email`` content, so a reply
  lands in the customer's thread.

Attachments must be self-contained ``data:`` URLs (base64): the gateway has no
SSRF-safe media fetcher yet, and fetching arbitrary URLs from the mail
connector would be one.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, formataddr
from urllib.parse import unquote_to_bytes

import nh3

from connectors.email.mapping import outbound_message_id
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.content_pb2 import Attachment
from gateway.contract import PermanentError

#: Headers a command may not set through ``Email.headers``: the composer owns them.
_RESERVED = {
    "from",
    "to",
    "cc",
    "bcc",
    "subject",
    "message-id",
    "in-reply-to",
    "references",
    "date",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "content-disposition",
}


def data_url_content(attachment: Attachment) -> tuple[bytes, str]:
    """Content and media type of a ``data:`` URL attachment."""
    url = attachment.url
    if not url.startswith("data:"):
        raise PermanentError(
            f"attachment {attachment.filename or url[:40]!r}: only data: URLs can be attached "
            "(no media fetcher)",
            code="unsupported_attachment",
        )
    meta, comma, payload = url[5:].partition(",")
    if not comma:
        raise PermanentError("malformed data: URL attachment", code="invalid_attachment")
    media_type, *params = meta.split(";")
    try:
        data = (
            base64.b64decode(payload, validate=True)
            if "base64" in params
            else unquote_to_bytes(payload)
        )
    except (binascii.Error, ValueError) as exc:
        raise PermanentError(f"undecodable data: URL: {exc}", code="invalid_attachment") from exc
    return data, attachment.content_type or media_type or "application/octet-stream"


def compose(
    command: SendMessageCommand,
    *,
    from_address: str,
    from_name: str = "",
    message_id_domain: str,
    now: datetime,
) -> EmailMessage:
    """Build the message to submit; bad content is a :class:`PermanentError`."""
    message = command.message
    if not message.recipients:
        raise PermanentError("an email needs at least one recipient", code="invalid_recipient")
    content = message.email
    if message.HasField("email"):
        subject, text, html = content.subject, content.text, content.html
    elif message.HasField("text"):
        subject, text, html = "", message.text.body, ""
    else:
        raise PermanentError("email sends text or email content only", code="unsupported_content")
    if not text and html:
        text = nh3.clean(html, tags=set()).strip()
    if not text and not html and not message.attachments:
        raise PermanentError("nothing to send: no text, html or attachment", code="empty_message")
    msg = EmailMessage()
    try:
        sender = message.sender.address or from_address
        name = message.sender.display_name or from_name
        msg["From"] = formataddr((name, sender)) if name else sender
        msg["To"] = ", ".join(
            formataddr((r.display_name, r.address)) if r.display_name else r.address
            for r in message.recipients
        )
        msg["Subject"] = subject
        msg["Date"] = format_datetime(now)
        msg["Message-ID"] = outbound_message_id(command.message_id, message_id_domain)
        references = list(content.references)
        if content.in_reply_to:
            msg["In-Reply-To"] = content.in_reply_to
            if content.in_reply_to not in references:
                references.append(content.in_reply_to)
        if references:
            msg["References"] = " ".join(references)
        for header in content.headers:
            if header.name.lower() in _RESERVED:
                raise PermanentError(
                    f"header {header.name!r} is set by the gateway", code="reserved_header"
                )
            msg[header.name] = header.value
    except (ValueError, TypeError) as exc:
        # policy.default refuses CR/LF in header values (header injection).
        raise PermanentError(f"invalid header: {exc}", code="invalid_header") from exc
    msg.set_content(text or "")
    inline = [a for a in message.attachments if a.inline and a.content_id]
    if html:
        msg.add_alternative(html, subtype="html")
        html_part = next(
            part for part in msg.iter_parts() if part.get_content_type() == "text/html"
        )
        assert isinstance(html_part, EmailMessage)
        for attachment in inline:
            data, ctype = data_url_content(attachment)
            maintype, _, subtype = ctype.partition("/")
            html_part.add_related(
                data,
                maintype=maintype,
                subtype=subtype or "octet-stream",
                cid=f"<{attachment.content_id}>",
                filename=attachment.filename or None,
                disposition="inline",
            )
    for attachment in message.attachments:
        if html and attachment in inline:
            continue
        data, ctype = data_url_content(attachment)
        maintype, _, subtype = ctype.partition("/")
        msg.add_attachment(
            data,
            maintype=maintype,
            subtype=subtype or "octet-stream",
            filename=attachment.filename or "attachment",
            cid=f"<{attachment.content_id}>" if attachment.content_id else None,
        )
    return msg
