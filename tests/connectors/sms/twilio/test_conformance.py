"""The Twilio SMS connector passes the connector conformance suite unchanged."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
    StatusCase,
    WebhookCall,
)
from gateway.testing.fake_twilio import FakeTwilio
from tests.connectors.sms.twilio import support as tw

TOKEN = tw.new_token()
OTHER_TOKEN = tw.new_token()


def _inbound_url(base_url: str, account: str = "main") -> str:
    return f"{base_url}/webhooks/sms/twilio/{account}/inbound"


class TestTwilioConformance(ConnectorConformance):
    connector = "sms.twilio"

    def connector_settings(self, api_base_url: str) -> dict[str, Any]:
        return tw.settings(api_base_url)

    def environ(self) -> dict[str, str]:
        return {tw.TOKEN_ENV: TOKEN}

    def fake_provider(self) -> FakeProvider:
        return FakeTwilio(auth_token=TOKEN, callback_statuses=())

    def new_provider_message_id(self) -> str:
        return tw.message_sid()

    def inbound_webhook(self, base_url: str, provider_message_id: str) -> WebhookCall:
        return tw.form_call(
            _inbound_url(base_url), tw.inbound_params(provider_message_id), token=TOKEN
        )

    def forgeries(self, base_url: str, provider_message_id: str) -> Sequence[WebhookCall]:
        url = _inbound_url(base_url)
        params = tw.inbound_params(provider_message_id)
        good = tw.sign(TOKEN, url, list(params.items()))
        tampered = {**params, "Body": "Send me the money"}
        added = {**params, "Extra": "1"}
        removed = {k: v for k, v in params.items() if k != "FromCountry"}
        return [
            tw.form_call(url, tampered, token=None, signature=good, description="tampered Body"),
            tw.form_call(url, added, token=None, signature=good, description="added parameter"),
            tw.form_call(url, removed, token=None, signature=good, description="removed parameter"),
            tw.form_call(url, params, token=OTHER_TOKEN, description="signed with a wrong token"),
            tw.form_call(url, params, token=None, description="no X-Twilio-Signature"),
            tw.form_call(url, params, token=None, signature="", description="empty signature"),
            tw.form_call(url, params, token=None, signature="%%%not-b64", description="malformed"),
            tw.form_call(
                url, params, token=None, signature=good[:-4], description="truncated signature"
            ),
            tw.form_call(
                url + "?x=1", params, token=None, signature=good, description="URL changed"
            ),
            tw.form_call(
                _inbound_url(base_url, "nobody"),
                params,
                token=TOKEN,
                description="unknown account in the URL",
            ),
            tw.form_call(
                url,
                {**params, "AccountSid": tw.OTHER_ACCOUNT_SID},
                token=TOKEN,
                description="valid signature, AccountSid of another account",
            ),
            tw.form_call(
                url,
                params,
                token=TOKEN,
                extra_headers={"X-Twilio-Webhooks-Signature-Settings": "algorithm=HMAC_MD5"},
                description="unsupported signature algorithm",
            ),
        ]

    def status_case(self, base_url: str, provider_message_id: str, message_id: str) -> StatusCase:
        url = f"{base_url}/webhooks/sms/twilio/main/status?mid={message_id}"
        return StatusCase(
            calls=[
                tw.form_call(
                    url,
                    tw.status_params(provider_message_id, status),
                    token=TOKEN,
                    description=status,
                )
                for status in ("queued", "sent", "delivered")
            ],
            final_state=DeliveryState.DELIVERY_STATE_DELIVERED,
        )

    def batch_case(self, base_url: str) -> BatchCase:
        # Twilio sends one message per webhook; its batch is an MMS's media list.
        sid = "MM" + tw.message_sid()[2:]
        media = {
            f"{tw.MEDIA_BASE}/Messages/{sid}/Media/ME{i}": t
            for i, t in enumerate(("image/jpeg", "image/png", "video/mp4"))
        }
        params = tw.inbound_params(sid, body="", NumMedia=str(len(media)))
        for i, (media_url, content_type) in enumerate(media.items()):
            params[f"MediaUrl{i}"] = media_url
            params[f"MediaContentType{i}"] = content_type

        def items_of(events: Sequence[Event]) -> list[str]:
            return [
                a.url for e in events if e.type == "message.received" for a in e.message.attachments
            ]

        return BatchCase(
            call=tw.form_call(_inbound_url(base_url), params, token=TOKEN, description="MMS"),
            expected_items=frozenset(media),
            items_of=items_of,
        )

    def send_command(self, message_id: str) -> SendMessageCommand:
        return SendMessageCommand(
            message_id=message_id,
            channel="sms",
            provider="twilio",
            account="main",
            message=Message(
                direction=Direction.DIRECTION_OUTBOUND,
                recipients=[Participant(channel="sms", address=tw.CUSTOMER)],
                text=Text(body="Your order ships today.", format=TextFormat.TEXT_FORMAT_PLAIN),
            ),
        )
