"""Provider webhooks through the real service over HTTP: SendGrid (ECDSA, checked
against the sendgrid SDK's EventWebhook), Mailgun (HMAC per its documented
scheme, replay cache), Postmark (basic auth); tamper matrices; event mapping."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sendgrid.helpers.eventwebhook import EventWebhook

from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.service import Service
from gateway.runtime.topology import EVENTS_EXCHANGE
from tests.connectors.email import corpus
from tests.connectors.email.support import Collected, email_service

S = DeliveryState
DOMAIN = "mail.shop.example"
OURS = "11111111-2222-4333-8444-555555555555"


# -- helpers ---------------------------------------------------------------------------


def new_key() -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A P-256 key pair; the public key as SendGrid shows it (base64 SPKI)."""
    private = ec.generate_private_key(ec.SECP256R1())
    spki = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, base64.b64encode(spki).decode()


def sendgrid_sign(private: ec.EllipticCurvePrivateKey, body: bytes, timestamp: str) -> str:
    """What SendGrid sends: base64(DER ECDSA-SHA256(timestamp + body))."""
    der = private.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(der).decode()


def multipart(fields: list[tuple[str, bytes, str | None, str]]) -> tuple[bytes, str]:
    """A multipart/form-data body (name, data, filename, content type)."""
    boundary = "----cgtest" + uuid.uuid4().hex
    chunks = []
    for name, data, filename, ctype in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        chunks.append(
            f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
            f"Content-Type: {ctype}\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    return b"".join(
        chunks
    ) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def post(url: str, body: bytes, headers: dict[str, str]) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers) as resp,
    ):
        return resp.status


def published(bus: InMemoryBus) -> list[str]:
    return [rk for ex, rk, _ in bus.published if ex == EVENTS_EXCHANGE]


# -- SendGrid ----------------------------------------------------------------------------

SG_EVENTS = [
    {
        "email": "Ana@example.es",
        "timestamp": 1762077600,
        "event": "processed",
        "sg_event_id": "e1",
        "sg_message_id": "m1.filter",
        "smtp-id": f"<{OURS}@{DOMAIN}>",
    },
    {
        "email": "ana@example.es",
        "timestamp": 1762077601,
        "event": "deferred",
        "sg_event_id": "e2",
        "sg_message_id": "m1.filter",
        "response": "400 try again",
        "attempt": "2",
        "smtp-id": f"<{OURS}@{DOMAIN}>",
    },
    {
        "email": "ana@example.es",
        "timestamp": 1762077602,
        "event": "delivered",
        "sg_event_id": "e3",
        "sg_message_id": "m1.filter",
        "response": "250 OK",
        "smtp-id": f"<{OURS}@{DOMAIN}>",
    },
    {
        "email": "ana@example.es",
        "timestamp": 1762077603,
        "event": "open",
        "sg_event_id": "e4",
        "sg_message_id": "m1.filter",
        "useragent": "Mozilla",
    },
    {
        "email": "ana@example.es",
        "timestamp": 1762077604,
        "event": "click",
        "sg_event_id": "e5",
        "sg_message_id": "m1.filter",
        "url": "https://shop.example/track",
    },
    {
        "email": "bob@example.org",
        "timestamp": 1762077605,
        "event": "bounce",
        "sg_event_id": "e6",
        "sg_message_id": "m2.filter",
        "type": "bounce",
        "status": "5.1.1",
        "reason": "no such user",
        "gateway_message_id": "22222222-2222-4333-8444-555555555555",
    },
    {
        "email": "carl@example.org",
        "timestamp": 1762077606,
        "event": "bounce",
        "sg_event_id": "e7",
        "sg_message_id": "m3.filter",
        "type": "blocked",
        "status": "5.7.1",
        "reason": "blocked",
    },
    {
        "email": "dora@example.org",
        "timestamp": 1762077607,
        "event": "dropped",
        "sg_event_id": "e8",
        "sg_message_id": "m4.filter",
        "reason": "Bounced Address",
    },
]


