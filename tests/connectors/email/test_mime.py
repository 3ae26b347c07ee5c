"""MIME normalization on the corpus, and the hostile-mail caps."""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, datetime

import pytest

from connectors.email import mapping
from connectors.email.mime import MimeLimitError, MimeLimits, parse, split_quoted, thread_root
from gateway.api.v1.delivery_pb2 import DeliveryState
from tests.connectors.email import corpus

NOW = datetime(2026, 11, 2, 10, 0, tzinfo=UTC)
S = DeliveryState


@pytest.mark.parametrize("name", sorted(corpus.CORPUS))
def test_every_corpus_mail_parses_with_a_sender_subject_and_body(name: str) -> None:
    mail = parse(corpus.CORPUS[name]())
    assert mail.sender is not None
    assert "@" in mail.sender.address
    assert mail.sender.address == mail.sender.address.lower()
    assert mail.subject
    assert mail.text
    assert "\ufffd" not in mail.text + mail.subject  # every charset decoded cleanly


def test_rfc2047_and_charsets_are_decoded() -> None:
    jp = parse(corpus.iso_2022_jp())
    assert jp.subject == "注文の件"
    assert jp.sender is not None
    assert jp.sender.name == "山田"
    assert jp.text.startswith("お世話になっております")
    ru = parse(corpus.koi8_r_quoted_printable())
    assert ru.subject == "Заказ 42"
    assert ru.text == "Здравствуйте, заказ не пришёл."
    fr = parse(corpus.windows_1252_latin())
    assert fr.subject == "Problème \u2013 commande"
    assert fr.sender is not None
    assert fr.sender.name == "Renée Lefèvre"
    de = parse(corpus.plain_utf8())
    assert de.subject == "Re: Bestellung überfällig"


def test_quoted_replies_are_split_off_in_several_styles() -> None:
    de = parse(corpus.plain_utf8())
    assert de.text == "Hallo, die Lieferung fehlt noch."
    assert de.quoted_text.startswith("On Mon, Nov 2, 2026")
    assert "> Ihre Bestellung ist unterwegs." in de.quoted_text
    fr = parse(corpus.windows_1252_latin())
    assert fr.text.endswith("merci.")
    assert fr.quoted_text.startswith("Le lun. 2 nov. 2026")
    ru = parse(corpus.koi8_r_quoted_printable())
    assert ru.quoted_text.startswith("From: Support <support@shop.example>")
    new, quoted = split_quoted("Thanks!\n\n> earlier line\n> another\n")
    assert (new, quoted) == ("Thanks!", "> earlier line\n> another")
    assert split_quoted("No quote here.\n-- \nSignature\n") == (
        "No quote here.\n-- \nSignature",
        "",
    )


def test_nested_multipart_keeps_every_part_and_sanitizes_html() -> None:
    raw = corpus.nested_html_with_inline_and_attachments()
    mail = parse(raw)
    assert mail.text == "Adjunto la factura."
    assert "<script" not in mail.html
    assert "onclick" not in mail.html
    assert "javascript:" not in mail.html
    assert 'src="cid:logo@es"' in mail.html  # inline images keep working
    assert "<b>factura</b>" in mail.html
    by_type = {a.content_type: a for a in mail.attachments}
    assert len(mail.attachments) == 3
    logo = by_type["image/png"]
    assert logo.inline
    assert logo.content_id == "logo@es"
    assert logo.size == len(b"\x89PNG\r\n\x1a\nlogo")

    assert logo.sha256 == hashlib.sha256(b"\x89PNG\r\n\x1a\nlogo").hexdigest()
    pdf = by_type["application/pdf"]
    assert pdf.filename == "factura año.pdf"
    assert not pdf.inline
    assert [a.address for a in mail.to] == ["support@shop.example", "sales@shop.example"]
    assert [a.address for a in mail.cc] == ["boss@example.es"]


