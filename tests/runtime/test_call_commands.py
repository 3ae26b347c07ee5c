"""CallCommandWorker and the service's call-command queue, on the in-memory bus.

The worker has the guarantees of the send worker: a ledger claim before the
provider call, retries of transient errors only, one ``call.command`` outcome
per command (recorded before it is published), no second call after a crash.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from gateway.api.v1.call_pb2 import CallCommand, CallCommandOutcome, EnqueueCall
from gateway.api.v1.envelope_pb2 import Event
from gateway.contract.connector import CallResult, ConnectorSpec
from gateway.contract.errors import (
    AmbiguousSendError,
    BadRequestError,
    ConfigError,
    PermanentError,
    TransientError,
)
from gateway.runtime.bus import Delivery, PublishError, UnroutableError
from gateway.runtime.codec import decode_event, encode_call_command
from gateway.runtime.config import SendSettings
from gateway.runtime.idempotency import MemoryIdempotencyStore
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.outbound import CallCommandWorker, command_topology
from gateway.runtime.publisher import EventPublisher
from gateway.runtime.service import Service
from gateway.runtime.telemetry import CALL_COMMANDS, DEAD_LETTERS
from gateway.runtime.topology import (
    COMMANDS_EXCHANGE,
    DEAD_LETTER_QUEUE,
    EVENTS_EXCHANGE,
    base_topology,
)
from tests.runtime import call_helpers as c

Outcome = CallCommandOutcome
FAST = SendSettings(max_attempts=4, initial_backoff=0.0, max_backoff=0.01, max_retry_after=1.0)


def _delivery(command: CallCommand, *, redelivered: bool = False) -> Delivery:
    routing_key, out = encode_call_command(command)
    return Delivery(
        body=out.body,
        message_id=out.message_id,
        type=out.type,
        content_type=out.content_type,
        headers=dict(out.headers),
        exchange=COMMANDS_EXCHANGE,
        routing_key=routing_key,
        redelivered=redelivered,
        delivery_count=1 if redelivered else 0,
    )


class Harness:
    def __init__(self, connector: c.FakeVoice, settings: SendSettings = FAST) -> None:
        self.bus = InMemoryBus()
        self.ledger = MemoryIdempotencyStore()
        self.connector = connector
        self.worker = CallCommandWorker(
            c.spec(connector),
            connector,
            EventPublisher(
                self.bus, self.ledger, connector=c.NAME, publish_timeout=1, pending_wait=0
            ),
            self.ledger,
            settings,
            actions=connector.manifest.call_actions,
        )
        self.queue = ""

    async def start(self) -> Harness:
        await self.bus.connect()
        await self.bus.declare(base_topology())
        self.queue = await self.bus.declare_temporary_queue(EVENTS_EXCHANGE, ["call.command.#"])
        return self

    async def outcomes(self) -> list[Event]:
        events = []
        while self.bus.queue_depth(self.queue):
            events.append(decode_event(await self.bus.get(self.queue)))
        return events


async def _run(
    script: list[CallResult | Exception], command: CallCommand | None = None
) -> tuple[Harness, list[Event]]:
    harness = await Harness(c.FakeVoice(script)).start()
    await harness.worker.handle(_delivery(command or c.place()))
    return harness, await harness.outcomes()


async def test_accepted_command_publishes_one_outcome_event() -> None:
    harness, (event,) = await _run([c.accepted("CA-42", "queued")])
    assert len(harness.connector.calls) == 1
    assert harness.connector.calls[0][1].place.to == "+14155550199"
    assert event.type == "call.command"
    assert (event.channel, event.provider, event.account) == ("voice", "fake", "main")
    assert event.causation_id == "cmd-1"
    assert event.correlation_id == "corr-1"
    assert event.conversation_id == "conv-1"
    assert event.attributes["ticket"] == "T-7"  # the command's metadata, echoed
    assert event.attributes["price"] == "0"  # the connector's own attributes
    result = event.call_command
    assert result.command_id == "cmd-1"
    assert result.action == "place"
    assert result.outcome == Outcome.CALL_COMMAND_OUTCOME_ACCEPTED
    assert result.call_id == "CA-42"
    assert result.provider_status == "queued"
    assert not result.reason_code


async def test_outcome_is_published_with_routing_key_call_command() -> None:
    harness, _ = await _run([])
    ((exchange, routing_key, message),) = harness.bus.published
    assert (exchange, routing_key) == (EVENTS_EXCHANGE, "call.command.voice.fake")
    assert message.type == "gateway.api.v1.Event"


async def test_transient_errors_are_retried_honouring_retry_after() -> None:
    harness, (event,) = await _run(
        [TransientError("busy", code="rate_limited", retry_after=0.3), TransientError("503")]
    )
    times = [t for t, _ in harness.connector.calls]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.3  # waited at least the provider's Retry-After
    assert event.call_command.outcome == Outcome.CALL_COMMAND_OUTCOME_ACCEPTED


async def test_transient_errors_are_bounded_then_failed_not_permanent() -> None:
    harness, (event,) = await _run([TransientError("down", code="http_503")] * 10)
    assert len(harness.connector.calls) == FAST.max_attempts
    result = event.call_command
    assert result.outcome == Outcome.CALL_COMMAND_OUTCOME_FAILED
    assert result.reason_code == "http_503"
    assert not result.permanent


async def test_permanent_error_fails_once_without_retry() -> None:
    harness, (event,) = await _run(
        [PermanentError("call is not in progress", code="call_not_in_progress")],
        c.hang_up("CA-9"),
    )
    assert len(harness.connector.calls) == 1
    result = event.call_command
    assert result.outcome == Outcome.CALL_COMMAND_OUTCOME_FAILED
    assert result.permanent
    assert result.reason_code == "call_not_in_progress"
    assert result.reason == "call is not in progress"
    assert result.action == "hang_up"
    assert result.call_id == "CA-9"  # the call the command was about


async def test_ambiguous_provider_error_is_never_retried() -> None:
    harness, (event,) = await _run([AmbiguousSendError("read timeout after the request")])
    assert len(harness.connector.calls) == 1
    assert event.call_command.outcome == Outcome.CALL_COMMAND_OUTCOME_FAILED
    assert event.call_command.reason_code == "ambiguous_send"
    assert not event.call_command.permanent


async def test_redelivery_after_a_crash_mid_call_fails_ambiguous_without_calling() -> None:
    harness = await Harness(c.FakeVoice()).start()
    # A previous worker claimed the command and died during the provider call
    # (its lease is gone): the call may have been placed, so it is never placed again.
    await harness.ledger.claim("call:voice.fake:cmd-1", ttl=60)
    await harness.worker.handle(_delivery(c.place(), redelivered=True))
    (event,) = await harness.outcomes()
    assert harness.connector.calls == []
    assert event.call_command.outcome == Outcome.CALL_COMMAND_OUTCOME_FAILED
    assert event.call_command.reason_code == "ambiguous_send"
    assert not event.call_command.permanent


async def test_redelivered_command_republishes_the_same_event() -> None:
    harness = await Harness(c.FakeVoice([c.accepted("CA-1"), c.accepted("CA-2")])).start()
    await harness.worker.handle(_delivery(c.place()))
    (first,) = await harness.outcomes()
    # The ack was lost (crash, connection cut): the broker delivers it again.
    await harness.worker.handle(_delivery(c.place(), redelivered=True))
    (again,) = await harness.outcomes()
    assert len(harness.connector.calls) == 1
    assert again.id == first.id  # same deterministic id: consumers dedupe
    assert again.call_command == first.call_command
    assert again.account == "main"
    assert again.attributes == first.attributes


async def test_outcome_recorded_before_a_failed_publish_is_republished_not_redone() -> None:
    harness = await Harness(c.FakeVoice([c.accepted("CA-1"), c.accepted("CA-2")])).start()
    harness.bus.available = False  # the broker cannot confirm the outcome event
    with pytest.raises(PublishError):
        await harness.worker.handle(_delivery(c.place()))
    # The bus requeues the command; once the broker is back, the redelivery
    # publishes the recorded outcome and the provider is not called again.
    harness.bus.available = True
    await harness.worker.handle(_delivery(c.place(), redelivered=True))
    (event,) = await harness.outcomes()
    assert len(harness.connector.calls) == 1
    assert event.call_command.call_id == "CA-1"


async def test_concurrent_copy_waits_for_the_live_caller() -> None:
    # The same command twice at once: one provider call, and both copies report
    # its one real outcome, never FAILED ambiguous_send.
    harness = await Harness(c.FakeVoice(delay=0.3)).start()
    await asyncio.gather(
        harness.worker.handle(_delivery(c.place())),
        harness.worker.handle(_delivery(c.place(), redelivered=True)),
    )
    events = await harness.outcomes()
    assert len(harness.connector.calls) == 1
    assert len(events) == 2
    assert {e.call_command.outcome for e in events} == {Outcome.CALL_COMMAND_OUTCOME_ACCEPTED}
    assert {e.id for e in events} == {events[0].id}


async def test_expired_command_is_not_executed() -> None:
    harness, (event,) = await _run([], c.place(expires_at=c.in_seconds(-1)))
    assert harness.connector.calls == []
    result = event.call_command
    assert result.outcome == Outcome.CALL_COMMAND_OUTCOME_EXPIRED
    assert result.reason_code == "ttl_expired"
    assert result.permanent


async def test_unexpired_command_is_executed() -> None:
    harness, (event,) = await _run([], c.place(expires_at=c.in_seconds(300)))
    assert len(harness.connector.calls) == 1
    assert event.call_command.outcome == Outcome.CALL_COMMAND_OUTCOME_ACCEPTED


async def test_unsupported_action_fails_permanently_without_a_provider_call() -> None:
    command = CallCommand(
        command_id="cmd-3",
        channel="voice",
        provider="fake",
        enqueue=EnqueueCall(call_id="CA-5", queue="support"),
    )
    harness, (event,) = await _run([], command)
    assert harness.connector.calls == []
    result = event.call_command
    assert result.outcome == Outcome.CALL_COMMAND_OUTCOME_FAILED
    assert result.reason_code == "unsupported_action"
    assert result.permanent
    assert result.action == "enqueue"
    assert "hang_up, place" in result.reason


async def test_outcomes_are_counted_by_action() -> None:
    metric = CALL_COMMANDS.labels(c.NAME, "hang_up", "failed")
    before = metric._value.get()
    await _run([PermanentError("gone", code="call_not_in_progress")], c.hang_up())
    assert metric._value.get() == before + 1


async def test_command_for_another_connector_is_rejected() -> None:
    harness = await Harness(c.FakeVoice()).start()
    other = c.place()
    other.provider = "twilio"
    with pytest.raises(PermanentError, match=r"command for voice\.twilio on voice\.fake"):
        await harness.worker.handle(_delivery(other))
    assert harness.connector.calls == []
    assert await harness.outcomes() == []


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param({"body": b"\xff\xff"}, id="undecodable"),
        pytest.param(
            {"body": CallCommand(command_id="x", channel="voice").SerializeToString()},
            id="no-provider",
        ),
        pytest.param(
            {
                "body": CallCommand(
                    command_id="x", channel="voice", provider="fake"
                ).SerializeToString()
            },
            id="no-action",
        ),
        pytest.param({"type": "gateway.api.v1.SendMessageCommand"}, id="wrong-type"),
    ],
)
async def test_malformed_commands_are_rejected_and_counted(broken: dict[str, object]) -> None:
    harness = await Harness(c.FakeVoice()).start()
    metric = DEAD_LETTERS.labels(c.NAME)
    before = metric._value.get()
    with pytest.raises(BadRequestError):
        await harness.worker.handle(replace(_delivery(c.place()), **broken))  # type: ignore[arg-type]
    assert metric._value.get() == before + 1
    assert harness.connector.calls == []


# -- the service: topology, consumer, graceful stop --------------------------------------------


@pytest.fixture
def hosted(monkeypatch: pytest.MonkeyPatch) -> list[ConnectorSpec]:
    """Specs the service's registry lookups find by name."""
    specs: list[ConnectorSpec] = []
    c.install(monkeypatch, specs)
    return specs