@pytest.fixture
async def sendgrid() -> AsyncIterator[tuple[Service, Collected, InMemoryBus, dict[str, Any]]]:
    event_key, event_pub = new_key()
    parse_key, parse_pub = new_key()
    section = {
        "message_id_domain": DOMAIN,
        "accounts": {
            "main": {"event_verification_key": event_pub, "parse_verification_key": parse_pub},
            "basic": {"parse_basic_auth": {"username": "parse", "password": {"env": "SG_PARSE"}}},
        },
    }
    bus = InMemoryBus()
    async with email_service(
        "email.sendgrid", section, bus=bus, environ={"SG_PARSE": "parse-pass-1"}
    ) as (service, seen):
        yield service, seen, bus, {"event": (event_key, event_pub), "parse": (parse_key, parse_pub)}


async def test_sendgrid_event_batch_every_item_mapped(sendgrid: Any) -> None:
    service, seen, _, keys = sendgrid
    private, public = keys["event"]
    body = (json.dumps(SG_EVENTS) + "\r\n").encode()  # SendGrid's trailing CRLF is signed too
    timestamp = str(int(time.time()))
    signature = sendgrid_sign(private, body, timestamp)
    assert EventWebhook(public).verify_signature(body.decode(), signature, timestamp)  # the oracle
    url = f"{service.base_url}/webhooks/email/sendgrid/main/events"
    headers = {
        "Content-Type": "application/json",
        "X-Twilio-Email-Event-Webhook-Signature": signature,
        "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
    }
    assert await post(url, body, headers) == 200
    assert await post(url, body, headers) == 200  # SendGrid's duplicate copy
    await seen.wait(lambda: len(seen.events) >= len(SG_EVENTS))
    assert len(seen.events) == len(SG_EVENTS)
    statuses = [e for e in seen.events if e.type == "message.status"]
    interactions = [e for e in seen.events if e.type == "message.interaction"]
    assert len(statuses) == 6
    assert sorted(e.attributes["email.interaction"] for e in interactions) == ["click", "open"]
    got = {(e.status.provider_status, e.status.recipient): e.status for e in statuses}
    assert got[("processed", "ana@example.es")].state == S.DELIVERY_STATE_QUEUED
    deferred = got[("deferred", "ana@example.es")]
    assert (deferred.state, deferred.permanent, deferred.attempt) == (
        S.DELIVERY_STATE_QUEUED,
        False,
        2,
    )
    delivered = got[("delivered", "ana@example.es")]
    assert delivered.state == S.DELIVERY_STATE_DELIVERED
    assert delivered.message_id == OURS  # mapped back from smtp-id
    bounce = got[("bounce", "bob@example.org")]
    assert (bounce.state, bounce.permanent, bounce.reason_code) == (
        S.DELIVERY_STATE_FAILED,
        True,
        "5.1.1",
    )
    assert bounce.message_id == "22222222-2222-4333-8444-555555555555"  # custom arg
    blocked = got[("bounce", "carl@example.org")]
    assert (blocked.state, blocked.permanent) == (S.DELIVERY_STATE_FAILED, False)
    assert got[("dropped", "dora@example.org")].permanent
    click = next(e for e in interactions if e.attributes["email.interaction"] == "click")
    assert click.attributes["email.url"] == "https://shop.example/track"


def sendgrid_forgeries(
    private: ec.EllipticCurvePrivateKey, body: bytes
) -> list[tuple[str, bytes, dict[str, str], bool]]:
    """(description, body, headers, what the SDK oracle says) per forgery."""
    now = str(int(time.time()))
    good = sendgrid_sign(private, body, now)
    other, _ = new_key()
    stale = str(int(time.time()) - 3600)
    h = "X-Twilio-Email-Event-Webhook-Signature"
    t = "X-Twilio-Email-Event-Webhook-Timestamp"
    return [
        ("tampered body", body.replace(b"delivered", b"bounce"), {h: good, t: now}, False),
        ("tampered timestamp", body, {h: good, t: str(int(now) - 1)}, False),
        ("other key", body, {h: sendgrid_sign(other, body, now), t: now}, False),
        ("missing signature", body, {t: now}, False),
        ("missing timestamp", body, {h: good}, False),
        ("not base64", body, {h: "!!!not-base64!!!", t: now}, False),
        ("garbage DER", body, {h: base64.b64encode(b"\x30\x02garbage").decode(), t: now}, False),
        ("non-numeric timestamp", body, {h: good, t: "yesterday"}, False),
        # The SDK helper does not check age: this one it accepts, we refuse.
        (
            "stale but validly signed",
            body,
            {h: sendgrid_sign(private, body, stale), t: stale},
            True,
        ),
        (
            "future",
            body,
            {h: sendgrid_sign(private, body, str(int(now) + 3600)), t: str(int(now) + 3600)},
            True,
        ),
    ]


