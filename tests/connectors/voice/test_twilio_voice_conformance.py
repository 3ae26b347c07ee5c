"""voice.twilio passes the voice connector conformance suite unchanged.

Webhooks are signed by Twilio's own SDK (``RequestValidator``, through the SMS
support module), never by our verifier; the fake Calls API is
:class:`~gateway.testing.fake_twilio.FakeTwilio`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import yaml

from gateway.api.v1.call_pb2 import CallState
from gateway.testing.conformance import FakeProvider, WebhookCall
from gateway.testing.fake_twilio import FakeTwilio
from gateway.testing.voice_conformance import ProviderCallRequest, VoiceConnectorConformance
from tests.connectors.sms.twilio import support as tw
from tests.connectors.voice.conftest import ACCOUNT_SID, OUR_NUMBER, call_params, call_sid
from tests.connectors.voice.schemas import check_twiml
from tests.connectors.voice.test_flow import FLOWS_YAML
from tests.integration.conftest import vhost  # noqa: F401 - the RabbitMQ checks' fixture

C = CallState
TOKEN = tw.new_token()
OTHER_TOKEN = tw.new_token()
TOKEN_ENV = "TEST_TWILIO_VOICE_CONFORMANCE_TOKEN"
OTHER_ACCOUNT_SID = "AC" + "e5" * 16

#: Canonical state -> the CallStatus Twilio reports it with.
CALL_STATUS = {
    C.CALL_STATE_INITIATED: "initiated",
    C.CALL_STATE_RINGING: "ringing",
    C.CALL_STATE_ANSWERED: "in-progress",
    C.CALL_STATE_COMPLETED: "completed",
    C.CALL_STATE_BUSY: "busy",
    C.CALL_STATE_NO_ANSWER: "no-answer",
    C.CALL_STATE_FAILED: "failed",
    C.CALL_STATE_CANCELED: "canceled",
}
#: Twilio's order of a call's statuses (its SequenceNumber).
SEQUENCE = list(CALL_STATUS)


def _route(base_url: str, route: str, account: str = "main") -> str:
    return f"{base_url}/webhooks/voice/twilio/{account}/{route}"


def _fake(provider: FakeProvider) -> FakeTwilio:
    assert isinstance(provider, FakeTwilio)
    return provider


class TestTwilioVoiceConformance(VoiceConnectorConformance):
    connector = "voice.twilio"
    answer_content_type = "text/xml"
    start_actions = ("Say", "Play", "Gather")

    def connector_settings(self, api_base_url: str) -> dict[str, Any]:
        return {
            "accounts": {
                "main": {
                    "account_sid": ACCOUNT_SID,
                    "auth_token": {"env": TOKEN_ENV},
                    "caller_number": OUR_NUMBER,
                }
            },
            "call_flows": yaml.safe_load(FLOWS_YAML),
            "api_base_url": api_base_url,
        }

    def environ(self) -> dict[str, str]:
        return {TOKEN_ENV: TOKEN}

    def fake_provider(self) -> FakeProvider:
        # Placed calls ring and are answered (their callbacks reach the status
        # route), and stay live until hung up.
        return FakeTwilio(auth_token=TOKEN, call_progress=("initiated", "ringing", "answered"))

    def provider_requests(self, provider: FakeProvider) -> Sequence[ProviderCallRequest]:
        return [
            ProviderCallRequest(kind="update", call_id=r.call_sid)
            if r.call_sid
            else ProviderCallRequest(kind="create")
            for r in _fake(provider).call_requests
        ]

    def placed_calls(self, provider: FakeProvider) -> Collection[str]:
        return set(_fake(provider).placed)

    def new_call_id(self) -> str:
        return call_sid()

    def answer_webhook(self, base_url: str, call_id: str) -> WebhookCall:
        return tw.form_call(
            _route(base_url, "incoming"),
            call_params(call_id, "ringing"),
            token=TOKEN,
            description="incoming call",
        )

    def document_actions(self, body: bytes) -> list[str]:
        return [verb.tag for verb in check_twiml(body)]

    def _status_params(self, call_id: str, state: CallState.ValueType) -> dict[str, str]:
        status = CALL_STATUS[state]
        params = call_params(
            call_id,
            status,
            CallbackSource="call-progress-events",
            SequenceNumber=str(SEQUENCE.index(state)),
            Timestamp=format_datetime(datetime.now(UTC)),
        )
        if state in (C.CALL_STATE_COMPLETED, C.CALL_STATE_BUSY, C.CALL_STATE_NO_ANSWER):
            params["CallDuration"] = "42" if state == C.CALL_STATE_COMPLETED else "0"
        return params

    def status_callback(
        self, base_url: str, call_id: str, state: CallState.ValueType
    ) -> WebhookCall:
        return tw.form_call(
            _route(base_url, "status"),
            self._status_params(call_id, state),
            token=TOKEN,
            description=f"status {CALL_STATUS[state]}",
        )

    def forgeries(self, base_url: str, call_id: str) -> Sequence[WebhookCall]:
        incoming = _route(base_url, "incoming")
        params = call_params(call_id, "ringing")
        good = tw.sign(TOKEN, incoming, list(params.items()))
        status_url = _route(base_url, "status")
        completed = self._status_params(call_id, C.CALL_STATE_COMPLETED)
        good_status = tw.sign(TOKEN, status_url, list(completed.items()))

        def form(url: str, p: dict[str, str], description: str, **kw: Any) -> WebhookCall:
            return tw.form_call(url, p, description=description, **kw)

        return [
            form(incoming, {**params, "From": "+15005550006"}, "tampered From", token=None,
                 signature=good),
            form(incoming, {**params, "Extra": "1"}, "added parameter", token=None,
                 signature=good),
            form(incoming, params, "signed with a wrong token", token=OTHER_TOKEN),
            form(incoming, params, "no X-Twilio-Signature", token=None),
            form(incoming, params, "empty signature", token=None, signature=""),
            form(incoming, params, "malformed signature", token=None, signature="%%%not-b64"),
            form(incoming, params, "truncated signature", token=None, signature=good[:-4]),
            form(incoming + "?x=1", params, "URL changed", token=None, signature=good),
            form(_route(base_url, "incoming", "nobody"), params, "unknown account", token=TOKEN),
            form(incoming, {**params, "AccountSid": OTHER_ACCOUNT_SID},
                 "valid signature, AccountSid of another account", token=TOKEN),
            form(status_url, {**completed, "CallStatus": "busy"}, "status: tampered CallStatus",
                 token=None, signature=good_status),
            form(status_url, completed, "status: signed with a wrong token", token=OTHER_TOKEN),
            form(status_url, completed, "status: no X-Twilio-Signature", token=None),
            form(_route(base_url, "status", "nobody"), completed, "status: unknown account",
                 token=TOKEN),
        ]  # fmt: skip
