"""Outbound: the Twilio connector against the fake Twilio API over real HTTP.

First the connector's ``send`` alone (what it posts, and which error type each
provider answer becomes), then whole commands through the service's command
worker: exact provider call counts and exactly one terminal status each.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from connectors.sms.twilio import TwilioSettings, TwilioSmsConnector
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.content_pb2 import Attachment, Media, MediaKind, Text
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.message_pb2 import Direction, Message
from gateway.api.v1.participant_pb2 import Participant
from gateway.contract import AmbiguousSendError, PermanentError, TransientError
from gateway.contract.status import fold
from gateway.runtime.telemetry import get_logger
from gateway.testing.conformance import SEND_SETTINGS, Harness, serve
from gateway.testing.fake_twilio import FakeTwilio
from tests.connectors.sms.twilio import support as tw

S = DeliveryState
TOKEN = tw.new_token()
ENV = {tw.TOKEN_ENV: TOKEN}
STATUS_URL = "https://hooks.example.com/webhooks/sms/twilio/{account}/status"


@dataclass
class Context:
    """The runtime's ConnectorContext, reduced to what a unit test needs."""

    http: aiohttp.ClientSession
    log: Any = field(default_factory=lambda: get_logger("test.twilio"))

    def webhook_url(self, route: str, **path_params: str) -> str:
        assert route == "status"
        return STATUS_URL.format(**path_params)

    def now(self) -> datetime:
        return datetime.now(UTC)


def command(
    *,
    to: str = tw.CUSTOMER,
    body: str = "Your order ships today.",
    media: list[str] | None = None,
    account: str = "main",
    sender: str = "",
) -> SendMessageCommand:
    message = Message(
        direction=Direction.DIRECTION_OUTBOUND,
        recipients=[Participant(channel="sms", address=to)],
        attachments=[Attachment(url=u) for u in media or []],
    )
    if sender:
        message.sender.CopyFrom(Participant(channel="sms", address=sender))
    if body or not media:
        message.text.CopyFrom(Text(body=body))
    else:
        message.media.CopyFrom(Media(kind=MediaKind.MEDIA_KIND_IMAGE))
    return SendMessageCommand(
        message_id=str(uuid.uuid4()),
        channel="sms",
        provider="twilio",
        account=account,
        message=message,
    )


@pytest.fixture
async def fake() -> AsyncIterator[FakeTwilio]:
    async with FakeTwilio(auth_token=TOKEN, callback_statuses=()) as server:
        yield server