def test_command_topology_adds_the_call_queue_only_for_call_actions() -> None:
    voice = command_topology(c.spec(), 5)
    assert [q.name for q in voice.queues] == [
        "connector.voice.fake.send",
        "connector.voice.fake.call",
    ]
    call_queue = voice.queues[1]
    assert [(b.exchange, b.routing_key) for b in call_queue.bindings] == [
        (COMMANDS_EXCHANGE, "call.voice.fake")
    ]
    assert call_queue.arguments()["x-queue-type"] == "quorum"
    assert call_queue.arguments()["x-delivery-limit"] == 5
    assert call_queue.arguments()["x-dead-letter-exchange"] == "channels.dead"
    silent = command_topology(c.spec(c.FakeVoice(actions=())), 5)
    assert [q.name for q in silent.queues] == ["connector.voice.fake.send"]


async def _start(specs: list[ConnectorSpec], connector: c.FakeVoice) -> tuple[Service, InMemoryBus]:
    specs.append(c.spec(connector))
    bus = InMemoryBus()
    svc = Service(c.runtime(), [c.NAME], bus=bus, store=MemoryIdempotencyStore())
    await svc.start()
    return svc, bus


async def test_service_consumes_call_commands_and_publishes_outcomes(
    hosted: list[ConnectorSpec],
) -> None:
    connector = c.FakeVoice([c.accepted("CA-7")])
    svc, bus = await _start(hosted, connector)
    try:
        outcomes = await bus.declare_temporary_queue(EVENTS_EXCHANGE, ["call.command.voice.fake"])
        routing_key, message = encode_call_command(c.place())
        await bus.publish(COMMANDS_EXCHANGE, routing_key, message, timeout=1)
        event = decode_event(await bus.get(outcomes, timeout=5))
        assert event.call_command.call_id == "CA-7"
        assert event.call_command.outcome == Outcome.CALL_COMMAND_OUTCOME_ACCEPTED
        # An action the connector does not list: a FAILED outcome, not a dead-letter loop.
        routing_key, message = encode_call_command(
            CallCommand(
                command_id="cmd-9",
                channel="voice",
                provider="fake",
                enqueue=EnqueueCall(call_id="CA-7", queue="q"),
            )
        )
        await bus.publish(COMMANDS_EXCHANGE, routing_key, message, timeout=1)
        event = decode_event(await bus.get(outcomes, timeout=5))
        assert event.call_command.reason_code == "unsupported_action"
        assert bus.queue_depth(DEAD_LETTER_QUEUE) == 0
    finally:
        await svc.stop()
    assert len(connector.calls) == 1


