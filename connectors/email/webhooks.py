"""Pieces shared by the providers' inbound-mail webhooks.

Providers hand us an inbound mail either raw (SendGrid ``send_raw``'s
``email`` field, Mailgun's ``body-mime``, Postmark's ``RawEmail``) or split
into fields (headers, text, html, attachments). Split mails are rebuilt into
one RFC 5322 message (:func:`rebuild_mime`) so every path goes through the
same hostile-mail-safe normalizer and mapping as SMTP.

``multipart/form-data`` bodies are split by :func:`split_form_data`, which is
CPU-bound on big bodies and so runs in the MIME process pool too.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser

from gateway.contract import AuthError, WebhookRequest

#: Headers the rebuilt message's own MIME structure replaces.
_MIME_HEADERS = {"content-type", "content-transfer-encoding", "mime-version"}


@dataclass(frozen=True, kw_only=True)
class FormPart:
    """One field of a ``multipart/form-data`` body."""

    name: str
    data: bytes
    filename: str | None = None
    content_type: str = "text/plain"

    @property
    def text(self) -> str:
        """The value as text (UTF-8, undecodable bytes replaced)."""
        return self.data.decode("utf-8", errors="replace")


class FormDataError(ValueError):
    """A body that is not well-formed ``multipart/form-data``."""


def split_form_data(content_type: str, body: bytes, max_parts: int) -> list[FormPart]:
    """The fields of a ``multipart/form-data`` body, in order."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise FormDataError(f"expected multipart/form-data, got {content_type[:100]!r}")
    header = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode(
        "latin-1", "replace"
    )
    message = BytesParser(policy=policy.HTTP).parsebytes(header + body)
    if not message.is_multipart():
        raise FormDataError("multipart/form-data body without parts (boundary missing?)")
    parts: list[FormPart] = []
    payload = message.get_payload()
    assert isinstance(payload, list)
    if len(payload) > max_parts:
        raise FormDataError(f"more than {max_parts} form fields")
    for part in payload:
        if not isinstance(part, Message):
            raise FormDataError("form field is not a MIME part")
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            raise FormDataError("form field without a name")
        data = part.get_payload(decode=True)
        filename = part.get_filename()
        parts.append(
            FormPart(
                name=name,
                data=data if isinstance(data, bytes) else b"",
                filename=filename,
                content_type=part.get_content_type(),
            )
        )
    return parts


@dataclass(frozen=True, kw_only=True)
class Attached:
    """An attachment a provider delivered as a separate field."""

    filename: str
    content_type: str
    data: bytes
    content_id: str = ""


def _header_block(headers: Sequence[tuple[str, str]]) -> bytes:
    holder = EmailMessage(policy=policy.SMTP)
    dropped = 0
    for name, value in headers:
        if name.lower() in _MIME_HEADERS or not name or ":" in name:
            continue
        # Values come decoded (Mailgun, Postmark) or raw (SendGrid); folding
        # whitespace is collapsed and non-ASCII re-encoded as RFC 2047 words.
        try:
            holder[name.strip()] = " ".join(value.split())
        except ValueError:  # a header the policy cannot hold (a repeated unique one, say)
            dropped += 1
    if dropped:
        # Said in the mail itself, so a reader of the event sees it.
        holder["X-Gateway-Dropped-Headers"] = str(dropped)
    return holder.as_bytes().split(b"\r\n\r\n", 1)[0] + b"\r\n"


def raw_header_pairs(block: str) -> list[tuple[str, str]]:
    """``(name, value)`` pairs of a raw header block (SendGrid's ``headers`` field)."""
    pairs: list[tuple[str, str]] = []
    for line in block.replace("\r\n", "\n").split("\n"):
        if not line:
            continue
        if line[0] in " \t" and pairs:
            name, value = pairs[-1]
            pairs[-1] = (name, value + " " + line.strip())
            continue
        name, sep, value = line.partition(":")
        if sep:
            pairs.append((name.strip(), value.strip()))
    return pairs


def rebuild_mime(
    headers: Sequence[tuple[str, str]],
    *,
    text: str,
    html: str,
    attachments: Sequence[Attached] = (),
) -> bytes:
    """One RFC 5322 message from a provider's split fields."""
    body = EmailMessage(policy=policy.SMTP)
    body.set_content(text or "")
    if html:
        body.add_alternative(html, subtype="html")
    for attachment in attachments:
        maintype, _, subtype = attachment.content_type.partition("/")
        body.add_attachment(
            attachment.data,
            maintype=maintype or "application",
            subtype=subtype or "octet-stream",
            filename=attachment.filename or "attachment",
            cid=f"<{attachment.content_id.strip('<>')}>" if attachment.content_id else None,
            disposition="inline" if attachment.content_id else "attachment",
        )
    if "MIME-Version" not in body:
        body["MIME-Version"] = "1.0"
    return _header_block(headers) + body.as_bytes()


def verify_basic_auth(request: WebhookRequest, username: str, password: str) -> None:
    """Raise :class:`AuthError` (403) unless ``Authorization: Basic`` matches.

    Both parts are compared in constant time, and both always, so timing
    says nothing about which one was wrong.
    """
    scheme, _, encoded = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "basic" or not encoded:
        raise AuthError("missing basic credentials", status=403)
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise AuthError("malformed basic credentials", status=403) from exc
    user, sep, secret = decoded.partition(":")
    ok_user = hmac.compare_digest(user.encode(), username.encode())
    ok_secret = hmac.compare_digest(secret.encode(), password.encode())
    if not sep or not (ok_user and ok_secret):
        raise AuthError("invalid basic credentials", status=403)
