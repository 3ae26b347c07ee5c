"""CommandWorker: ledger claim, retries by error type, one status per command."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import BaseModel

from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.connector_pb2 import ConnectorManifest
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.message_pb2 import Message
from gateway.api.v1.participant_pb2 import Participant
from gateway.contract.connector import ConnectorContext, ConnectorSpec, SendResult, WebhookRoute
from gateway.contract.errors import (
    AmbiguousSendError,
    BadRequestError,
    PermanentError,
    TransientError,
)
from gateway.runtime.bus import Delivery
from gateway.runtime.codec import decode_event, encode_command
from gateway.runtime.config import SendSettings
from gateway.runtime.idempotency import MemoryIdempotencyStore
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.outbound import CommandWorker
from gateway.runtime.publisher import EventPublisher
from gateway.runtime.telemetry import DEAD_LETTERS
from gateway.runtime.topology import EVENTS_EXCHANGE, base_topology

S = DeliveryState


class _Settings(BaseModel):
    pass


class ScriptedConnector:
    """A connector whose sends follow a script of results and errors."""

    def __init__(self, script: Sequence[SendResult | Exception], *, idempotent: bool = False):
        self.manifest = ConnectorManifest(
            channel="sms", provider="fake", idempotent_send=idempotent
        )
        self.script = list(script)
        self.calls: list[float] = []

    def webhook_routes(self) -> Sequence[WebhookRoute]:
        return ()

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def send(self, command: SendMessageCommand) -> SendResult:
        self.calls.append(time.monotonic())
        outcome = self.script.pop(0) if self.script else _ok()
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def _ok(sid: str = "P-1") -> SendResult:
    return SendResult(
        provider_message_id=sid, account="main", state=S.DELIVERY_STATE_QUEUED, provider_status="q"
    )


def _spec() -> ConnectorSpec:
    def factory(_: ConnectorContext, __: Any) -> ScriptedConnector:
        return ScriptedConnector([])

    return ConnectorSpec(
        channel="sms",
        provider="fake",
        settings=_Settings,
        factory=factory,
        manifest=ConnectorManifest(channel="sms", provider="fake"),
    )


def _command(message_id: str = "msg-1", **kw: Any) -> SendMessageCommand:
    command = SendMessageCommand(
        message_id=message_id,
        channel="sms",
        provider="fake",
        correlation_id="corr-1",
        message=Message(recipients=[Participant(channel="sms", address="+14155550199")]),
        **kw,
    )
    command.metadata["ticket"] = "T-7"
    return command


def _delivery(command: SendMessageCommand, *, redelivered: bool = False) -> Delivery:
    _, out = encode_command(command)
    return Delivery(
        body=out.body,
        message_id=out.message_id,
        type=out.type,
        content_type=out.content_type,
        headers=dict(out.headers),
        exchange="channels.commands",
        routing_key="send.sms.fake",
        redelivered=redelivered,
        delivery_count=1 if redelivered else 0,
    )


class Harness:
    def __init__(self, connector: ScriptedConnector, settings: SendSettings) -> None:
        self.bus = InMemoryBus()
        self.ledger = MemoryIdempotencyStore()
        self.connector = connector
        self.worker = CommandWorker(
            _spec(),
            connector,  # type: ignore[arg-type]
            EventPublisher(
                self.bus, self.ledger, connector="sms.fake", publish_timeout=1, pending_wait=0
            ),
            self.ledger,
            settings,
        )
        self.queue = ""

    async def start(self) -> Harness:
        await self.bus.connect()
        await self.bus.declare(base_topology())
        self.queue = await self.bus.declare_temporary_queue(EVENTS_EXCHANGE, ["message.status.#"])
        return self

    async def statuses(self) -> list[Event]:
        events = []
        while self.bus.queue_depth(self.queue):
            events.append(decode_event(await self.bus.get(self.queue)))
        return events


FAST = SendSettings(max_attempts=4, initial_backoff=0.0, max_backoff=0.01, max_retry_after=1.0)


async def _run(
    script: Sequence[SendResult | Exception],
    command: SendMessageCommand | None = None,
    settings: SendSettings = FAST,
) -> tuple[Harness, list[Event]]:
    harness = await Harness(ScriptedConnector(script), settings).start()
    await harness.worker.handle(_delivery(command or _command()))
    return harness, await harness.statuses()


async def test_success_publishes_one_status() -> None:
    harness, (event,) = await _run([_ok("P-42")])
    assert len(harness.connector.calls) == 1
    assert event.type == "message.status"
    assert event.status.state == S.DELIVERY_STATE_QUEUED
    assert event.status.provider_message_id == "P-42"
    assert event.status.message_id == "msg-1"
    assert event.status.recipient == "+14155550199"
    assert event.causation_id == "msg-1"
    assert event.correlation_id == "corr-1"
    assert event.attributes["ticket"] == "T-7"
    assert event.account == "main"


async def test_transient_errors_are_retried_honouring_retry_after() -> None:
    harness, (event,) = await _run(
        [TransientError("busy", code="rate_limited", retry_after=0.3), TransientError("5xx"), _ok()]
    )
    calls = harness.connector.calls
    assert len(calls) == 3
    assert calls[1] - calls[0] >= 0.3  # waited at least the provider's Retry-After
    assert event.status.state == S.DELIVERY_STATE_QUEUED


async def test_retry_after_beyond_the_cap_is_not_waited_for() -> None:
    harness, (event,) = await _run(
        [TransientError("slow down", code="rate_limited", retry_after=3600)]
    )
    assert len(harness.connector.calls) == 1
    assert event.status.state == S.DELIVERY_STATE_FAILED
    assert event.status.reason_code == "rate_limited"
    assert not event.status.permanent


async def test_attempts_are_bounded() -> None:
    harness, (event,) = await _run([TransientError("down", code="http_503")] * 10)
    assert len(harness.connector.calls) == FAST.max_attempts
    assert event.status.state == S.DELIVERY_STATE_FAILED
    assert event.status.reason_code == "http_503"


async def test_permanent_error_is_one_failed_status_without_retry() -> None:
    harness, (event,) = await _run([PermanentError("invalid To", code="21211")])
    assert len(harness.connector.calls) == 1
    assert event.status.state == S.DELIVERY_STATE_FAILED
    assert event.status.permanent
    assert event.status.reason_code == "21211"


async def test_ambiguous_send_is_never_retried() -> None:
    harness, (event,) = await _run([AmbiguousSendError("read timeout after send")])
    assert len(harness.connector.calls) == 1
    assert event.status.state == S.DELIVERY_STATE_FAILED
    assert event.status.reason_code == "ambiguous_send"
    assert not event.status.permanent


async def test_expired_command_is_not_sent() -> None:
    past = Timestamp()
    past.FromDatetime(datetime.now(UTC) - timedelta(seconds=1))
    harness, (event,) = await _run([], _command(expires_at=past))
    assert harness.connector.calls == []
    assert event.status.state == S.DELIVERY_STATE_EXPIRED
    assert event.status.reason_code == "ttl_expired"


async def test_unexpired_command_is_sent() -> None:
    future = Timestamp()
    future.FromDatetime(datetime.now(UTC) + timedelta(minutes=5))
    harness, (event,) = await _run([], _command(expires_at=future))
    assert len(harness.connector.calls) == 1
    assert event.status.state == S.DELIVERY_STATE_QUEUED


async def test_redelivered_command_is_not_sent_twice() -> None:
    harness = await Harness(ScriptedConnector([_ok("P-1"), _ok("P-2")]), FAST).start()
    await harness.worker.handle(_delivery(_command()))
    (first,) = await harness.statuses()
    # The ack was lost (crash, connection cut): the broker delivers it again.
    await harness.worker.handle(_delivery(_command(), redelivered=True))
    (again,) = await harness.statuses()
    assert len(harness.connector.calls) == 1
    assert again.id == first.id  # same deterministic id: consumers dedupe
    assert again.status.provider_message_id == "P-1"


async def test_redelivery_after_a_crash_mid_send_fails_ambiguous_without_sending() -> None:
    harness = await Harness(ScriptedConnector([_ok()]), FAST).start()
    # A previous worker claimed the command and died during the provider call.
    await harness.ledger.claim("send:sms.fake:msg-1:1", ttl=60)
    await harness.worker.handle(_delivery(_command(), redelivered=True))
    (event,) = await harness.statuses()
    assert harness.connector.calls == []
    assert event.status.state == S.DELIVERY_STATE_FAILED
    assert event.status.reason_code == "ambiguous_send"


async def test_idempotent_connector_may_resend_after_a_crash() -> None:
    harness = await Harness(ScriptedConnector([_ok()], idempotent=True), FAST).start()
    await harness.ledger.claim("send:sms.fake:msg-1:1", ttl=60)
    await harness.worker.handle(_delivery(_command(), redelivered=True))
    (event,) = await harness.statuses()
    assert len(harness.connector.calls) == 1
    assert event.status.state == S.DELIVERY_STATE_QUEUED


async def test_a_new_attempt_is_a_new_send() -> None:
    harness = await Harness(ScriptedConnector([_ok("P-1"), _ok("P-2")]), FAST).start()
    await harness.worker.handle(_delivery(_command()))
    await harness.worker.handle(_delivery(_command(attempt=2)))
    first, second = await harness.statuses()
    assert len(harness.connector.calls) == 2
    assert (first.status.attempt, second.status.attempt) == (1, 2)
    assert first.id != second.id


async def test_command_for_another_connector_is_rejected() -> None:
    harness = await Harness(ScriptedConnector([]), FAST).start()
    other = _command()
    other.provider = "twilio"
    with pytest.raises(PermanentError, match=r"command for sms\.twilio on sms\.fake"):
        await harness.worker.handle(_delivery(other))
    assert harness.connector.calls == []


async def test_rejected_commands_are_counted_as_dead_letters() -> None:
    harness = await Harness(ScriptedConnector([]), FAST).start()
    metric = DEAD_LETTERS.labels("sms.fake")
    before = metric._value.get()
    garbage = replace(_delivery(_command()), body=b"\xff\xff")
    with pytest.raises(BadRequestError):
        await harness.worker.handle(garbage)
    assert metric._value.get() == before + 1


class SlowConnector(ScriptedConnector):
    """Sends take a while, so a second copy of the command arrives mid-send."""

    async def send(self, command: SendMessageCommand) -> SendResult:
        self.calls.append(time.monotonic())
        await asyncio.sleep(0.3)
        return _ok("P-slow")


async def test_concurrent_copy_waits_for_the_live_sender_instead_of_failing() -> None:
    # The same command twice at once (a publisher retry after a lost confirm, or a
    # redelivery while the first worker is still sending): one provider call, and
    # both copies report the one real outcome, never FAILED ambiguous_send.
    harness = await Harness(SlowConnector([]), FAST).start()
    await asyncio.gather(
        harness.worker.handle(_delivery(_command())),
        harness.worker.handle(_delivery(_command(), redelivered=True)),
    )
    events = await harness.statuses()
    assert len(harness.connector.calls) == 1
    assert {e.status.state for e in events} == {S.DELIVERY_STATE_QUEUED}
    assert {e.id for e in events} == {events[0].id}  # one outcome, deduped downstream
