"""Inbound SMTP through the real service: smtplib to the connector, events off the bus."""

from __future__ import annotations

import asyncio
import re
import smtplib
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

from connectors.email.smtp.connector import SmtpEmailConnector
from gateway.runtime.bus import Bus
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.service import Service
from gateway.runtime.topology import DEAD_EXCHANGE
from gateway.testing.conformance import FlakyBus, GatedBus
from tests.connectors.email import corpus
from tests.connectors.email.support import MimeParsesHere, email_service, self_signed

SHOP = "support@shop.example"


def section(**inbound: Any) -> dict[str, Any]:
    return {
        "message_id_domain": "mail.shop.example",
        "inbound": {
            "host": "127.0.0.1",
            "port": 0,
            "addresses": [SHOP],
            "domains": ["help.example"],
            "max_message_bytes": 2 * 1024 * 1024,
            **inbound,
        },
    }


def smtp_port(service: Service) -> int:
    connector = service.hosted[0].connector
    assert isinstance(connector, SmtpEmailConnector)
    assert connector.port is not None
    return connector.port


def send(port: int, raw: bytes, rcpt: list[str], *, tls: Path | None = None) -> dict[str, Any]:
    """smtplib, as a sending MTA would (CRLF line ends): returns refused recipients."""
    raw = re.sub(rb"\r?\n", b"\r\n", raw)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("sender.example")
        if tls is not None:
            client.starttls(context=ssl.create_default_context(cafile=str(tls)))
            client.ehlo("sender.example")
        return client.sendmail("bounce@sender.example", rcpt, raw)


async def asend(port: int, raw: bytes, rcpt: list[str], **kw: Any) -> dict[str, Any]:
    return await asyncio.to_thread(send, port, raw, rcpt, **kw)


async def test_round_trip_publishes_the_normalized_mail_once() -> None:
    async with email_service("email.smtp", section()) as (service, seen):
        port = smtp_port(service)
        raw = corpus.nested_html_with_inline_and_attachments()
        refused = await asend(port, raw, [SHOP, "Sales@Help.Example"])
        assert refused == {}
        await asend(port, raw, [SHOP, "sales@help.example"])  # the MTA's retry
        await seen.wait(lambda: len(seen.events) >= 1)
        (event,) = seen.events
        assert event.type == "message.received"
        assert (event.channel, event.provider, event.account) == ("email", "smtp", SHOP)
        assert event.message.email.subject == "Factura con logo"
        assert event.message.sender.address == "ana@example.es"
        assert len(event.message.attachments) == 3
        assert event.attributes["email.mail_from"] == "bounce@sender.example"
        assert event.attributes["email.rcpt_to"] == f"{SHOP},sales@help.example"
        assert event.raw.data.replace(b"\r\n", b"\n") == raw.replace(b"\r\n", b"\n")


@pytest.mark.parametrize("name", sorted(corpus.CORPUS))
async def test_corpus_over_smtp(name: str) -> None:
    raw = corpus.CORPUS[name]()
    async with email_service("email.smtp", section()) as (service, seen):
        await asend(smtp_port(service), raw, [SHOP])
        await seen.wait(lambda: len(seen.events) >= 1)
        (event,) = seen.events
        expected = "message.status" if name == "dsn" else "message.received"
        assert event.type == expected


async def test_unknown_recipient_is_550_and_nothing_is_published() -> None:
    bus = InMemoryBus()
    async with email_service("email.smtp", section(), bus=bus) as (service, _):
        port = smtp_port(service)
        with pytest.raises(smtplib.SMTPRecipientsRefused) as caught:
            await asend(port, corpus.plain_utf8(), ["stranger@elsewhere.example"])
        ((code, _),) = caught.value.recipients.values()
        assert code == 550
        # One good and one bad recipient: the good one gets the mail.
        refused = await asend(port, corpus.plain_utf8(), [SHOP, "nobody@shop.example"])
        assert refused["nobody@shop.example"][0] == 550
    events = [m for ex, rk, m in bus.published if rk.startswith("message.received")]
    assert len(events) == 1


async def test_message_over_the_size_limit_is_552() -> None:
    async with email_service("email.smtp", section(max_message_bytes=10_000)) as (service, seen):
        port = smtp_port(service)
        raw = b"Subject: big\r\n\r\n" + b"a" * 76 * 300 + b"\r\n"
        raw = raw.replace(b"a" * 76, b"a" * 76 + b"\r\n")
        # A client that declares SIZE is refused at MAIL FROM ...
        with pytest.raises(smtplib.SMTPSenderRefused) as caught:
            await asend(port, raw, [SHOP])
        assert caught.value.smtp_code == 552

        def without_size() -> int:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("x")
                client.mail("a@b.example")
                client.rcpt(SHOP)
                code, _ = client.data(raw)
                return code

        # ... one that does not is refused after DATA.
        assert await asyncio.to_thread(without_size) == 552
        await asyncio.sleep(0.2)
        assert seen.events == []


async def test_unconfirmed_publish_is_451_and_the_retry_is_accepted() -> None:
    bus = FlakyBus(failures=1)
    async with email_service("email.smtp", section(), bus=bus) as (service, seen):
        port = smtp_port(service)
        with pytest.raises(smtplib.SMTPDataError) as caught:
            await asend(port, corpus.plain_utf8(), [SHOP])
        assert caught.value.smtp_code == 451
        assert seen.events == []
        assert await asend(port, corpus.plain_utf8(), [SHOP]) == {}
        await seen.wait(lambda: len(seen.events) >= 1)
        assert len(seen.events) == 1


