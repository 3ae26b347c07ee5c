"""Vonage webhook routes over real HTTP: every documented way in, and bad input.

Signed requests here use the md5hash known-answer signer (checked against the
v3 SDK vector in test_signatures) or Vonage's v4 SDK for HMAC.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any
from urllib.parse import urlencode

from vonage_http_client.auth import Auth

from connectors.sms.vonage import webhooks
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.testing.fake_vonage import signed_webhook_headers
from tests.connectors.sms.vonage.conftest import API_KEY, OTHER_API_KEY, Harness

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def signed(params: dict[str, str], secret: str) -> dict[str, str]:
    """``params`` with a fresh timestamp and an md5hash ``sig``."""
    fresh = dict(params, timestamp=str(int(time.time())), nonce=str(uuid.uuid4()))
    return dict(fresh, sig=webhooks.compute_signature(fresh, secret, "md5hash"))


def inbound(**overrides: str) -> dict[str, str]:
    params = {
        "msisdn": "447700900123",
        "to": "447700900000",
        "messageId": uuid.uuid4().hex[:16].upper(),
        "text": "Hello",
        "type": "text",
        "api-key": API_KEY,
        "message-timestamp": "2026-03-01 12:00:00",
    }
    params.update(overrides)
    return params


async def test_provider_retry_with_a_fresh_signature_is_one_event(harness: Harness) -> None:
    secret = harness.secrets["VONAGE_SIGNATURE_SECRET"]
    params = inbound()
    for _ in range(3):  # each retry is signed anew, with a new timestamp and nonce
        status, _ = await harness.post(
            harness.url("main", "inbound"), data=urlencode(signed(params, secret)), headers=FORM
        )
        assert status == 204
    event, _ = await harness.next_event()
    assert event.message.provider_message_id == params["messageId"]
    await harness.assert_nothing_published()


async def test_post_json_inbound_is_accepted(harness: Harness) -> None:
    # The dashboard's "POST-JSON" method: the same flat fields as a JSON object.
    secret = harness.secrets["VONAGE_SIGNATURE_SECRET"]
    body = json.dumps(signed(inbound(text="JSON ✓", type="unicode"), secret)).encode()
    status, _ = await harness.post(
        harness.url("main", "inbound"), data=body, headers={"Content-Type": "application/json"}
    )
    assert status == 204
    event, _ = await harness.next_event()
    assert event.message.text.body == "JSON ✓"
    assert event.attributes["sms.encoding"] == "UCS-2"
    assert event.raw.content_type == "application/json"


async def test_concatenated_sms_parts_are_each_published(harness: Harness) -> None:
    secret = harness.secrets["VONAGE_SIGNATURE_SECRET"]
    for part in ("3", "1", "2"):
        params = inbound(
            text=f"part {part} ",
            concat="true",
            **{"concat-ref": "77", "concat-total": "3", "concat-part": part},
        )
        status, _ = await harness.get(harness.url("main", "inbound"), params=signed(params, secret))
        assert status == 204
    events = [(await harness.next_event())[0] for _ in range(3)]
    assert sorted(e.sequence for e in events) == [1, 2, 3]
    ordered = sorted(events, key=lambda e: e.sequence)
    assert "".join(e.message.text.body for e in ordered) == "part 1 part 2 part 3 "
    assert {e.attributes["sms.concat_ref"] for e in events} == {"77"}


async def test_signed_delivery_receipt_becomes_a_status_event(harness: Harness) -> None:
    secret = harness.secrets["VONAGE_OTHER_SIGNATURE_SECRET"]
    params = {
        "msisdn": "14155550123",
        "to": "AcmeInc",
        "network-code": "310260",
        "messageId": "0B00000012345678",
        "price": "0.00750000",
        "status": "failed",
        "scts": "2603011200",
        "err-code": "6",
        "api-key": OTHER_API_KEY,
        "client-ref": "c0ffee00-0000-4000-8000-000000000009",
        "message-timestamp": "2026-03-01 12:00:05",
        "timestamp": str(int(time.time())),
    }
    auth = Auth(api_key=OTHER_API_KEY, signature_secret=secret, signature_method="sha256")
    params["sig"] = auth.sign_params(dict(params))
    status, _ = await harness.get(harness.url("hmac", "dlr"), params=params)
    assert status == 204
    event, key = await harness.next_event()
    assert key == "message.status.sms.vonage"
    assert event.status.state == DeliveryState.DELIVERY_STATE_FAILED
    assert event.status.permanent is True
    assert event.status.reason_code == "6"
    assert event.status.reason == "Anti-Spam Rejection"
    assert event.status.message_id == "c0ffee00-0000-4000-8000-000000000009"
    assert event.status.recipient == "+14155550123"


async def test_same_message_id_on_two_accounts_is_two_events(harness: Harness) -> None:
    message_id = uuid.uuid4().hex[:16].upper()
    main = signed(inbound(messageId=message_id), harness.secrets["VONAGE_SIGNATURE_SECRET"])
    other = inbound(messageId=message_id, **{"api-key": OTHER_API_KEY})
    auth = Auth(
        api_key=OTHER_API_KEY,
        signature_secret=harness.secrets["VONAGE_OTHER_SIGNATURE_SECRET"],
        signature_method="sha256",
    )
    other = dict(other, timestamp=str(int(time.time())))
    other["sig"] = auth.sign_params(dict(other))
    for account, params in (("main", main), ("hmac", other)):
        status, _ = await harness.post(
            harness.url(account, "inbound"), data=urlencode(params), headers=FORM
        )
        assert status == 204
    events = [(await harness.next_event())[0] for _ in range(2)]
    assert {e.account for e in events} == {"main", "hmac"}
    assert len({e.id for e in events}) == 2


async def test_bad_input_with_a_valid_signature_is_400_and_never_published(
    harness: Harness,
) -> None:
    secret = harness.secrets["VONAGE_SIGNATURE_SECRET"]
    url = harness.url("main", "inbound")
    cases: list[tuple[str, Any, dict[str, str]]] = [
        ("unparsable msisdn", urlencode(signed(inbound(msisdn="12"), secret)), FORM),
        ("msisdn with junk", urlencode(signed(inbound(msisdn="4477009001x!"), secret)), FORM),
        ("unknown type", urlencode(signed(inbound(type="vcard"), secret)), FORM),
        ("no messageId", urlencode(signed(inbound(messageId=""), secret)), FORM),
        (
            "bad concat",
            urlencode(
                signed(
                    inbound(concat="true", **{"concat-ref": "1", "concat-total": "2"}),
                    secret,
                )
            ),
            FORM,
        ),
        (
            "nested JSON value",
            json.dumps({**signed(inbound(), secret), "text": {"a": 1}}),
            {"Content-Type": "application/json"},
        ),
        ("JSON array", "[]", {"Content-Type": "application/json"}),
        ("malformed JSON", "{", {"Content-Type": "application/json"}),
    ]
    for name, body, headers in cases:
        status, text = await harness.post(url, data=body, headers=headers)
        assert status == 400, f"{name}: {status} {text}"
    # A parameter given twice: which copy was signed is anyone's guess.
    params = signed(inbound(), secret)
    doubled = urlencode([*params.items(), ("text", "other")])
    status, _ = await harness.post(url, data=doubled, headers=FORM)
    assert status == 400
    await harness.assert_nothing_published()


async def test_messages_api_bad_bodies_with_valid_jwt_are_400(harness: Harness) -> None:
    secret = harness.secrets["VONAGE_SIGNATURE_SECRET"]
    bodies = {
        "not JSON": b"text=hi",
        "JSON array": b"[]",
        "another channel": json.dumps(
            {"channel": "whatsapp", "message_uuid": str(uuid.uuid4()), "from": "447700900123"}
        ).encode(),
        "unparsable from": json.dumps(
            {
                "channel": "sms",
                "message_uuid": str(uuid.uuid4()),
                "to": "447700900000",
                "from": "0",
                "text": "x",
            }
        ).encode(),
        "unknown status": json.dumps(
            {"channel": "sms", "message_uuid": str(uuid.uuid4()), "status": "lost"}
        ).encode(),
    }
    for name, body in bodies.items():
        headers = signed_webhook_headers(body, secret, api_key=API_KEY)
        route = "messages/status" if name == "unknown status" else "messages/inbound"
        status, text = await harness.post(harness.url("main", route), data=body, headers=headers)
        assert status == 400, f"{name}: {status} {text}"
    await harness.assert_nothing_published()


async def test_signed_messages_api_status_with_error_is_published(harness: Harness) -> None:
    status = await harness.fake.send_status(
        harness.url("main", "messages/status"),
        message_uuid=str(uuid.uuid4()),
        status="rejected",
        to="447700900123",
        sender="447700900000",
        client_ref="c0ffee00-0000-4000-8000-00000000000a",
        error_code="1320",
    )
    assert status == 200
    event, key = await harness.next_event()
    assert key == "message.status.sms.vonage"
    assert event.status.state == DeliveryState.DELIVERY_STATE_FAILED
    assert event.status.reason_code == "1320"
    assert event.status.permanent is True
    assert event.causation_id == "c0ffee00-0000-4000-8000-00000000000a"