@pytest.fixture
async def connector(fake: FakeTwilio) -> AsyncIterator[TwilioSmsConnector]:
    settings = TwilioSettings.model_validate(
        {
            **tw.settings(fake.url),
            "accounts": {
                "main": {
                    "account_sid": tw.ACCOUNT_SID,
                    "auth_token": {"env": tw.TOKEN_ENV},
                    "numbers": [tw.OUR_NUMBER],
                },
                "service": {
                    "account_sid": tw.OTHER_ACCOUNT_SID,
                    "auth_token": {"env": tw.TOKEN_ENV},
                    "messaging_service_sid": "MG" + "c3" * 16,
                },
            },
        },
        context={"environ": ENV},
    )
    timeout = aiohttp.ClientTimeout(total=0.5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        twilio = TwilioSmsConnector.create(Context(http=session), settings)
        await twilio.start()
        yield twilio
        await twilio.stop()


async def test_send_posts_what_twilio_documents(
    fake: FakeTwilio, connector: TwilioSmsConnector
) -> None:
    cmd = command(body="Hi 👋", media=["https://cdn.example/a.jpg", "https://cdn.example/b.png"])
    result = await connector.send(cmd)
    (call,) = fake.calls
    assert call.account_sid == tw.ACCOUNT_SID
    expected_auth = base64.b64encode(f"{tw.ACCOUNT_SID}:{TOKEN}".encode()).decode()
    assert call.authorization == f"Basic {expected_auth}"
    assert call.form["To"] == tw.CUSTOMER
    assert call.form["From"] == tw.OUR_NUMBER
    assert call.form["Body"] == "Hi 👋"
    assert call.form.getall("MediaUrl") == [
        "https://cdn.example/a.jpg",
        "https://cdn.example/b.png",
    ]
    callback = STATUS_URL.format(account="main") + f"?mid={cmd.message_id}"
    assert call.form["StatusCallback"] == callback
    assert result.provider_message_id.startswith("SM")
    assert result.account == "main"
    assert result.state == S.DELIVERY_STATE_QUEUED
    assert result.provider_status == "queued"
    assert result.segments == 1
    assert result.attributes["sms.encoding"] == "UCS-2"


async def test_send_through_a_messaging_service(
    fake: FakeTwilio, connector: TwilioSmsConnector
) -> None:
    await connector.send(command(account="service"))
    (call,) = fake.calls
    assert call.account_sid == tw.OTHER_ACCOUNT_SID
    assert call.form["MessagingServiceSid"] == "MG" + "c3" * 16
    assert "From" not in call.form


async def test_explicit_sender_and_normalized_recipient(
    fake: FakeTwilio, connector: TwilioSmsConnector
) -> None:
    await connector.send(command(to=" +44 7700 900123 ", sender="ACME"))
    (call,) = fake.calls
    assert call.form["To"] == "+447700900123"
    assert call.form["From"] == "ACME"


async def test_rate_limited_is_transient_with_retry_after(
    fake: FakeTwilio, connector: TwilioSmsConnector
) -> None:
    fake.rate_limit_next(retry_after=7)
    with pytest.raises(TransientError) as caught:
        await connector.send(command())
    assert caught.value.code == "rate_limited"
    assert caught.value.retry_after == 7.0
    assert len(fake.calls) == 1


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_error_is_transient(
    fake: FakeTwilio, connector: TwilioSmsConnector, status: int
) -> None:
    fake.server_error_next(status)
    with pytest.raises(TransientError) as caught:
        await connector.send(command())
    assert not isinstance(caught.value, AmbiguousSendError)
    assert caught.value.code == f"http_{status}"
    assert len(fake.calls) == 1


async def test_validation_error_is_permanent_with_twilio_code(
    fake: FakeTwilio, connector: TwilioSmsConnector
) -> None:
    fake.reject_next(code=21610, message="Attempt to send to unsubscribed recipient")
    with pytest.raises(PermanentError) as caught:
        await connector.send(command())
    assert caught.value.code == "21610"
    assert "unsubscribed" in str(caught.value)
    assert len(fake.calls) == 1


async def test_timeout_after_sending_is_ambiguous(
    fake: FakeTwilio, connector: TwilioSmsConnector
) -> None:
    fake.hang_next(1.5)
    with pytest.raises(AmbiguousSendError):
        await connector.send(command())
    assert len(fake.calls) == 1


async def test_refused_connection_is_transient_not_ambiguous(
    connector: TwilioSmsConnector, fake: FakeTwilio
) -> None:
    await fake.stop()  # nothing listens any more: the request never left
    with pytest.raises(TransientError) as caught:
        await connector.send(command())
    assert not isinstance(caught.value, AmbiguousSendError)
    assert caught.value.code == "connect_failed"


@pytest.mark.parametrize(
    ("cmd", "code"),
    [
        (command(to="not a number!"), "invalid_recipient"),
        (command(body=""), "empty_message"),
        (
            command(body="", media=[f"https://cdn.example/{i}.jpg" for i in range(11)]),
            "too_many_media",
        ),
        (command(account="nobody"), "unknown_account"),
    ],
    ids=["bad recipient", "empty", "11 media", "unknown account"],
)
async def test_invalid_commands_fail_without_calling_twilio(
    fake: FakeTwilio, connector: TwilioSmsConnector, cmd: SendMessageCommand, code: str
) -> None:
    with pytest.raises(PermanentError) as caught:
        await connector.send(cmd)
    assert caught.value.code == code
    assert fake.calls == []


async def test_two_recipients_are_refused(fake: FakeTwilio, connector: TwilioSmsConnector) -> None:
    cmd = command()
    cmd.message.recipients.append(Participant(channel="sms", address="+14155550123"))
    with pytest.raises(PermanentError, match="exactly one recipient"):
        await connector.send(cmd)
    assert fake.calls == []


# -- whole commands through the service ------------------------------------------------


@pytest.fixture
async def service() -> AsyncIterator[Harness]:
    async with serve(
        "sms.twilio",
        FakeTwilio(auth_token=TOKEN, callback_statuses=()),
        tw.settings,
        environ=ENV,
    ) as harness:
        yield harness


def _fake(h: Harness) -> FakeTwilio:
    assert isinstance(h.provider, FakeTwilio)
    return h.provider


async def _run(h: Harness, cmd: SendMessageCommand) -> DeliveryState.ValueType:
    await h.send(cmd)
    (status,) = await h.statuses_of(cmd.message_id, 1)  # exactly one terminal status
    return status.status.state


async def test_429_then_success_sends_once_more_and_reports_the_sid(service: Harness) -> None:
    fake = _fake(service)
    fake.rate_limit_next(retry_after=1)
    cmd = command()
    await service.send(cmd)
    (status,) = await service.statuses_of(cmd.message_id, 1)
    assert len(fake.calls) == 2
    assert status.status.state == S.DELIVERY_STATE_QUEUED
    assert status.status.provider_message_id.startswith("SM")
    assert status.status.provider_status == "queued"


@pytest.mark.parametrize(
    ("script", "calls", "reason_code", "permanent"),
    [
        (["rate_limit", "server_error"], 3, None, None),  # success on the third attempt
        (["server_error"] * 5, SEND_SETTINGS["max_attempts"], "http_500", False),
        (["reject"], 1, "21211", True),
        (["server_error", "reject"], 2, "21211", True),
        (["hang"], 1, "ambiguous_send", False),
    ],
    ids=["429+5xx then ok", "5xx forever", "4xx", "5xx then 4xx", "hang"],
)
async def test_command_outcomes(
    service: Harness,
    script: list[str],
    calls: int,
    reason_code: str | None,
    permanent: bool | None,
) -> None:
    fake = _fake(service)
    for step in script:
        if step == "rate_limit":
            fake.rate_limit_next(retry_after=0)
        elif step == "server_error":
            fake.server_error_next()
        elif step == "reject":
            fake.reject_next()
        else:
            fake.hang_next(1.5)
    cmd = command()
    await service.send(cmd)
    (status,) = await service.statuses_of(cmd.message_id, 1)
    assert len(fake.calls) == calls
    if reason_code is None:
        assert status.status.state == S.DELIVERY_STATE_QUEUED
    else:
        assert status.status.state == S.DELIVERY_STATE_FAILED
        assert status.status.reason_code == reason_code
        assert status.status.permanent is permanent


async def test_retry_after_beyond_the_limit_fails_without_waiting(service: Harness) -> None:
    fake = _fake(service)
    fake.rate_limit_next(retry_after=3600)
    assert await _run(service, command()) == S.DELIVERY_STATE_FAILED
    assert len(fake.calls) == 1


async def test_send_then_callbacks_fold_to_delivered() -> None:
    async with serve(
        "sms.twilio",
        FakeTwilio(auth_token=TOKEN, callback_statuses=("sent", "delivered")),
        tw.settings,
        environ=ENV,
    ) as h:
        cmd = command()
        await h.send(cmd)
        events = await h.statuses_of(cmd.message_id, 3)
        assert len(events) == 3
        assert len(_fake(h).calls) == 1
        sids = {e.status.provider_message_id for e in events}
        assert len(sids) == 1
        assert fold(e.status.state for e in events) == S.DELIVERY_STATE_DELIVERED
        assert [sent for sent in _fake(h).callbacks_sent if sent[2] != 204] == []