def test_calendar_invite_keeps_the_ics_parts() -> None:
    mail = parse(corpus.calendar_invite())
    types = sorted(a.content_type for a in mail.attachments)
    assert types == ["application/ics", "text/calendar"]
    assert mail.text == "You are invited to Review."
    assert "<i>Review</i>" in mail.html


def test_forwarded_mail_is_an_attachment_not_the_body() -> None:
    mail = parse(corpus.forwarded())
    assert mail.text == "FYI, see the attached mail."
    (attached,) = mail.attachments
    assert attached.content_type == "message/rfc822"
    assert attached.size > 0
    assert "inner text" not in mail.text


def test_threading_gives_one_conversation_per_thread() -> None:
    root = parse(b"Message-ID: <root-1@shop.example>\r\nSubject: a\r\n\r\nx\r\n")
    reply = parse(corpus.plain_utf8())  # In-Reply-To/References: <root-1@shop.example>
    deeper = parse(
        b"Message-ID: <r2@x>\r\nIn-Reply-To: <reply-1@mail.example.de>\r\n"
        b"References: <root-1@shop.example> <reply-1@mail.example.de>\r\nSubject: b\r\n\r\ny\r\n"
    )
    roots = {thread_root(m) for m in (root, reply, deeper)}
    assert roots == {"<root-1@shop.example>"}
    ids = {mapping.conversation_of(r) for r in roots}
    assert len(ids) == 1
    other = parse(b"Message-ID: <other@x>\r\nSubject: c\r\n\r\nz\r\n")
    assert mapping.conversation_of(thread_root(other)) not in ids


def test_message_event_maps_to_the_contract() -> None:
    raw = corpus.nested_html_with_inline_and_attachments()
    (event,) = mapping.events_for(
        parse(raw),
        provider="smtp",
        account="support@shop.example",
        raw=raw,
        received_at=NOW,
        mail_from="ana@example.es",
        rcpt_to=["support@shop.example"],
    )
    assert event.type == "message.received"
    assert event.channel == "email"
    assert event.message.WhichOneof("content") == "email"
    assert event.message.email.subject == "Factura con logo"
    assert event.message.sender.address == "ana@example.es"
    assert len(event.message.attachments) == 3
    assert event.raw.content_type == "message/rfc822"
    assert event.raw.data == raw
    assert event.attributes["email.mail_from"] == "ana@example.es"
    assert event.attributes["email.cc"] == "boss@example.es"
    again = mapping.events_for(
        parse(raw), provider="smtp", account="support@shop.example", raw=raw, received_at=NOW
    )
    assert again[0].id == event.id  # a retried delivery dedupes


def test_dsn_is_a_status_not_a_message_and_maps_back_to_our_message() -> None:
    ours = "11111111-2222-4333-8444-555555555555"
    raw = corpus.dsn(original=f"<{ours}@mail.shop.example>")
    mail = parse(raw)
    assert mail.kind == "dsn"
    (event,) = mapping.events_for(
        mail,
        provider="smtp",
        account="support@shop.example",
        raw=raw,
        received_at=NOW,
        message_id_domain="mail.shop.example",
    )
    assert event.type == "message.status"
    assert event.status.state == S.DELIVERY_STATE_FAILED
    assert event.status.permanent
    assert event.status.reason_code == "5.1.1"
    assert event.status.recipient == "nobody@example.org"
    assert event.status.message_id == ours


@pytest.mark.parametrize(
    ("action", "status", "state", "permanent"),
    [
        ("delivered", "2.0.0", S.DELIVERY_STATE_DELIVERED, False),
        ("relayed", "2.0.0", S.DELIVERY_STATE_DELIVERED, False),
        ("delayed", "4.4.7", S.DELIVERY_STATE_QUEUED, False),
        ("failed", "5.7.1", S.DELIVERY_STATE_FAILED, True),
    ],
)
def test_dsn_actions_map_to_canonical_states(
    action: str, status: str, state: int, permanent: bool
) -> None:
    raw = corpus.dsn(action=action, status=status)
    (event,) = mapping.events_for(
        parse(raw), provider="smtp", account="a@b.c", raw=raw, received_at=NOW
    )
    assert (event.status.state, event.status.permanent) == (state, permanent)