async def test_sendgrid_tamper_matrix_is_401_and_publishes_nothing(sendgrid: Any) -> None:
    service, _, bus, keys = sendgrid
    private, public = keys["event"]
    body = json.dumps(SG_EVENTS[2:3]).encode()
    oracle = EventWebhook(public)
    url = f"{service.base_url}/webhooks/email/sendgrid/main/events"
    for description, forged_body, headers, sdk_says in sendgrid_forgeries(private, body):
        sig, ts = (
            headers.get("X-Twilio-Email-Event-Webhook-Signature"),
            headers.get("X-Twilio-Email-Event-Webhook-Timestamp"),
        )
        if sig and ts:
            try:
                verdict = oracle.verify_signature(forged_body.decode(), sig, ts)
            except (ValueError, TypeError):  # the SDK raises on undecodable input
                verdict = False
            assert verdict is sdk_says, description
        status = await post(url, forged_body, {"Content-Type": "application/json", **headers})
        assert status in (401, 403), f"{description}: {status}"
    # The parse key does not sign events, and an unknown account is refused too.
    now = str(int(time.time()))
    parse_private, _ = keys["parse"]
    headers = {
        "X-Twilio-Email-Event-Webhook-Signature": sendgrid_sign(parse_private, body, now),
        "X-Twilio-Email-Event-Webhook-Timestamp": now,
    }
    assert await post(url, body, headers) == 401
    assert await post(url.replace("/main/", "/nobody/"), body, headers) == 403
    assert await post(url.replace("/main/", "/basic/"), body, headers) == 403  # no event key
    assert published(bus) == []


async def test_sendgrid_inbound_parse_raw_signed(sendgrid: Any) -> None:
    service, seen, _, keys = sendgrid
    private, _ = keys["parse"]
    raw = corpus.nested_html_with_inline_and_attachments()
    envelope = json.dumps({"to": ["support@shop.example"], "from": "ana@example.es"}).encode()
    body, ctype = multipart(
        [
            ("envelope", envelope, None, "text/plain"),
            ("email", raw, None, "text/plain"),
            ("spam_score", b"0.1", None, "text/plain"),
        ]
    )
    now = str(int(time.time()))
    headers = {
        "Content-Type": ctype,
        "X-Twilio-Email-Event-Webhook-Signature": sendgrid_sign(private, body, now),
        "X-Twilio-Email-Event-Webhook-Timestamp": now,
    }
    url = f"{service.base_url}/webhooks/email/sendgrid/main/inbound"
    assert await post(url, body, headers) == 200
    await seen.wait(lambda: len(seen.events) >= 1)
    (event,) = seen.events
    assert event.type == "message.received"
    assert event.message.email.subject == "Factura con logo"
    assert len(event.message.attachments) == 3
    assert event.attributes["email.rcpt_to"] == "support@shop.example"
    headers["X-Twilio-Email-Event-Webhook-Signature"] = sendgrid_sign(private, body + b"x", now)
    assert await post(url, body, headers) == 401