async def test_malformed_call_command_is_dead_lettered_by_the_service(
    hosted: list[ConnectorSpec],
) -> None:
    svc, bus = await _start(hosted, c.FakeVoice())
    try:
        routing_key, message = encode_call_command(c.place())
        await bus.publish(
            COMMANDS_EXCHANGE, routing_key, replace(message, body=b"\x00garbage"), timeout=1
        )
        dead = await bus.get(DEAD_LETTER_QUEUE, timeout=5)
        assert dead.message_id == "cmd-1"
        assert dead.headers["x-first-death-reason"] == "rejected"
    finally:
        await svc.stop()


async def test_stop_lets_an_in_flight_call_finish(hosted: list[ConnectorSpec]) -> None:
    connector = c.FakeVoice(delay=0.3)
    svc, bus = await _start(hosted, connector)
    outcomes = await bus.declare_temporary_queue(EVENTS_EXCHANGE, ["call.command.#"])
    routing_key, message = encode_call_command(c.place())
    await bus.publish(COMMANDS_EXCHANGE, routing_key, message, timeout=1)
    await asyncio.wait_for(connector.called.wait(), 5)
    await svc.stop()  # the provider call is in flight: its outcome is published first
    assert bus.queue_depth(outcomes) == 1
    event = decode_event(await bus.get(outcomes))
    assert event.call_command.outcome == Outcome.CALL_COMMAND_OUTCOME_ACCEPTED


async def test_connector_without_call_actions_gets_no_call_queue(
    hosted: list[ConnectorSpec],
) -> None:
    svc, bus = await _start(hosted, c.FakeVoice(actions=()))
    try:
        assert svc.hosted[0].call_worker is None
        routing_key, message = encode_call_command(c.place())
        with pytest.raises(UnroutableError):
            await bus.publish(COMMANDS_EXCHANGE, routing_key, message, timeout=1)
    finally:
        await svc.stop()


async def test_call_actions_without_call_control_refuse_to_start(
    hosted: list[ConnectorSpec],
) -> None:
    hosted.append(c.spec(c.NoCallControl()))
    svc = Service(c.runtime(), [c.NAME], bus=InMemoryBus(), store=MemoryIdempotencyStore())
    try:
        with pytest.raises(ConfigError, match="does not implement CallControl"):
            await svc.start()
    finally:
        await svc.stop()