def test_auto_reply_is_a_delivered_status_for_the_mail_it_answers() -> None:
    ours = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"
    raw = corpus.auto_reply(f"<{ours}@mail.shop.example>")
    mail = parse(raw)
    assert mail.kind == "auto_reply"
    assert "auto-replied" in mail.auto_reason
    (event,) = mapping.events_for(
        mail,
        provider="smtp",
        account="support@shop.example",
        raw=raw,
        received_at=NOW,
        message_id_domain="mail.shop.example",
    )
    assert event.type == "message.status"
    assert event.status.state == S.DELIVERY_STATE_DELIVERED
    assert event.status.message_id == ours
    assert event.status.provider_status == "auto_replied"


@pytest.mark.parametrize(
    "header", ["Precedence: bulk", "X-Autoreply: yes", "Auto-Submitted: auto-generated"]
)
def test_auto_reply_headers_are_recognized(header: str) -> None:
    raw = f"From: a@b.c\r\nSubject: x\r\n{header}\r\n\r\nbody\r\n".encode()
    assert parse(raw).kind == "auto_reply"
    assert parse(b"From: a@b.c\r\nAuto-Submitted: no\r\n\r\nx\r\n").kind == "message"


@pytest.mark.parametrize("name", sorted(corpus.BOMBS))
def test_mime_bombs_break_a_cap(name: str) -> None:
    build, reason = corpus.BOMBS[name]
    with pytest.raises(MimeLimitError) as caught:
        parse(build())
    assert caught.value.reason == reason


def test_depth_cap_applies_below_the_part_cap() -> None:
    raw = corpus.bomb_deep(40)
    with pytest.raises(MimeLimitError) as caught:
        parse(raw, MimeLimits(max_depth=30))
    assert caught.value.reason == "too_deep"
    parse(raw, MimeLimits(max_depth=60))  # the same mail is fine under a looser cap


def test_size_and_total_header_caps() -> None:
    with pytest.raises(MimeLimitError, match="too_large"):
        parse(b"Subject: x\r\n\r\n" + b"a" * 2000, MimeLimits(max_bytes=1000))
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 500) for i in range(100)) + b"\r\nbody"
    with pytest.raises(MimeLimitError, match="headers_too_large"):
        parse(many, MimeLimits(max_total_header_bytes=10_000))


def test_garbage_never_raises_anything_but_a_cap() -> None:
    for raw in (
        b"",
        b"\x00\xff\xfe",
        b"Content-Type: multipart/mixed\r\n\r\nno boundary",
        b":::\r\n",
    ):
        mail = parse(raw)
        assert mail.kind == "message"


def test_mutated_corpus_never_raises_anything_but_a_cap() -> None:
    """Byte flips, truncations and splices of real-shaped mails: parse either
    returns a mail or refuses with MimeLimitError, never another exception."""
    rng = random.Random(20261123)
    mails = [build() for build in corpus.CORPUS.values()]
    for _ in range(300):
        raw = bytearray(rng.choice(mails))
        for _ in range(rng.randint(1, 20)):
            position = rng.randrange(len(raw))
            raw[position] = rng.choice(b'\x00\xff=?\r\n:;<>"-\\ abcQB')
        if rng.random() < 0.3:
            raw = raw[: rng.randrange(1, len(raw))]
        if rng.random() < 0.3:
            other = rng.choice(mails)
            raw += other[rng.randrange(len(other)) :]
        try:
            mail = parse(bytes(raw))
        except MimeLimitError:
            continue
        assert mail.kind in ("message", "auto_reply", "dsn")