async def test_sendgrid_inbound_parse_fields_with_basic_auth(sendgrid: Any) -> None:
    service, seen, bus, _ = sendgrid
    header_block = (
        b"From: =?utf-8?q?Ren=C3=A9e?= <renee@example.fr>\r\nTo: support@shop.example\r\n"
        b"Subject: Colis\r\nMessage-ID: <sg-fields-1@example.fr>\r\n"
        b"Content-Type: multipart/mixed; boundary=xyz\r\n"
    )
    body, ctype = multipart(
        [
            ("headers", header_block, None, "text/plain"),
            ("text", "Le colis est abîmé.".encode("iso-8859-1"), None, "text/plain"),
            ("html", b"<p onclick='x()'>Le colis</p>", None, "text/plain"),
            (
                "charsets",
                b'{"text":"iso-8859-1","html":"utf-8","headers":"utf-8"}',
                None,
                "text/plain",
            ),
            (
                "envelope",
                b'{"to":["support@shop.example"],"from":"renee@example.fr"}',
                None,
                "text/plain",
            ),
            (
                "attachment-info",
                b'{"attachment1":{"filename":"photo.jpg","type":"image/jpeg"}}',
                None,
                "text/plain",
            ),
            ("attachments", b"1", None, "text/plain"),
            ("attachment1", b"\xff\xd8\xffjpeg", "photo.jpg", "image/jpeg"),
        ]
    )
    url = f"{service.base_url}/webhooks/email/sendgrid/basic/inbound"
    good = "Basic " + base64.b64encode(b"parse:parse-pass-1").decode()
    assert await post(url, body, {"Content-Type": ctype, "Authorization": good}) == 200
    await seen.wait(lambda: len(seen.events) >= 1)
    (event,) = seen.events
    mail = event.message.email
    assert mail.subject == "Colis"
    assert mail.text == "Le colis est abîmé."
    assert "onclick" not in mail.html
    assert event.message.sender.display_name == "Renée"
    (photo,) = event.message.attachments
    assert (photo.filename, photo.content_type, photo.size_bytes) == ("photo.jpg", "image/jpeg", 7)
    bad = "Basic " + base64.b64encode(b"parse:wrong").decode()
    assert await post(url, body, {"Content-Type": ctype, "Authorization": bad}) == 403
    assert await post(url, body, {"Content-Type": ctype}) == 403
    assert len(published(bus)) == 1


async def test_sendgrid_inbound_bomb_is_quarantined_and_answered_200(sendgrid: Any) -> None:
    service, seen, _, _ = sendgrid
    body, ctype = multipart([("email", corpus.bomb_many_parts(), None, "text/plain")])
    url = f"{service.base_url}/webhooks/email/sendgrid/basic/inbound"
    auth = "Basic " + base64.b64encode(b"parse:parse-pass-1").decode()
    assert await post(url, body, {"Content-Type": ctype, "Authorization": auth}) == 200
    await seen.wait(lambda: len(seen.quarantined) >= 1)
    assert seen.events == []
    assert seen.quarantined[0].attributes["email.quarantine_reason"] == "too_many_parts"


async def test_malformed_form_is_400(sendgrid: Any) -> None:
    service, _, bus, _ = sendgrid
    url = f"{service.base_url}/webhooks/email/sendgrid/basic/inbound"
    auth = "Basic " + base64.b64encode(b"parse:parse-pass-1").decode()
    assert (
        await post(url, b"garbage", {"Content-Type": "multipart/form-data", "Authorization": auth})
        == 400
    )
    assert (
        await post(url, b"{}", {"Content-Type": "application/json", "Authorization": auth}) == 415
    )
    assert published(bus) == []


# -- Mailgun -------------------------------------------------------------------------------

MG_KEY = "key-mailgun-signing-0123456789"


def mailgun_signature(timestamp: str, token: str, key: str = MG_KEY) -> str:
    """Mailgun's documented scheme, computed here independently of the connector."""
    return hmac.new(key.encode(), f"{timestamp}{token}".encode(), hashlib.sha256).hexdigest()


@pytest.fixture
async def mailgun() -> AsyncIterator[tuple[Service, Collected, InMemoryBus]]:
    section = {
        "message_id_domain": DOMAIN,
        "signature_max_age": 300,
        "accounts": {"main": {"webhook_signing_key": {"env": "MG_KEY"}}},
    }
    bus = InMemoryBus()
    async with email_service("email.mailgun", section, bus=bus, environ={"MG_KEY": MG_KEY}) as (
        service,
        seen,
    ):
        yield service, seen, bus


def mg_event(name: str, event_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "event": name,
        "id": event_id,
        "timestamp": 1762077600.5,
        "recipient": "ana@example.es",
        "message": {"headers": {"message-id": f"{OURS}@{DOMAIN}"}},
        **extra,
    }


