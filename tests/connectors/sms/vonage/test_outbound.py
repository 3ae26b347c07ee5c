"""Sends through the Messages API against the fake Vonage, driven by real commands.

A command goes onto the bus, the service's worker calls the fake over HTTP,
and the outcome comes back as status events; the fake then plays signed
status webhooks back to the connector. Each failure mode is checked by the
exact number of provider calls it causes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from connectors.sms.vonage.connector import MAX_TEXT_LENGTH
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.content_pb2 import Attachment, Text, TextFormat
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.message_pb2 import Direction, Message
from gateway.api.v1.participant_pb2 import Participant
from gateway.contract import new_id
from gateway.runtime.codec import encode_command
from gateway.runtime.topology import COMMANDS_EXCHANGE
from gateway.testing.fake_vonage import FakeVonage
from tests.connectors.sms.vonage.conftest import (
    API_KEY,
    CUSTOMER,
    Harness,
    make_secrets,
    start_harness,
    stop_harness,
)

S = DeliveryState


def command(
    text: str = "Your order ships today.", to: str = CUSTOMER, account: str = "main"
) -> SendMessageCommand:
    return SendMessageCommand(
        message_id=new_id(),
        channel="sms",
        provider="vonage",
        account=account,
        correlation_id="order-1234",
        message=Message(
            direction=Direction.DIRECTION_OUTBOUND,
            recipients=[Participant(channel="sms", address=to)],
            text=Text(body=text, format=TextFormat.TEXT_FORMAT_PLAIN),
        ),
    )


async def send(harness: Harness, cmd: SendMessageCommand) -> None:
    routing_key, message = encode_command(cmd)
    await harness.bus.publish(COMMANDS_EXCHANGE, routing_key, message, timeout=5)


async def statuses(harness: Harness, count: int) -> list[Event]:
    events = [(await harness.next_event())[0] for _ in range(count)]
    assert all(e.type == "message.status" for e in events)
    return events


async def test_send_then_signed_status_webhooks(harness: Harness) -> None:
    cmd = command("Your parcel 📦 ships today")
    await send(harness, cmd)
    events = await statuses(harness, 3)
    by_state = {e.status.state: e for e in events}
    assert set(by_state) == {
        S.DELIVERY_STATE_ACCEPTED,
        S.DELIVERY_STATE_SENT,
        S.DELIVERY_STATE_DELIVERED,
    }
    accepted = by_state[S.DELIVERY_STATE_ACCEPTED].status
    uuid = accepted.provider_message_id
    assert uuid
    assert accepted.segments == 1
    assert by_state[S.DELIVERY_STATE_ACCEPTED].attributes["sms.encoding"] == "UCS-2"
    for event in events:
        assert event.status.message_id == cmd.message_id
        assert event.status.provider_message_id == uuid
    assert by_state[S.DELIVERY_STATE_SENT].status.provider_status == "submitted"
    assert len(harness.fake.calls) == 1
    call = harness.fake.calls[0]
    assert call.body["to"] == "447700900123"
    assert call.body["from"] == "447700900000"
    assert call.body["channel"] == "sms"
    assert call.body["message_type"] == "text"
    assert call.body["text"] == "Your parcel 📦 ships today"
    assert call.body["client_ref"] == cmd.message_id
    assert call.body["sms"] == {"encoding_type": "unicode"}
    # The status URL, with the send span's traceparent for the status webhooks to link to.
    status_url, _, trace_query = call.body["webhook_url"].partition("?")
    assert status_url == harness.url("main", "messages/status")
    assert trace_query.startswith("traceparent=00-")
    assert call.authorization.startswith("Basic ")
    assert [c.http_status for c in harness.fake.callbacks_sent] == [200, 200]
    await harness.assert_nothing_published()


async def test_long_gsm_text_counts_segments(harness: Harness) -> None:
    harness.fake.callback_statuses = ()
    await send(harness, command("x" * 400))
    (event,) = await statuses(harness, 1)
    assert event.status.segments == 3
    assert harness.fake.calls[0].body["sms"] == {"encoding_type": "text"}


async def test_rate_limited_send_waits_retry_after_then_succeeds(harness: Harness) -> None:
    harness.fake.callback_statuses = ()
    harness.fake.rate_limit_next(retry_after=1)
    started = time.monotonic()
    await send(harness, command())
    (event,) = await statuses(harness, 1)
    assert event.status.state == S.DELIVERY_STATE_ACCEPTED
    assert len(harness.fake.calls) == 2
    # The second call waited for the provider's Retry-After, not the 10 ms backoff.
    assert time.monotonic() - started >= 0.9


async def test_server_errors_are_retried_until_success(harness: Harness) -> None:
    harness.fake.callback_statuses = ()
    harness.fake.server_error_next(500)
    harness.fake.server_error_next(503)
    await send(harness, command())
    (event,) = await statuses(harness, 1)
    assert event.status.state == S.DELIVERY_STATE_ACCEPTED
    assert len(harness.fake.calls) == 3


async def test_persistent_server_errors_fail_after_max_attempts(harness: Harness) -> None:
    for _ in range(4):
        harness.fake.server_error_next(502)
    await send(harness, command())
    (event,) = await statuses(harness, 1)
    assert event.status.state == S.DELIVERY_STATE_FAILED
    assert event.status.permanent is False
    assert event.status.reason_code == "http_502"
    assert len(harness.fake.calls) == 4


async def test_timeout_after_sending_is_ambiguous_and_not_retried(harness: Harness) -> None:
    harness.fake.hang_next(1.5)  # the client gives up after 1 s
    await send(harness, command())
    (event,) = await statuses(harness, 1)
    assert event.status.state == S.DELIVERY_STATE_FAILED
    assert event.status.reason_code == "ambiguous_send"
    assert event.status.permanent is False
    assert len(harness.fake.calls) == 1


@pytest.mark.parametrize(("status", "code"), [(422, "1150"), (402, "low-balance"), (403, "1060")])
async def test_rejection_is_one_permanent_failure(harness: Harness, status: int, code: str) -> None:
    harness.fake.reject_next(status=status, code=code)
    await send(harness, command())
    (event,) = await statuses(harness, 1)
    assert event.status.state == S.DELIVERY_STATE_FAILED
    assert event.status.permanent is True
    assert event.status.reason_code == code
    assert len(harness.fake.calls) == 1


async def test_wrong_api_secret_is_a_permanent_401(harness: Harness) -> None:
    harness.fake.api_secret = "not-the-configured-secret"
    await send(harness, command())
    (event,) = await statuses(harness, 1)
    assert event.status.state == S.DELIVERY_STATE_FAILED
    assert event.status.permanent is True
    assert event.status.reason_code == "unauthorized"
    assert len(harness.fake.calls) == 1


def _with_media() -> SendMessageCommand:
    cmd = command()
    cmd.message.attachments.append(Attachment(url="https://example.com/a.jpg"))
    return cmd


@pytest.mark.parametrize(
    ("cmd", "code"),
    [
        (command(to="12"), "invalid_address"),
        (command(to="+44 77 00 !!x"), "invalid_address"),
        (command(text=""), "empty_message"),
        (command(text="a" * (MAX_TEXT_LENGTH + 1)), "text_too_long"),
        (command(account="nope"), "unknown_account"),
        (_with_media(), "unsupported_content"),
    ],
)
async def test_invalid_commands_fail_without_calling_vonage(
    harness: Harness, cmd: SendMessageCommand, code: str
) -> None:
    await send(harness, cmd)
    (event,) = await statuses(harness, 1)
    assert event.status.state == S.DELIVERY_STATE_FAILED
    assert event.status.permanent is True
    assert event.status.reason_code == code
    assert harness.fake.calls == []


# -- application JWT auth ------------------------------------------------------------


@pytest.fixture
async def jwt_harness(tmp_path: Path) -> AsyncIterator[Harness]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_file = tmp_path / "private.key"
    key_file.write_bytes(pem)
    env = make_secrets()
    application_id = "aaaaaaaa-bbbb-cccc-dddd-0123456789ab"
    fake = FakeVonage(
        api_key=API_KEY,
        signature_secret=env["VONAGE_SIGNATURE_SECRET"],
        application_id=application_id,
        public_key=public.decode(),
    )
    accounts = {
        "main": {
            "api_key": API_KEY,
            "application_id": application_id,
            "private_key": {"file": str(key_file)},
            "signature_secret": {"env": "VONAGE_SIGNATURE_SECRET"},
            "numbers": ["+447700900000"],
        }
    }
    running = await start_harness("memory://", env=env, fake=fake, accounts=accounts)
    try:
        yield running
    finally:
        await stop_harness(running)


async def test_application_jwt_auth(jwt_harness: Harness) -> None:
    cmd = command()
    await send(jwt_harness, cmd)
    events = await statuses(jwt_harness, 3)
    assert {e.status.state for e in events} == {
        S.DELIVERY_STATE_ACCEPTED,
        S.DELIVERY_STATE_SENT,
        S.DELIVERY_STATE_DELIVERED,
    }
    (call,) = jwt_harness.fake.calls
    scheme, _, token = call.authorization.partition(" ")
    assert scheme == "Bearer"
    claims = jwt.decode(token, jwt_harness.fake.public_key, algorithms=["RS256"])
    assert claims["application_id"] == "aaaaaaaa-bbbb-cccc-dddd-0123456789ab"
    assert claims["exp"] - claims["iat"] == 900
    # The status webhooks name the application; the account accepts them.
    assert [c.http_status for c in jwt_harness.fake.callbacks_sent] == [200, 200]


async def test_status_webhook_of_another_application_is_refused(jwt_harness: Harness) -> None:
    jwt_harness.fake.application_id = "ffffffff-bbbb-cccc-dddd-0123456789ab"
    status = await jwt_harness.fake.send_status(
        jwt_harness.url("main", "messages/status"),
        message_uuid="aaaaaaaa-0000-cccc-dddd-0123456789ab",
        status="delivered",
        to="447700900123",
        sender="447700900000",
    )
    assert status == 403
    await jwt_harness.assert_nothing_published()


async def test_concurrent_sends_each_call_once(harness: Harness) -> None:
    harness.fake.callback_statuses = ()
    commands = [command(f"message {n}") for n in range(10)]
    await asyncio.gather(*(send(harness, c) for c in commands))
    events = await statuses(harness, 10)
    assert {e.status.message_id for e in events} == {c.message_id for c in commands}
    assert sorted(c.body["client_ref"] for c in harness.fake.calls) == sorted(
        c.message_id for c in commands
    )
