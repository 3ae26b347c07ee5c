"""voice.vonage passes the voice connector conformance suite unchanged.

Webhooks are signed as Vonage signs them (HS256 JWT with ``payload_hash``,
:func:`gateway.testing.fake_vonage.signed_webhook_headers`); every valid token
is also checked with Vonage's own ``vonage_jwt.verify_signature`` as an
oracle. The fake Voice API is :class:`~gateway.testing.fake_vonage.FakeVonage`,
which verifies the connector's RS256 application JWTs with the public key.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Collection, Sequence
from typing import Any
from urllib.parse import urlencode

import jwt
import yaml
from vonage_jwt import verify_signature  # type: ignore[import-untyped]

from gateway.api.v1.call_pb2 import CallState
from gateway.testing.conformance import FakeProvider, WebhookCall
from gateway.testing.fake_vonage import FakeVonage, iso_now, signed_webhook_headers
from gateway.testing.voice_conformance import ProviderCallRequest, VoiceConnectorConformance
from tests.connectors.voice.schemas import check_ncco
from tests.connectors.voice.test_flow import FLOWS_YAML
from tests.connectors.voice.test_vonage_calls import RsaKey
from tests.integration.conftest import vhost  # noqa: F401 - the RabbitMQ checks' fixture

C = CallState
APPLICATION_ID = str(uuid.UUID(int=666))
OTHER_APPLICATION_ID = str(uuid.UUID(int=667))
API_KEY = "abcd1234"
SECRET = secrets.token_hex(24)
OTHER_SECRET = secrets.token_hex(24)
SECRET_ENV = "TEST_VONAGE_VOICE_CONFORMANCE_SECRET"
KEY_ENV = "TEST_VONAGE_VOICE_CONFORMANCE_KEY"
#: The number the test flows answer (E.164 digits, as Vonage writes numbers).
OUR_NUMBER = "14155550100"
CALLER = "447700900123"
#: One application key pair for the module (RSA generation is the slow part).
KEY = RsaKey()

#: Canonical state -> the status Vonage's event webhook reports it with.
CALL_STATUS = {
    C.CALL_STATE_INITIATED: "started",
    C.CALL_STATE_RINGING: "ringing",
    C.CALL_STATE_ANSWERED: "answered",
    C.CALL_STATE_COMPLETED: "completed",
    C.CALL_STATE_BUSY: "busy",
    C.CALL_STATE_NO_ANSWER: "timeout",
    C.CALL_STATE_FAILED: "failed",
    C.CALL_STATE_CANCELED: "cancelled",
}


def _route(base_url: str, route: str, account: str = "main") -> str:
    return f"{base_url}/webhooks/voice/vonage/{account}/{route}"


def _fake(provider: FakeProvider) -> FakeVonage:
    assert isinstance(provider, FakeVonage)
    return provider


def _token(secret: str, body: bytes, **claims: Any) -> str:
    """A webhook JWT as Vonage signs it, with ``claims`` changed (None drops one)."""
    signed = signed_webhook_headers(body, secret, api_key=API_KEY, application_id=APPLICATION_ID)[
        "Authorization"
    ].removeprefix("Bearer ")
    if claims:
        decoded = jwt.decode(signed, options={"verify_signature": False})
        decoded.update(claims)
        signed = jwt.encode(
            {k: v for k, v in decoded.items() if v is not None}, secret, algorithm="HS256"
        )
    return signed


def _signed(
    url: str,
    body: bytes | None,
    *,
    description: str,
    secret: str = SECRET,
    authorization: str | None = None,
    signed_body: bytes | None = None,
    **claims: Any,
) -> WebhookCall:
    """A GET (``body`` None) or JSON POST carrying a Vonage webhook JWT.

    The token covers ``signed_body`` when given (a tampered body), else the
    body sent; ``authorization`` replaces the header outright.
    """
    sent = b"" if body is None else body
    headers = {} if body is None else {"Content-Type": "application/json"}
    if authorization is None:
        token = _token(secret, sent if signed_body is None else signed_body, **claims)
        if secret == SECRET and not claims and signed_body is None:
            # Vonage's SDK agrees the token is signed with the account's secret.
            assert verify_signature(token, SECRET)
        authorization = f"Bearer {token}"
    if authorization:
        headers["Authorization"] = authorization
    return WebhookCall(
        url=url,
        headers=headers,
        body=sent,
        method="GET" if body is None else "POST",
        description=description,
    )


class TestVonageVoiceConformance(VoiceConnectorConformance):
    connector = "voice.vonage"
    answer_content_type = "application/json"
    start_actions = ("talk", "stream", "talk", "input")

    def connector_settings(self, api_base_url: str) -> dict[str, Any]:
        return {
            "accounts": {
                "main": {
                    "application_id": APPLICATION_ID,
                    "signature_secret": {"env": SECRET_ENV},
                    "private_key": {"env": KEY_ENV},
                    "caller_number": "+" + OUR_NUMBER,
                }
            },
            "call_flows": yaml.safe_load(FLOWS_YAML),
            "api_base_url": api_base_url,
        }

    def environ(self) -> dict[str, str]:
        return {SECRET_ENV: SECRET, KEY_ENV: KEY.private}

    def fake_provider(self) -> FakeProvider:
        # Placed calls start, ring and are answered (their events reach the
        # event route), and stay live until hung up.
        return FakeVonage(
            api_key=API_KEY,
            signature_secret=SECRET,
            application_id=APPLICATION_ID,
            public_key=KEY.public,
        )

    def provider_requests(self, provider: FakeProvider) -> Sequence[ProviderCallRequest]:
        found = []
        for r in _fake(provider).voice_requests:
            if r.method == "POST" and r.path == "/v1/calls":
                found.append(ProviderCallRequest(kind="create"))
            elif r.method == "PUT" and r.path.startswith("/v1/calls/"):
                found.append(
                    ProviderCallRequest(kind="update", call_id=r.path.removeprefix("/v1/calls/"))
                )
            else:
                raise AssertionError(f"unexpected Voice API request {r.method} {r.path}")
        return found

    def placed_calls(self, provider: FakeProvider) -> Collection[str]:
        return set(_fake(provider).voice_calls)

    def new_call_id(self) -> str:
        return str(uuid.uuid4())

    def _answer_url(self, base_url: str, call_id: str, account: str = "main") -> str:
        # Vonage's default answer_method is GET with the call in the query.
        query = {
            "to": OUR_NUMBER,
            "from": CALLER,
            "uuid": call_id,
            "conversation_uuid": f"CON-{call_id}",
        }
        return f"{_route(base_url, 'answer', account)}?{urlencode(query)}"

    def answer_webhook(self, base_url: str, call_id: str) -> WebhookCall:
        return _signed(self._answer_url(base_url, call_id), None, description="answer_url")

    def document_actions(self, body: bytes) -> list[str]:
        return [str(action["action"]) for action in check_ncco(json.loads(body))]

    def _event_body(self, call_id: str, state: CallState.ValueType) -> bytes:
        payload: dict[str, Any] = {
            "from": CALLER,
            "to": OUR_NUMBER,
            "uuid": call_id,
            "conversation_uuid": f"CON-{call_id}",
            "status": CALL_STATUS[state],
            "direction": "inbound",
            "timestamp": iso_now(),
        }
        if state == C.CALL_STATE_COMPLETED:
            payload |= {
                "duration": "42",
                "rate": "0.01270000",
                "price": "0.00889000",
                "network": "23410",
                "start_time": iso_now(),
                "end_time": iso_now(),
            }
        return json.dumps(payload).encode()

    def status_callback(
        self, base_url: str, call_id: str, state: CallState.ValueType
    ) -> WebhookCall:
        return _signed(
            _route(base_url, "event"),
            self._event_body(call_id, state),
            description=f"event {CALL_STATUS[state]}",
        )

    def forgeries(self, base_url: str, call_id: str) -> Sequence[WebhookCall]:
        answer = self._answer_url(base_url, call_id)
        event = _route(base_url, "event")
        body = self._event_body(call_id, C.CALL_STATE_COMPLETED)
        tampered = body.replace(b'"completed"', b'"busy"')
        assert tampered != body
        now = int(time.time())
        unsigned = jwt.encode({"iat": now, "payload_hash": "0" * 64}, key="", algorithm="none")
        return [
            _signed(answer, None, description="answer: no Authorization", authorization=""),
            _signed(answer, None, description="answer: wrong secret", secret=OTHER_SECRET),
            _signed(answer, None, description="answer: malformed token",
                    authorization="Bearer not.a.jwt"),
            _signed(answer, None, description="answer: Basic scheme",
                    authorization="Basic YWJjZDEyMzQ6c2VjcmV0"),
            _signed(answer, None, description="answer: alg none",
                    authorization=f"Bearer {unsigned}"),
            _signed(answer, None, description="answer: stale iat", iat=now - 3600),
            _signed(answer, None, description="answer: iat in the future", iat=now + 3600),
            _signed(answer, None, description="answer: no payload_hash", payload_hash=None),
            _signed(answer, None, description="answer: application_id of another application",
                    application_id=OTHER_APPLICATION_ID),
            _signed(self._answer_url(base_url, call_id, "nobody"), None,
                    description="answer: unknown account"),
            _signed(event, tampered, description="event: tampered body", signed_body=body),
            _signed(event, body, description="event: wrong secret", secret=OTHER_SECRET),
            _signed(event, body, description="event: no Authorization", authorization=""),
            _signed(event, body, description="event: stale iat", iat=now - 3600),
            _signed(_route(base_url, "event", "nobody"), body,
                    description="event: unknown account"),
        ]  # fmt: skip