def mg_body(
    data: dict[str, Any],
    *,
    timestamp: str | None = None,
    token: str | None = None,
    signature: str | None = None,
) -> bytes:
    timestamp = timestamp or str(int(time.time()))
    token = token or uuid.uuid4().hex
    return json.dumps(
        {
            "signature": {
                "timestamp": timestamp,
                "token": token,
                "signature": signature or mailgun_signature(timestamp, token),
            },
            "event-data": data,
        }
    ).encode()


@pytest.mark.parametrize(
    ("data", "state", "permanent"),
    [
        (mg_event("delivered", "d1"), S.DELIVERY_STATE_DELIVERED, False),
        (mg_event("accepted", "a1"), S.DELIVERY_STATE_QUEUED, False),
        (
            mg_event(
                "failed",
                "f1",
                severity="permanent",
                **{"delivery-status": {"code": 550, "description": "no mailbox"}},
            ),
            S.DELIVERY_STATE_FAILED,
            True,
        ),
        (
            mg_event(
                "failed",
                "f2",
                severity="temporary",
                **{"delivery-status": {"code": 421, "message": "later"}},
            ),
            S.DELIVERY_STATE_QUEUED,
            False,
        ),
    ],
)
async def test_mailgun_events_map_to_states(
    mailgun: Any, data: dict[str, Any], state: int, permanent: bool
) -> None:
    service, seen, _ = mailgun
    url = f"{service.base_url}/webhooks/email/mailgun/main/events"
    assert await post(url, mg_body(data), {"Content-Type": "application/json"}) == 200
    await seen.wait(lambda: len(seen.events) >= 1)
    (event,) = seen.events
    assert (event.status.state, event.status.permanent) == (state, permanent)
    assert event.status.message_id == OURS


async def test_mailgun_opens_are_interactions(mailgun: Any) -> None:
    service, seen, _ = mailgun
    url = f"{service.base_url}/webhooks/email/mailgun/main/events"
    assert await post(url, mg_body(mg_event("opened", "o1")), {}) == 200
    await seen.wait(lambda: len(seen.events) >= 1)
    (event,) = seen.events
    assert event.type == "message.interaction"
    assert event.attributes["email.interaction"] == "open"
    assert event.read.reader.address == "ana@example.es"


async def test_mailgun_tamper_matrix_and_replay_cache(mailgun: Any) -> None:
    service, seen, bus = mailgun
    url = f"{service.base_url}/webhooks/email/mailgun/main/events"
    data = mg_event("delivered", "t1")
    now = str(int(time.time()))
    token = uuid.uuid4().hex
    forgeries = {
        "wrong key": mg_body(
            data, timestamp=now, token=token, signature=mailgun_signature(now, token, "other-key")
        ),
        "stale": mg_body(
            data,
            timestamp=str(int(now) - 301),
            token=token,
            signature=mailgun_signature(str(int(now) - 301), token),
        ),
        "future": mg_body(
            data,
            timestamp=str(int(now) + 600),
            token=token,
            signature=mailgun_signature(str(int(now) + 600), token),
        ),
        "malformed signature": mg_body(data, timestamp=now, token=token, signature="zz"),
        "non-numeric timestamp": mg_body(
            data, timestamp="x1", token=token, signature=mailgun_signature("x1", token)
        ),
        "swapped token": mg_body(
            data, timestamp=now, token=token + "0", signature=mailgun_signature(now, token)
        ),
    }
    for description, body in forgeries.items():
        assert await post(url, body, {}) in (401, 403), description
    assert published(bus) == []
    # A valid request, then Mailgun's retry (same token, same body): both 200, one event.
    body = mg_body(data, timestamp=now, token=token)
    assert await post(url, body, {}) == 200
    assert await post(url, body, {}) == 200
    # The captured signature replayed with another body: refused.
    replay = json.loads(body)
    replay["event-data"] = mg_event("failed", "t2", severity="permanent")
    assert await post(url, json.dumps(replay).encode(), {}) == 401
    await seen.wait(lambda: len(seen.events) >= 1)
    assert len(seen.events) == 1
    assert await post(url.replace("/main/", "/other/"), body, {}) == 403
    assert await post(url, b"[]", {}) == 400