async def test_quarantine_failure_is_451_too() -> None:
    class DeadDown(InMemoryBus):
        async def publish(self, exchange: str, routing_key: str, message: Any, **kw: Any) -> None:
            if exchange == DEAD_EXCHANGE:
                from gateway.runtime.bus import PublishTimeoutError

                raise PublishTimeoutError("injected")
            await super().publish(exchange, routing_key, message, **kw)

    async with email_service("email.smtp", section(), bus=DeadDown()) as (service, _):
        with pytest.raises(smtplib.SMTPDataError) as caught:
            await asend(smtp_port(service), corpus.bomb_many_parts(), [SHOP])
        assert caught.value.smtp_code == 451


@pytest.mark.parametrize("name", sorted(corpus.BOMBS))
async def test_mime_bomb_is_quarantined_with_its_raw_bytes(name: str) -> None:
    build, reason = corpus.BOMBS[name]
    raw = build()
    async with email_service("email.smtp", section()) as (service, seen):
        with MimeParsesHere() as here:
            assert await asend(smtp_port(service), raw, [SHOP]) == {}
        await seen.wait(lambda: len(seen.quarantined) >= 1)
        assert seen.events == []
        (event,) = seen.quarantined
        assert event.type == "message.quarantined"
        assert event.attributes["email.quarantine_reason"] == reason
        assert event.raw.content_type == "message/rfc822"
        assert len(event.raw.data) >= len(raw) - 10  # smtplib may normalize line endings
        # Parsing runs in a worker process, never on the service's event loop.
        assert here.calls == 0


async def test_the_corpus_and_bombs_are_parsed_off_the_event_loop() -> None:
    mails = [build() for build in corpus.CORPUS.values()]
    mails += [build() for build, _ in corpus.BOMBS.values()]
    async with email_service("email.smtp", section()) as (service, seen):
        port = smtp_port(service)
        with MimeParsesHere() as here:
            await asyncio.gather(*(asend(port, raw, [SHOP]) for raw in mails))
            await seen.wait(
                lambda: len(seen.events) + len(seen.quarantined) >= len(mails), settle=0.1
            )
    assert len(seen.quarantined) == len(corpus.BOMBS)
    assert len(seen.events) == len(corpus.CORPUS)
    assert here.calls == 0, f"{here.calls} MIME parse(s) ran in the service process"


async def test_starttls_is_offered_with_a_certificate_and_can_be_required(
    tmp_path: Path,
) -> None:
    cert, key = self_signed(tmp_path)
    tls = {"tls_cert_file": str(cert), "tls_key_file": str(key), "require_starttls": True}
    async with email_service("email.smtp", section(**tls)) as (service, seen):
        port = smtp_port(service)

        def plain_attempt() -> int:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("x")
                assert client.has_extn("starttls")
                code, _ = client.mail("a@b.example")
                return code

        assert await asyncio.to_thread(plain_attempt) == 530
        assert await asend(port, corpus.plain_utf8(), [SHOP], tls=cert) == {}
        await seen.wait(lambda: len(seen.events) >= 1)


async def test_no_certificate_means_no_starttls() -> None:
    async with email_service("email.smtp", section()) as (service, _):
        port = smtp_port(service)

        def extensions() -> bool:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("x")
                return client.has_extn("starttls")

        assert await asyncio.to_thread(extensions) is False


async def test_round_trip_on_real_rabbitmq(rabbitmq_url: str, unique: str) -> None:
    async with email_service("email.smtp", section(), broker_url=rabbitmq_url) as (service, seen):
        port = smtp_port(service)
        raw = corpus.plain_utf8().replace(b"reply-1@", f"reply-{unique}@".encode())
        assert await asend(port, raw, [SHOP]) == {}
        # 250 came after the broker's confirm: the event is there.
        await seen.wait(lambda: len(seen.events) >= 1)
        assert seen.events[0].message.email.message_id == f"<reply-{unique}@mail.example.de>"
        assert await asend(port, corpus.bomb_huge_header(), [SHOP]) == {}
        await seen.wait(lambda: len(seen.quarantined) >= 1)
        assert seen.quarantined[0].attributes["email.quarantine_reason"] == "header_too_long"
        bus: Bus = service.bus
        assert bus.is_ready()


async def test_shutdown_lets_a_mail_in_flight_finish_and_refuses_new_sessions() -> None:
    bus = GatedBus()
    async with email_service("email.smtp", section(), bus=bus) as (service, _):
        port = smtp_port(service)
        sending = asyncio.create_task(asend(port, corpus.plain_utf8(), [SHOP]))
        await asyncio.wait_for(bus.entered.wait(), 5)  # the mail is being published
        stopping = asyncio.create_task(service.stop())
        await asyncio.sleep(0.3)
        assert not sending.done(), "the sender got an answer before the publish confirm"
        with pytest.raises(ConnectionRefusedError):
            await asyncio.to_thread(socket.create_connection, ("127.0.0.1", port), 2)
        bus.gate.set()
        assert await sending == {}  # 250: the in-flight mail was published, then the server stopped
        await stopping
    published = [rk for _, rk, _ in bus.published if rk.startswith("message.received")]
    assert published == ["message.received.email.smtp"]
