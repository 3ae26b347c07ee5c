"""The Vonage SMS connector passes the connector conformance suite.

Inbound webhooks are SMS API inbound SMS signed by Vonage's own SDK
(``vonage_http_client.auth.Auth``, HMAC-SHA256); status callbacks are Messages
API status webhooks with an HS256 JWT carrying ``payload_hash``.

Vonage has no batched webhook payload: every SMS API or Messages API webhook
carries exactly one message or status. The nearest thing, a concatenated SMS,
arrives as one webhook per part, so the two batch checks are restated for
that: every part of a multi-part SMS is emitted, and after one part's publish
fails, the retry emits only that part.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlencode

from vonage_http_client.auth import Auth

from connectors.sms.vonage import webhooks
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.content_pb2 import Text, TextFormat
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.message_pb2 import Direction, Message
from gateway.api.v1.participant_pb2 import Participant
from gateway.testing.conformance import (
    BatchCase,
    ConnectorConformance,
    FakeProvider,
    FlakyBus,
    StatusCase,
    WebhookCall,
)
from gateway.testing.fake_vonage import FakeVonage, signed_webhook_headers

API_KEY = "abcd1234"
OTHER_API_KEY = "ef567890"
OUR_NUMBER = "447700900000"
CUSTOMER = "447700900123"
API_SECRET = secrets.token_hex(16)
SIGNATURE_SECRET = secrets.token_hex(24)
OTHER_SIGNATURE_SECRET = secrets.token_hex(24)
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def sdk_sign(params: dict[str, str], secret: str = SIGNATURE_SECRET) -> str:
    """``sig`` as Vonage's SDK computes it (HMAC-SHA256)."""
    auth = Auth(api_key=API_KEY, signature_secret=secret, signature_method="sha256")
    return str(auth.sign_params(dict(params)))


def inbound_params(message_id: str, **extra: str) -> dict[str, str]:
    """An SMS API inbound SMS as documented."""
    return {
        "msisdn": CUSTOMER,
        "to": OUR_NUMBER,
        "messageId": message_id,
        "text": "Hello from the handset",
        "type": "text",
        "keyword": "HELLO",
        "api-key": API_KEY,
        "message-timestamp": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "timestamp": str(int(time.time())),
        "nonce": str(uuid.uuid4()),
        **extra,
    }


def form_call(
    url: str, params: dict[str, str], *, sig: str | None, description: str = ""
) -> WebhookCall:
    body = dict(params, sig=sig) if sig is not None else params
    return WebhookCall(
        url=url, headers=FORM, body=urlencode(body).encode(), description=description
    )


def signed_form_call(url: str, params: dict[str, str], description: str = "") -> WebhookCall:
    return form_call(url, params, sig=sdk_sign(params), description=description)


def json_call(
    url: str, payload: dict[str, Any], *, secret: str = SIGNATURE_SECRET, description: str = ""
) -> WebhookCall:
    body = json.dumps(payload).encode()
    headers = signed_webhook_headers(body, secret, api_key=API_KEY)
    return WebhookCall(url=url, headers=headers, body=body, description=description)