async def test_mailgun_route_forward_fields_and_mime(mailgun: Any) -> None:
    service, seen, _ = mailgun
    now, token = str(int(time.time())), uuid.uuid4().hex
    signature = [
        ("timestamp", now.encode(), None, "text/plain"),
        ("token", token.encode(), None, "text/plain"),
        ("signature", mailgun_signature(now, token).encode(), None, "text/plain"),
    ]
    headers = json.dumps(
        [
            ["From", "Ivan <ivan@example.ru>"],
            ["To", "support@shop.example"],
            ["Subject", "Заказ"],
            ["Message-Id", "<mg-1@example.ru>"],
            ["Content-Type", "multipart/mixed; boundary=q"],
        ]
    ).encode()
    body, ctype = multipart(
        [
            *signature,
            ("recipient", b"support@shop.example", None, "text/plain"),
            ("sender", b"ivan@example.ru", None, "text/plain"),
            ("message-headers", headers, None, "text/plain"),
            ("body-plain", "Где заказ?\n\n> old".encode(), None, "text/plain"),
            ("attachment-1", b"%PDF", "scan.pdf", "application/pdf"),
        ]
    )
    url = f"{service.base_url}/webhooks/email/mailgun/main/inbound"
    assert await post(url, body, {"Content-Type": ctype}) == 200
    now2, token2 = str(int(time.time())), uuid.uuid4().hex
    mime_body, mime_type = multipart(
        [
            ("timestamp", now2.encode(), None, "text/plain"),
            ("token", token2.encode(), None, "text/plain"),
            ("signature", mailgun_signature(now2, token2).encode(), None, "text/plain"),
            ("recipient", b"support@shop.example", None, "text/plain"),
            ("body-mime", corpus.iso_2022_jp(), None, "text/plain"),
        ]
    )
    assert await post(url + "/mime", mime_body, {"Content-Type": mime_type}) == 200
    await seen.wait(lambda: len(seen.events) >= 2)
    first, second = sorted(seen.events, key=lambda e: e.message.email.message_id)
    assert first.message.email.subject == "注文の件"
    assert second.message.email.subject == "Заказ"
    assert second.message.email.text == "Где заказ?"
    assert second.message.email.quoted_text == "> old"
    assert [a.filename for a in second.message.attachments] == ["scan.pdf"]
    # An unsigned forward is refused.
    unsigned, unsigned_type = multipart([("body-mime", corpus.plain_utf8(), None, "text/plain")])
    assert await post(url + "/mime", unsigned, {"Content-Type": unsigned_type}) == 401


# -- Postmark ------------------------------------------------------------------------------


@pytest.fixture
async def postmark() -> AsyncIterator[tuple[Service, Collected, InMemoryBus]]:
    section = {"accounts": {"main": {"username": "hook", "password": {"env": "PM_PASS"}}}}
    bus = InMemoryBus()
    async with email_service(
        "email.postmark", section, bus=bus, environ={"PM_PASS": "pm-pass-1"}
    ) as (
        service,
        seen,
    ):
        yield service, seen, bus


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}", "Content-Type": "application/json"}


