"""Real-world-shaped mails, built in code (no fixtures on disk to drift).

Each builder returns raw RFC 5322 bytes shaped like what mail clients and
servers actually send: several charsets and transfer encodings, RFC 2047 /
RFC 2231 words, nested multiparts, calendar invites, forwards, DSNs,
auto-replies; and the MIME bombs the parser must refuse.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.header import Header
from email.message import EmailMessage
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime

DATE = format_datetime(datetime(2026, 11, 2, 9, 30, tzinfo=UTC))


def plain_utf8() -> bytes:
    """A simple UTF-8 mail with a quoted reply (Gmail style)."""
    msg = EmailMessage()
    msg["From"] = "=?utf-8?b?SsO8cmdlbiBNw7xsbGVy?= <Juergen.Mueller@Example.DE>"
    msg["To"] = "Support <support@shop.example>"
    msg["Subject"] = "=?utf-8?q?Re=3A_Bestellung_=C3=BCberf=C3=A4llig?="
    msg["Date"] = DATE
    msg["Message-ID"] = "<reply-1@mail.example.de>"
    msg["In-Reply-To"] = "<root-1@shop.example>"
    msg["References"] = "<root-1@shop.example>"
    msg.set_content(
        "Hallo, die Lieferung fehlt noch.\n\n"
        "On Mon, Nov 2, 2026 at 9:00 AM Support <support@shop.example> wrote:\n"
        "> Ihre Bestellung ist unterwegs.\n"
        "> Grüße\n"
    )
    return msg.as_bytes()


def iso_2022_jp() -> bytes:
    """Japanese in ISO-2022-JP, as Japanese mobile carriers still send it."""
    body = "お世話になっております。注文について質問があります。"
    part = MIMEText(body, "plain", "iso-2022-jp")
    part["From"] = Header("山田", "iso-2022-jp").encode() + " <yamada@example.jp>"
    part["To"] = "support@shop.example"
    part["Subject"] = Header("注文の件", "iso-2022-jp").encode()
    part["Message-ID"] = "<jp-1@example.jp>"
    part["Date"] = DATE
    return part.as_bytes()


def koi8_r_quoted_printable() -> bytes:
    """Russian in KOI8-R, quoted-printable, with an Outlook-style quote."""
    text = (
        "Здравствуйте, заказ не пришёл.\n\n"
        "From: Support <support@shop.example>\n"
        "Sent: Monday, November 2, 2026 9:00 AM\n"
        "Subject: Заказ\n\nВаш заказ отправлен.\n"  # noqa: RUF001
    )
    msg = EmailMessage()
    msg["From"] = Header("Иван", "koi8-r").encode() + " <ivan@example.ru>"
    msg["To"] = "support@shop.example"
    msg["Subject"] = Header("Заказ 42", "koi8-r").encode()
    msg["Message-ID"] = "<ru-1@example.ru>"
    msg.set_content(text, charset="koi8-r", cte="quoted-printable")
    return msg.as_bytes()


def windows_1252_latin() -> bytes:
    """A Windows client's cp1252 mail with a French quote header."""
    raw = (
        "From: =?windows-1252?q?Ren=E9e_Lef=E8vre?= <renee@example.fr>\r\n"
        "To: support@shop.example\r\n"
        "Subject: =?windows-1252?q?Probl=E8me_=96_commande?=\r\n"
        "Message-ID: <fr-1@example.fr>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: text/plain; charset="windows-1252"\r\n'
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode("ascii") + (
        "Bonjour, le colis est arrivé abîmé \u2013 merci.\r\n\r\n"
        "Le lun. 2 nov. 2026 à 09:00, Support <support@shop.example> a écrit :\r\n"
        "> Votre commande est expédiée.\r\n"
    ).encode("cp1252")
    return raw


def nested_html_with_inline_and_attachments() -> bytes:
    """mixed( related( alternative(text, html), inline image ), pdf, xlsx ) with
    an RFC 2231 encoded filename, as Apple Mail / Outlook produce."""
    msg = EmailMessage()
    msg["From"] = "Ana <ana@example.es>"
    msg["To"] = "support@shop.example, Sales <sales@shop.example>"
    msg["Cc"] = "boss@example.es"
    msg["Subject"] = "Factura con logo"
    msg["Message-ID"] = "<es-1@example.es>"
    msg.set_content("Adjunto la factura.\n")
    msg.add_alternative(
        '<html><body><p onclick="steal()">Adjunto la <b>factura</b>.</p>'
        '<img src="cid:logo@es"><script>alert(1)</script>'
        '<a href="javascript:alert(2)">x</a></body></html>',
        subtype="html",
    )
    html_part = next(p for p in msg.iter_parts() if p.get_content_type() == "text/html")
    assert isinstance(html_part, EmailMessage)
    html_part.add_related(b"\x89PNG\r\n\x1a\nlogo", "image", "png", cid="<logo@es>")
    msg.add_attachment(b"%PDF-1.7 factura", "application", "pdf", filename="factura año.pdf")
    msg.add_attachment(
        b"PK\x03\x04sheet",
        "application",
        "vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        filename="pedido.xlsx",
    )
    return msg.as_bytes()


def calendar_invite() -> bytes:
    """An Outlook-style meeting request: alternative(text, html, text/calendar)."""
    outer = MIMEMultipart("mixed")
    outer["From"] = "Organizer <org@example.com>"
    outer["To"] = "support@shop.example"
    outer["Subject"] = "Invitation: Review @ Tue 3 Nov 2026 10:00"
    outer["Message-ID"] = "<cal-1@example.com>"
    alt = MIMEMultipart("alternative")
    alt.attach(MIMEText("You are invited to Review.", "plain", "utf-8"))
    alt.attach(MIMEText("<p>You are invited to <i>Review</i>.</p>", "html", "utf-8"))
    ics = (
        "BEGIN:VCALENDAR\r\nMETHOD:REQUEST\r\nPRODID:-//Example//EN\r\nVERSION:2.0\r\n"
        "BEGIN:VEVENT\r\nUID:cal-1@example.com\r\nDTSTART:20261103T100000Z\r\n"
        "DTEND:20261103T110000Z\r\nSUMMARY:Review\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    )
    cal = MIMEText(ics, "calendar", "utf-8")
    cal.set_param("method", "REQUEST")
    alt.attach(cal)
    outer.attach(alt)
    invite = MIMEBase("application", "ics")
    invite.set_payload(ics.encode())
    invite.add_header("Content-Disposition", "attachment", filename="invite.ics")
    outer.attach(invite)
    return outer.as_bytes()


def forwarded() -> bytes:
    """A mail forwarded as an attachment (message/rfc822) with a note."""
    inner = EmailMessage()
    inner["From"] = "customer@example.org"
    inner["To"] = "colleague@example.net"
    inner["Subject"] = "Original complaint"
    inner["Message-ID"] = "<inner-1@example.org>"
    inner.set_content("The inner text must not become the body.")
    inner.add_attachment(b"inner-bytes", "application", "octet-stream", filename="inner.bin")
    outer = EmailMessage()
    outer["From"] = "colleague@example.net"
    outer["To"] = "support@shop.example"
    outer["Subject"] = "Fwd: Original complaint"
    outer["Message-ID"] = "<fwd-1@example.net>"
    outer.set_content("FYI, see the attached mail.")
    outer.add_attachment(inner)
    return outer.as_bytes()


def dsn(action: str = "failed", status: str = "5.1.1", original: str = "") -> bytes:
    """A Postfix-style bounce: multipart/report; report-type=delivery-status."""
    original = original or "<11111111-2222-4333-8444-555555555555@mail.shop.example>"
    return (
        "From: MAILER-DAEMON@mx.example.org (Mail Delivery System)\r\n"
        "To: support@shop.example\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Message-ID: <dsn-{action}-{status}@mx.example.org>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        '\tboundary="B0UND"\r\n\r\n'
        "--B0UND\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        "I'm sorry to have to inform you that your message could not be delivered.\r\n\r\n"
        "--B0UND\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.org\r\n"
        "Arrival-Date: Mon,  2 Nov 2026 09:30:00 +0000 (UTC)\r\n\r\n"
        "Final-Recipient: rfc822; Nobody@Example.org\r\n"
        "Original-Recipient: rfc822;nobody@example.org\r\n"
        f"Action: {action}\r\nStatus: {status}\r\n"
        "Remote-MTA: dns; mx2.example.org\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 <nobody@example.org>: Recipient address rejected\r\n"
        "\r\n"
        "--B0UND\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: support@shop.example\r\nTo: nobody@example.org\r\nMessage-ID: {original}\r\n"
        "Subject: Your order\r\n\r\n"
        "--B0UND--\r\n"
    ).encode()


def auto_reply(in_reply_to: str) -> bytes:
    """An out-of-office reply (RFC 3834 Auto-Submitted)."""
    msg = EmailMessage()
    msg["From"] = "away@example.org"
    msg["To"] = "support@shop.example"
    msg["Subject"] = "Automatic reply: Your order"
    msg["Message-ID"] = "<ooo-1@example.org>"
    msg["In-Reply-To"] = in_reply_to
    msg["Auto-Submitted"] = "auto-replied"
    msg["X-Autoreply"] = "yes"
    msg.set_content("I am out of the office until Monday.")
    return msg.as_bytes()


CORPUS = {
    "plain_utf8": plain_utf8,
    "iso_2022_jp": iso_2022_jp,
    "koi8_r": koi8_r_quoted_printable,
    "windows_1252": windows_1252_latin,
    "nested": nested_html_with_inline_and_attachments,
    "calendar": calendar_invite,
    "forwarded": forwarded,
    "dsn": dsn,
}

# -- MIME bombs -----------------------------------------------------------------


def bomb_many_parts(parts: int = 10_000) -> bytes:
    """One multipart with ``parts`` tiny parts."""
    body = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(parts))
    return (
        b"Subject: parts\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" + body + b"--b--\r\n"
    )


def bomb_deep(depth: int = 1000) -> bytes:
    """Multiparts nested ``depth`` deep, each with its own boundary."""
    raw = b"Content-Type: text/plain\r\n\r\nbottom\r\n"
    for level in range(depth):
        boundary = b"d%d" % level
        raw = (
            b'Content-Type: multipart/mixed; boundary="'
            + boundary
            + b'"\r\n\r\n--'
            + boundary
            + b"\r\n"
            + raw
            + b"\r\n--"
            + boundary
            + b"--\r\n"
        )
    return b"Subject: deep\r\n" + raw


def bomb_deep_rfc822(depth: int = 1000) -> bytes:
    """message/rfc822 nested ``depth`` deep (no boundaries to count)."""
    raw = b"Subject: bottom\r\n\r\nbottom\r\n"
    for _ in range(depth):
        raw = b"Content-Type: message/rfc822\r\n\r\n" + raw
    return b"Subject: deep822\r\n" + raw


def bomb_huge_header(size: int = 1 << 20) -> bytes:
    """One 1 MB header field (folded into 900-byte lines, as SMTP allows)."""
    chunk = b"a" * 900
    lines = [chunk] * (size // len(chunk))
    return b"Subject: " + b"\r\n ".join(lines) + b"\r\n\r\nbody\r\n"


def bomb_encoded_words(words: int = 50_000) -> bytes:
    """``words`` RFC 2047 encoded words spread over many short headers."""
    per_header = 25
    headers = b"".join(
        b"X-Words-%d: " % i + b" ".join([b"=?utf-8?q?=C3=A9t=C3=A9?="] * per_header) + b"\r\n"
        for i in range(words // per_header)
    )
    return b"Subject: words\r\n" + headers + b"\r\nbody\r\n"


BOMBS = {
    "10000_parts": (bomb_many_parts, "too_many_parts"),
    "depth_1000": (bomb_deep, "too_many_parts"),
    "depth_1000_rfc822": (bomb_deep_rfc822, "too_deep"),
    "1mb_header": (bomb_huge_header, "header_too_long"),
    "50000_encoded_words": (bomb_encoded_words, "too_many_encoded_words"),
}