class TestVonageConformance(ConnectorConformance):
    connector = "sms.vonage"

    def connector_settings(self, api_base_url: str) -> dict[str, Any]:
        return {
            "api_base_url": api_base_url,
            "accounts": {
                "main": {
                    "api_key": API_KEY,
                    "api_secret": {"env": "TEST_VONAGE_API_SECRET"},
                    "signature_secret": {"env": "TEST_VONAGE_SIGNATURE_SECRET"},
                    "signature_method": "sha256",
                    "numbers": ["+" + OUR_NUMBER],
                },
                "other": {
                    "api_key": OTHER_API_KEY,
                    "api_secret": {"env": "TEST_VONAGE_API_SECRET"},
                    "signature_secret": {"env": "TEST_VONAGE_OTHER_SIGNATURE_SECRET"},
                    "signature_method": "sha256",
                },
            },
        }

    def environ(self) -> dict[str, str]:
        return {
            "TEST_VONAGE_API_SECRET": API_SECRET,
            "TEST_VONAGE_SIGNATURE_SECRET": SIGNATURE_SECRET,
            "TEST_VONAGE_OTHER_SIGNATURE_SECRET": OTHER_SIGNATURE_SECRET,
        }

    def fake_provider(self) -> FakeProvider:
        return FakeVonage(
            api_key=API_KEY,
            api_secret=API_SECRET,
            signature_secret=SIGNATURE_SECRET,
            callback_statuses=(),
        )

    def new_provider_message_id(self) -> str:
        return uuid.uuid4().hex[:16].upper()

    def inbound_webhook(self, base_url: str, provider_message_id: str) -> WebhookCall:
        url = f"{base_url}/webhooks/sms/vonage/main/inbound"
        return signed_form_call(url, inbound_params(provider_message_id), "inbound SMS")

    def forgeries(self, base_url: str, provider_message_id: str) -> Sequence[WebhookCall]:
        url = f"{base_url}/webhooks/sms/vonage/main/inbound"
        params = inbound_params(provider_message_id)
        good = sdk_sign(params)
        stale = dict(params, timestamp=str(int(time.time()) - 3600))
        messages_url = f"{base_url}/webhooks/sms/vonage/main/messages/inbound"
        payload = {
            "channel": "sms",
            "message_type": "text",
            "message_uuid": str(uuid.uuid4()),
            "to": OUR_NUMBER,
            "from": CUSTOMER,
            "text": "Hello",
        }
        signed = json_call(messages_url, payload)
        return [
            form_call(
                url, dict(params, text="Send me the money"), sig=good, description="tampered text"
            ),
            form_call(url, dict(params, extra="1"), sig=good, description="added parameter"),
            form_call(
                url,
                {k: v for k, v in params.items() if k != "keyword"},
                sig=good,
                description="removed parameter",
            ),
            form_call(
                url,
                params,
                sig=sdk_sign(params, OTHER_SIGNATURE_SECRET),
                description="wrong secret",
            ),
            form_call(url, params, sig=None, description="no sig"),
            form_call(url, params, sig="", description="empty sig"),
            form_call(url, params, sig="%%not-hex%%", description="malformed sig"),
            form_call(url, params, sig=good[:-4], description="truncated sig"),
            signed_form_call(url, stale, "stale timestamp"),
            signed_form_call(
                url.replace("/main/", "/nobody/"), params, "unknown account in the URL"
            ),
            signed_form_call(
                url, dict(params, **{"api-key": OTHER_API_KEY}), "api-key of another account"
            ),
            WebhookCall(
                url=messages_url,
                headers=signed.headers,
                body=signed.body.replace(b"Hello", b"Hellx"),
                description="Messages API: tampered body",
            ),
            json_call(
                messages_url,
                payload,
                secret=OTHER_SIGNATURE_SECRET,
                description="Messages API: wrong secret",
            ),
            WebhookCall(
                url=messages_url,
                headers={"Content-Type": "application/json"},
                body=signed.body,
                description="Messages API: no JWT",
            ),
        ]

    def status_case(self, base_url: str, provider_message_id: str, message_id: str) -> StatusCase:
        url = f"{base_url}/webhooks/sms/vonage/main/messages/status"
        calls = [
            json_call(
                url,
                {
                    "message_uuid": provider_message_id,
                    "to": CUSTOMER,
                    "from": OUR_NUMBER,
                    "timestamp": f"2026-03-01T12:00:0{n}.000Z",
                    "status": status,
                    "channel": "sms",
                    "client_ref": message_id,
                },
                description=status,
            )
            for n, status in enumerate(("submitted", "delivered"))
        ]
        return StatusCase(calls=calls, final_state=DeliveryState.DELIVERY_STATE_DELIVERED)

    def _parts(self, base_url: str, ref: str) -> list[WebhookCall]:
        url = f"{base_url}/webhooks/sms/vonage/main/inbound"
        texts = ("This is a long message in ", "three parts that arrive as ", "three webhooks.")
        return [
            signed_form_call(
                url,
                inbound_params(
                    self.new_provider_message_id(),
                    text=text,
                    concat="true",
                    **{"concat-ref": ref, "concat-total": "3", "concat-part": str(n)},
                ),
                f"part {n}",
            )
            for n, text in enumerate(texts, start=1)
        ]

    def batch_case(self, base_url: str) -> BatchCase:
        # Only used by the manifest check here: one part of a concatenated SMS.
        (first, *_) = self._parts(base_url, "17")

        def items_of(events: Sequence[Event]) -> list[str]:
            return [e.attributes.get("sms.concat_part", "") for e in events]

        return BatchCase(call=first, expected_items=frozenset({"1"}), items_of=items_of)

    async def test_batch_webhook_yields_every_item(self) -> None:
        async with self.running() as h:
            for call in self._parts(h.base_url, "42"):
                status, _ = await h.post(call)
                assert 200 <= status < 300
            events = await h.wait_for(lambda e: e.type == "message.received", 3)
            assert sorted(e.sequence for e in events) == [1, 2, 3]
            assert {e.attributes["sms.concat_ref"] for e in events} == {"42"}

    async def test_batch_retry_after_partial_failure_emits_only_what_is_missing(self) -> None:
        async with self.running(bus=FlakyBus(failures=1)) as h:
            first, *rest = self._parts(h.base_url, "43")
            status, _ = await h.post(first)
            assert status == 503
            for call in rest:
                status, _ = await h.post(call)
                assert 200 <= status < 300
            status, _ = await h.post(first)  # Vonage's retry of the failed part
            assert 200 <= status < 300
            for call in rest:  # and a stray retry of the others
                status, _ = await h.post(call)
                assert 200 <= status < 300
            events = await h.wait_for(lambda e: True, 3)
            assert len(events) == 3
            assert sorted(e.sequence for e in events) == [1, 2, 3]

    def send_command(self, message_id: str) -> SendMessageCommand:
        return SendMessageCommand(
            message_id=message_id,
            channel="sms",
            provider="vonage",
            account="main",
            message=Message(
                direction=Direction.DIRECTION_OUTBOUND,
                recipients=[Participant(channel="sms", address="+" + CUSTOMER)],
                text=Text(body="Your order ships today.", format=TextFormat.TEXT_FORMAT_PLAIN),
            ),
        )


def test_the_sdk_signer_agrees_with_ours() -> None:
    # The adapter signs with the SDK; the connector verifies with its own code.
    params = inbound_params("0A00000000000001")
    assert sdk_sign(params) == webhooks.compute_signature(params, SIGNATURE_SECRET, "sha256")