async def test_postmark_inbound_and_auth_matrix(postmark: Any) -> None:
    service, seen, bus = postmark
    url = f"{service.base_url}/webhooks/email/postmark/main/inbound"
    payload = {
        "FromFull": {"Email": "Ana@Example.es", "Name": "Ana"},
        "ToFull": [{"Email": "support@shop.example", "Name": ""}],
        "Subject": "Pedido",
        "MessageID": "pm-1",
        "TextBody": "¿Dónde está?\n\nOn Mon, Nov 2, 2026 Support wrote:\n> Enviado",
        "HtmlBody": "<p>¿Dónde está?</p><script>x</script>",
        "Headers": [
            {"Name": "Message-ID", "Value": "<pm-inbound-1@example.es>"},
            {"Name": "In-Reply-To", "Value": f"<{OURS}@{DOMAIN}>"},
        ],
        "Attachments": [
            {
                "Name": "a.txt",
                "Content": base64.b64encode(b"hello").decode(),
                "ContentType": "text/plain",
                "ContentLength": 5,
            }
        ],
    }
    body = json.dumps(payload).encode()
    forgeries = {
        "no auth": {"Content-Type": "application/json"},
        "wrong password": basic("hook", "wrong"),
        "wrong user": basic("other", "pm-pass-1"),
        "not base64": {"Authorization": "Basic %%%"},
        "bearer": {"Authorization": "Bearer pm-pass-1"},
        "no colon": {"Authorization": "Basic " + base64.b64encode(b"hookpm-pass-1").decode()},
    }
    for description, headers in forgeries.items():
        assert await post(url, body, headers) in (401, 403), description
    assert published(bus) == []
    assert await post(url, body, basic("hook", "pm-pass-1")) == 200
    await seen.wait(lambda: len(seen.events) >= 1)
    (event,) = seen.events
    mail = event.message.email
    assert (mail.subject, mail.text, mail.message_id) == (
        "Pedido",
        "¿Dónde está?",
        "<pm-inbound-1@example.es>",
    )
    assert mail.quoted_text.startswith("On Mon")
    assert "<script" not in mail.html
    assert event.message.sender.address == "ana@example.es"
    assert event.message.attachments[0].sha256 == hashlib.sha256(b"hello").hexdigest()


@pytest.mark.parametrize(
    ("payload", "kind", "state", "permanent"),
    [
        (
            {
                "RecordType": "Delivery",
                "MessageID": "pm-m1",
                "Recipient": "a@b.es",
                "DeliveredAt": "2026-11-02T10:00:00Z",
                "Metadata": {"gateway_message_id": OURS},
            },
            "message.status",
            S.DELIVERY_STATE_DELIVERED,
            False,
        ),
        (
            {
                "RecordType": "Bounce",
                "ID": 42,
                "Type": "HardBounce",
                "TypeCode": 1,
                "MessageID": "pm-m1",
                "Email": "a@b.es",
                "Description": "unknown user",
                "Inactive": True,
            },
            "message.status",
            S.DELIVERY_STATE_FAILED,
            True,
        ),
        (
            {
                "RecordType": "Bounce",
                "ID": 43,
                "Type": "SoftBounce",
                "TypeCode": 4096,
                "MessageID": "pm-m1",
                "Email": "a@b.es",
                "Inactive": False,
            },
            "message.status",
            S.DELIVERY_STATE_QUEUED,
            False,
        ),
        (
            {
                "RecordType": "Open",
                "MessageID": "pm-m1",
                "Recipient": "a@b.es",
                "ReceivedAt": "2026-11-02T10:05:00Z",
            },
            "message.interaction",
            S.DELIVERY_STATE_UNSPECIFIED,
            False,
        ),
    ],
)
async def test_postmark_events(
    postmark: Any, payload: dict[str, Any], kind: str, state: int, permanent: bool
) -> None:
    service, seen, _ = postmark
    url = f"{service.base_url}/webhooks/email/postmark/main/events"
    assert await post(url, json.dumps(payload).encode(), basic("hook", "pm-pass-1")) == 200
    await seen.wait(lambda: len(seen.events) >= 1)
    (event,) = seen.events
    assert event.type == kind
    if kind == "message.status":
        assert (event.status.state, event.status.permanent) == (state, permanent)
        assert event.status.provider_message_id == "pm-m1"
    if payload.get("Metadata"):
        assert event.status.message_id == OURS
    assert await post(url, json.dumps(payload).encode(), basic("hook", "nope")) == 403


def test_rebuilt_mime_survives_odd_headers() -> None:
    from connectors.email.mime import parse
    from connectors.email.webhooks import rebuild_mime

    raw = rebuild_mime(
        [
            ("From", "Zoë <zoe@example.org>"),
            ("Subject", "  folded\r\n  subject  "),
            ("X-Empty", ""),
            ("Bad:Name", "x"),
        ],
        text="hi",
        html="",
    )
    mail = parse(raw)
    assert mail.subject == "folded subject"
    assert mail.sender is not None
    assert mail.sender.name == "Zoë"
