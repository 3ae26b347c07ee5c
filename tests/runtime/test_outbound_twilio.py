"""Sends through the real Twilio connector and HTTP client against the fake Twilio
API: provider outcomes over real HTTP become the right statuses."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.content_pb2 import Text
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.message_pb2 import Message
from gateway.api.v1.participant_pb2 import Participant
from gateway.runtime.codec import decode_event, encode_command
from gateway.runtime.config import SendSettings
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.service import Service
from gateway.runtime.topology import COMMANDS_EXCHANGE, EVENTS_EXCHANGE
from gateway.testing.fake_twilio import FakeTwilio
from tests.runtime import service_helpers as h

S = DeliveryState
SEND = SendSettings(
    max_attempts=3, initial_backoff=0.0, max_backoff=0.05, max_retry_after=5, provider_timeout=0.5
)


class Running:
    def __init__(self, svc: Service, bus: InMemoryBus, fake: FakeTwilio, queue: str) -> None:
        self.svc, self.bus, self.fake, self.queue = svc, bus, fake, queue

    async def send(self, to: str = "+14155550123") -> Event:
        command = SendMessageCommand(
            message_id=str(uuid.uuid4()),
            channel="sms",
            provider="twilio",
            message=Message(
                recipients=[Participant(channel="sms", address=to)], text=Text(body="hi")
            ),
        )
        routing_key, message = encode_command(command)
        await self.bus.publish(COMMANDS_EXCHANGE, routing_key, message, timeout=1)
        event = decode_event(await self.bus.get(self.queue, timeout=5))
        assert event.status.message_id == command.message_id
        return event


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    async with FakeTwilio(auth_token=h.TOKEN, callback_statuses=()) as fake:
        bus = InMemoryBus()
        svc = h.service(h.settings(api_base_url=fake.url, send=SEND), bus=bus)
        await svc.start()
        queue = await bus.declare_temporary_queue(EVENTS_EXCHANGE, ["message.status.#"])
        try:
            yield Running(svc, bus, fake, queue)
        finally:
            await svc.stop()


async def test_accepted_send(running: Running) -> None:
    event = await running.send()
    assert event.status.state == S.DELIVERY_STATE_QUEUED
    assert event.status.provider_message_id.startswith("SM")
    (call,) = running.fake.calls
    assert call.form["To"] == "+14155550123"
    assert call.form["From"] == h.OUR_NUMBER
    assert f"?mid={event.status.message_id}&traceparent=00-" in call.form["StatusCallback"]


async def test_rate_limited_then_accepted(running: Running) -> None:
    running.fake.rate_limit_next(retry_after=1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    event = await running.send()
    assert loop.time() - started >= 1.0  # Retry-After honoured
    assert len(running.fake.calls) == 2
    assert event.status.state == S.DELIVERY_STATE_QUEUED


async def test_server_errors_exhaust_the_attempts(running: Running) -> None:
    for _ in range(SEND.max_attempts):
        running.fake.server_error_next(503)
    event = await running.send()
    assert len(running.fake.calls) == SEND.max_attempts
    assert event.status.state == S.DELIVERY_STATE_FAILED
    assert event.status.reason_code == "http_503"
    assert not event.status.permanent


async def test_rejection_is_one_permanent_failure(running: Running) -> None:
    running.fake.reject_next(21211, "The 'To' number is not a valid phone number.")
    event = await running.send()
    assert len(running.fake.calls) == 1
    assert event.status.state == S.DELIVERY_STATE_FAILED
    assert event.status.permanent
    assert event.status.reason_code == "21211"


async def test_timeout_after_the_request_went_out_is_ambiguous_and_not_retried(
    running: Running,
) -> None:
    running.fake.hang_next(2.0)  # longer than provider_timeout
    event = await running.send()
    assert len(running.fake.calls) == 1  # never retried: it may have been sent
    assert event.status.state == S.DELIVERY_STATE_FAILED
    assert event.status.reason_code == "ambiguous_send"
    assert not event.status.permanent


async def test_invalid_recipient_never_reaches_the_provider(running: Running) -> None:
    event = await running.send(to="not-a-number")
    assert running.fake.calls == []
    assert event.status.state == S.DELIVERY_STATE_FAILED
    assert event.status.permanent
