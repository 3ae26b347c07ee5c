"""SendCallCommand and GetCallCommand through a real in-process gRPC server (in-memory
bus, SQLite ledger): validation against the voice connector's manifest, idempotency,
an unconfirmed publish, and outcomes (call.command events) ingested by the ledger."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc import aio
from grpc_status import rpc_status

from gateway.api.v1.call_pb2 import (
    CallCommand,
    CallCommandOutcome,
    CallCommandResult,
    EnqueueCall,
    HangUpCall,
    PlaceCall,
    SpeakToCall,
    TransferCall,
)
from gateway.api.v1.connector_pb2 import ConnectorManifest
from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.gateway_service_pb2 import (
    CallCommandState,
    GetCallCommandRequest,
    OutboundCallCommand,
    SendCallCommandRequest,
)
from gateway.api.v1.gateway_service_pb2_grpc import GatewayServiceStub
from gateway.contract.connector import ConnectorSpec
from gateway.runtime.bus import OutgoingMessage
from gateway.runtime.codec import encode_event, event_routing_key
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.outbound import call_command_event
from gateway.runtime.topology import COMMANDS_EXCHANGE, EVENTS_EXCHANGE
from gateway.server.calls import prepare_call
from gateway.server.connectors import ConnectorDirectory
from gateway.server.errors import RpcError
from tests.server.conftest import Gateway, settings, start_gateway
from tests.server.test_send import violations

C = CallCommandState
O = CallCommandOutcome  # noqa: E741 - the outcome enum, as C is the state enum
CALLEE = "+447700900123"
CONNECTORS = {"voice.twilio": {}, "sms.twilio": {}}


def place_request(key: str = "call-1", to: str = CALLEE, **place: object) -> SendCallCommandRequest:
    command = CallCommand(
        provider="twilio",
        correlation_id="ticket-42",
        conversation_id="conv-7",
        metadata={"agent": "a-17"},
        place=PlaceCall(to=to, say="Your order has shipped.", **place),  # type: ignore[arg-type]
    )
    return SendCallCommandRequest(idempotency_key=key, command=command)


def call_commands(bus: InMemoryBus) -> list[tuple[str, OutgoingMessage]]:
    return [
        (key, msg)
        for exchange, key, msg in bus.published
        if exchange == COMMANDS_EXCHANGE and key.startswith("call.")
    ]


def decode(message: OutgoingMessage) -> CallCommand:
    command = CallCommand()
    command.ParseFromString(message.body)
    return command


def error_reason(error: aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    """A gateway with voice.twilio and sms.twilio enabled on the in-memory bus."""
    bus = InMemoryBus()
    await bus.connect()
    server, channel = await start_gateway(settings(tmp_path, connectors=CONNECTORS), bus=bus)
    try:
        yield Gateway(server=server, bus=bus, channel=channel, stub=GatewayServiceStub(channel))
    finally:
        await channel.close()
        await server.stop()
        await bus.close()


async def publish_outcome(
    bus: InMemoryBus, command: CallCommand, result: CallCommandResult
) -> Event:
    """What the connector's CallCommandWorker publishes when it is done."""
    event = call_command_event(command, account="main", result=result)
    await bus.publish(EVENTS_EXCHANGE, event_routing_key(event), encode_event(event), timeout=2)
    return event


async def wait_for_call_state(
    stub: GatewayServiceStub, command_id: str, state: int, timeout: float = 5.0
) -> OutboundCallCommand:
    """GetCallCommand until the command reaches ``state``."""
    deadline = asyncio.get_running_loop().time() + timeout
    seen = "unknown"
    while asyncio.get_running_loop().time() < deadline:
        try:
            reply = await stub.GetCallCommand(GetCallCommandRequest(command_id=command_id))
        except aio.AioRpcError as exc:
            # An outcome of a command the gateway did not send: unknown until ingested.
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        else:
            if reply.call_command.state == state:
                return reply.call_command
            seen = C.Name(reply.call_command.state)
        await asyncio.sleep(0.02)
    raise AssertionError(f"command {command_id} stayed {seen}")


async def test_place_is_recorded_pending_and_published_normalized(gateway: Gateway) -> None:
    reply = await gateway.stub.SendCallCommand(place_request(to="+44 7700 900123"), timeout=5)
    assert reply.created
    assert reply.state == C.CALL_COMMAND_STATE_PENDING
    assert (reply.channel, reply.provider) == ("voice", "twilio")
    assert len(reply.command_id) > 0
    assert len(reply.trace_id) == 32

    ((routing_key, message),) = call_commands(gateway.bus)
    assert routing_key == "call.voice.twilio"
    assert message.message_id == reply.command_id
    command = decode(message)
    assert command.command_id == reply.command_id
    # channel defaulted, number normalized, created_at set by the gateway
    assert (command.channel, command.provider) == ("voice", "twilio")
    assert command.place.to == CALLEE
    assert command.place.say == "Your order has shipped."
    assert command.HasField("created_at")
    assert dict(command.metadata) == {"agent": "a-17"}
    assert str(message.headers["traceparent"]).split("-")[1] == reply.trace_id

    got = (
        await gateway.stub.GetCallCommand(GetCallCommandRequest(command_id=reply.command_id))
    ).call_command
    assert got.state == C.CALL_COMMAND_STATE_PENDING
    assert got.dispatched
    assert got.idempotency_key == "call-1"
    assert got.action == "place"
    assert got.command == command
    assert (got.correlation_id, got.conversation_id) == ("ticket-42", "conv-7")
    assert got.trace_id == reply.trace_id
    assert got.HasField("created_at")
    assert not got.HasField("completed_at")


async def test_same_key_returns_the_same_command_and_publishes_once(gateway: Gateway) -> None:
    first = await gateway.stub.SendCallCommand(place_request(), timeout=5)
    # The same request, the number spelled differently: the same command.
    again = await gateway.stub.SendCallCommand(place_request(to="+447700 900 123"), timeout=5)
    assert again.command_id == first.command_id
    assert not again.created
    assert len(call_commands(gateway.bus)) == 1

    # The same key for another command is refused, and nothing is published.
    other = place_request()
    other.command.place.say = "Something else."
    with pytest.raises(aio.AioRpcError) as err:
        await gateway.stub.SendCallCommand(other, timeout=5)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(err.value) == "IDEMPOTENCY_KEY_REUSED"
    assert len(call_commands(gateway.bus)) == 1


async def test_a_caller_chosen_command_id_is_kept_and_cannot_be_taken_twice(
    gateway: Gateway,
) -> None:
    request = place_request("key-a")
    request.command.command_id = "desk-7:call-0001"
    reply = await gateway.stub.SendCallCommand(request, timeout=5)
    assert reply.command_id == "desk-7:call-0001"
    request.idempotency_key = "key-b"
    with pytest.raises(aio.AioRpcError) as err:
        await gateway.stub.SendCallCommand(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "desk-7:call-0001" in (err.value.details() or "")
    assert len(call_commands(gateway.bus)) == 1


def _past() -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(datetime.now(UTC) - timedelta(minutes=1))
    return ts


def _set(request: SendCallCommandRequest, action: str, message: object) -> None:
    request.command.ClearField("place")
    getattr(request.command, action).CopyFrom(message)


Mutation = Callable[[SendCallCommandRequest], None]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: setattr(r, "idempotency_key", ""), "idempotency_key"),
        (lambda r: setattr(r, "idempotency_key", "k" * 256), "idempotency_key"),
        (lambda r: r.ClearField("command"), "command"),
        (lambda r: r.command.ClearField("place"), "command.action"),
        (lambda r: setattr(r.command, "command_id", "has spaces"), "command.command_id"),
        (lambda r: r.command.expires_at.CopyFrom(_past()), "command.expires_at"),
        (
            lambda r: r.command.metadata.update({f"k{i}": "v" for i in range(65)}),
            "command.metadata",
        ),
        (lambda r: setattr(r.command, "correlation_id", "c" * 129), "command.correlation_id"),
        (lambda r: setattr(r.command.place, "to", ""), "command.place.to"),
        # A national number is not guessed into some country.
        (lambda r: setattr(r.command.place, "to", "07700 900123"), "command.place.to"),
        (lambda r: setattr(r.command.place, "to", "+1 999"), "command.place.to"),
        (lambda r: setattr(r.command.place, "to", "sip:"), "command.place.to"),
        (
            lambda r: setattr(r.command.place, "from", "sip:me@pbx.example.com"),
            "command.place.from",
        ),
        (lambda r: r.command.place.ClearField("say"), "command.place.script"),
        (lambda r: setattr(r.command.place, "say", ""), "command.place.say"),
        (lambda r: setattr(r.command.place, "play_url", "ftp://x/a.mp3"), "command.place.play_url"),
        (lambda r: setattr(r.command.place, "flow", ""), "command.place.flow"),
        (
            lambda r: setattr(r.command.place, "ring_timeout_seconds", 601),
            "command.place.ring_timeout_seconds",
        ),
        (lambda r: _set(r, "transfer", TransferCall(to=CALLEE)), "command.transfer.call_id"),
        (lambda r: _set(r, "transfer", TransferCall(call_id="CA1")), "command.transfer.to"),
        (
            lambda r: _set(r, "transfer", TransferCall(call_id="CA1", to=CALLEE, caller_id="12")),
            "command.transfer.caller_id",
        ),
        (lambda r: _set(r, "enqueue", EnqueueCall(call_id="CA1")), "command.enqueue.queue"),
        (lambda r: _set(r, "speak", SpeakToCall(call_id="CA1")), "command.speak.script"),
        (
            lambda r: _set(r, "speak", SpeakToCall(call_id="CA1", say="hi", then_step="menu")),
            "command.speak.then_step",
        ),
        (lambda r: _set(r, "speak", SpeakToCall(say="hi")), "command.speak.call_id"),
        (lambda r: _set(r, "hang_up", HangUpCall()), "command.hang_up.call_id"),
    ],
)
async def test_invalid_commands_are_invalid_argument_with_field_violations(
    gateway: Gateway, mutate: Mutation, field: str
) -> None:
    request = place_request()
    mutate(request)
    with pytest.raises(aio.AioRpcError) as err:
        await gateway.stub.SendCallCommand(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(err.value)
    assert field in found, found
    assert not call_commands(gateway.bus)


@pytest.mark.parametrize(
    "command",
    [
        CallCommand(place=PlaceCall(to="sip:desk-7@pbx.example.com", flow="support")),
        CallCommand(
            place=PlaceCall(to=CALLEE, play_url="https://cdn.example.com/a.mp3", record=True)
        ),
        CallCommand(transfer=TransferCall(call_id="CA1", to="sips:desk@pbx.example.com")),
        CallCommand(enqueue=EnqueueCall(call_id="CA1", queue="support")),
        CallCommand(speak=SpeakToCall(call_id="CA1", say="One moment", then_step="menu/start")),
        CallCommand(hang_up=HangUpCall(call_id="CA1")),
    ],
)
async def test_every_action_is_accepted(gateway: Gateway, command: CallCommand) -> None:
    reply = await gateway.stub.SendCallCommand(
        SendCallCommandRequest(idempotency_key="k", command=command), timeout=5
    )
    ((routing_key, message),) = call_commands(gateway.bus)
    assert routing_key == "call.voice.twilio"  # the only enabled voice connector
    assert decode(message).WhichOneof("action") == command.WhichOneof("action")
    assert reply.state == C.CALL_COMMAND_STATE_PENDING


@pytest.mark.parametrize(
    ("channel", "provider", "reason"),
    [
        ("fax", "", "UNKNOWN_CHANNEL"),
        ("voice", "vonage", "CONNECTOR_DISABLED"),
        ("voice", "nexmo", "UNKNOWN_PROVIDER"),
        ("sms", "twilio", "CALL_COMMANDS_UNSUPPORTED"),
    ],
)
async def test_unknown_disabled_or_callless_connector_is_failed_precondition(
    gateway: Gateway, channel: str, provider: str, reason: str
) -> None:
    request = place_request()
    request.command.channel, request.command.provider = channel, provider
    with pytest.raises(aio.AioRpcError) as err:
        await gateway.stub.SendCallCommand(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err.value) == reason
    assert not call_commands(gateway.bus)


class PlaceOnlyDirectory(ConnectorDirectory):
    """voice.twilio as a connector that only places calls."""

    def spec(self, name: str) -> ConnectorSpec:
        spec = super().spec(name)
        manifest = ConnectorManifest()
        manifest.CopyFrom(spec.manifest)
        del manifest.call_actions[:]
        manifest.call_actions.append("place")
        return dataclasses.replace(spec, manifest=manifest)


def test_an_action_missing_from_call_actions_is_invalid_argument() -> None:
    directory = PlaceOnlyDirectory(["voice.twilio"])
    now = datetime.now(UTC)
    request = SendCallCommandRequest(
        idempotency_key="k", command=CallCommand(hang_up=HangUpCall(call_id="CA1"))
    )
    with pytest.raises(RpcError) as err:
        prepare_call(request, directory, command_id="c1", now=now)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    ((violation),) = err.value.violations
    assert violation.field == "command.hang_up"
    assert "executes: place" in violation.description
    prepared = prepare_call(place_request(), directory, command_id="c2", now=now)
    assert prepared.action == "place"


async def test_unconfirmed_publish_is_unavailable_and_a_retry_sends_it(tmp_path: Path) -> None:
    bus = InMemoryBus()
    await bus.connect()
    config = settings(tmp_path, connectors=CONNECTORS)
    server, channel = await start_gateway(config, bus=bus)
    try:
        stub = GatewayServiceStub(channel)
        request = place_request("retry-call")
        request.command.command_id = "retry-cmd"
        bus.available = False
        with pytest.raises(aio.AioRpcError) as err:
            await stub.SendCallCommand(request, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_reason(err.value) == "PUBLISH_FAILED"
        assert "retry with the same idempotency_key" in (err.value.details() or "")
        assert not call_commands(bus)
        # Recorded (so a retry on any replica finds it), but not as sent.
        recorded = await server.ledger.get_call_command("retry-cmd")
        assert (recorded.state, recorded.dispatched) == (C.CALL_COMMAND_STATE_PENDING, False)
        bus.available = True
        # publish_timeout is 2 s: the retry waits until the first request surely gave up.
        reply = await stub.SendCallCommand(request, timeout=8)
        assert reply.command_id == "retry-cmd"
        assert not reply.created
        ((_, message),) = call_commands(bus)
        assert decode(message).command_id == reply.command_id
        got = (
            await stub.GetCallCommand(GetCallCommandRequest(command_id=reply.command_id))
        ).call_command
        assert got.dispatched
        assert got.state == C.CALL_COMMAND_STATE_PENDING
    finally:
        await channel.close()
        await server.stop()
        await bus.close()


async def test_outcome_event_ends_the_command_and_later_ones_change_nothing(
    gateway: Gateway,
) -> None:
    reply = await gateway.stub.SendCallCommand(place_request(), timeout=5)
    command = decode(call_commands(gateway.bus)[0][1])
    accepted = await publish_outcome(
        gateway.bus,
        command,
        CallCommandResult(
            outcome=O.CALL_COMMAND_OUTCOME_ACCEPTED,
            call_id="CA" + "1" * 32,
            provider_status="queued",
        ),
    )
    got = await wait_for_call_state(gateway.stub, reply.command_id, C.CALL_COMMAND_STATE_ACCEPTED)
    assert got.call_id == "CA" + "1" * 32
    assert got.provider_status == "queued"
    assert got.account == "main"
    assert got.outcome_event_id == accepted.id
    assert got.HasField("completed_at")

    # A duplicate of the outcome and a late, different one: both change nothing.
    await gateway.bus.publish(
        EVENTS_EXCHANGE, event_routing_key(accepted), encode_event(accepted), timeout=2
    )
    late = await publish_outcome(
        gateway.bus,
        command,
        CallCommandResult(
            outcome=O.CALL_COMMAND_OUTCOME_FAILED, reason_code="ambiguous_send", reason="lost"
        ),
    )
    # The ingestor handles deliveries in order: once a later marker is in, both were seen.
    marker = CallCommand(command_id="marker", channel="voice", provider="twilio")
    marker.hang_up.call_id = "CA2"
    await publish_outcome(
        gateway.bus, marker, CallCommandResult(outcome=O.CALL_COMMAND_OUTCOME_ACCEPTED)
    )
    await wait_for_call_state(gateway.stub, "marker", C.CALL_COMMAND_STATE_ACCEPTED)
    again = (
        await gateway.stub.GetCallCommand(GetCallCommandRequest(command_id=reply.command_id))
    ).call_command
    assert again == got
    assert again.outcome_event_id != late.id

    # A repeated SendCallCommand now reports the outcome.
    replay = await gateway.stub.SendCallCommand(place_request(), timeout=5)
    assert replay.state == C.CALL_COMMAND_STATE_ACCEPTED
    assert len(call_commands(gateway.bus)) == 1


async def test_failed_and_expired_outcomes(gateway: Gateway) -> None:
    hang_up = SendCallCommandRequest(
        idempotency_key="h", command=CallCommand(hang_up=HangUpCall(call_id="CA404"))
    )
    failed = await gateway.stub.SendCallCommand(hang_up, timeout=5)
    speak = SendCallCommandRequest(
        idempotency_key="s", command=CallCommand(speak=SpeakToCall(call_id="CA9", say="hello"))
    )
    expired = await gateway.stub.SendCallCommand(speak, timeout=5)
    sent = {decode(m).command_id: decode(m) for _, m in call_commands(gateway.bus)}
    await publish_outcome(
        gateway.bus,
        sent[failed.command_id],
        CallCommandResult(
            outcome=O.CALL_COMMAND_OUTCOME_FAILED,
            call_id="CA404",
            reason_code="call_not_found",
            reason="Twilio does not know CA404",
            permanent=True,
        ),
    )
    await publish_outcome(
        gateway.bus,
        sent[expired.command_id],
        CallCommandResult(outcome=O.CALL_COMMAND_OUTCOME_EXPIRED, reason_code="ttl_expired"),
    )
    got = await wait_for_call_state(gateway.stub, failed.command_id, C.CALL_COMMAND_STATE_FAILED)
    assert (got.reason_code, got.permanent, got.action) == ("call_not_found", True, "hang_up")
    got = await wait_for_call_state(gateway.stub, expired.command_id, C.CALL_COMMAND_STATE_EXPIRED)
    assert got.reason_code == "ttl_expired"


async def test_outcome_of_a_command_the_gateway_did_not_send_is_kept(gateway: Gateway) -> None:
    # As `channel-gateway call place ...` publishes it, straight onto the bus.
    command = CallCommand(
        command_id="cli-0001", channel="voice", provider="twilio", correlation_id="ops"
    )
    command.place.CopyFrom(PlaceCall(to=CALLEE, say="test"))
    await publish_outcome(
        gateway.bus,
        command,
        CallCommandResult(outcome=O.CALL_COMMAND_OUTCOME_ACCEPTED, call_id="CA7"),
    )
    got = await wait_for_call_state(gateway.stub, "cli-0001", C.CALL_COMMAND_STATE_ACCEPTED)
    assert (got.call_id, got.action, got.channel, got.provider) == (
        "CA7",
        "place",
        "voice",
        "twilio",
    )
    assert got.idempotency_key == ""
    assert not got.HasField("command")
    assert got.correlation_id == "ops"
    # Its id is taken: SendCallCommand cannot reuse it.
    request = place_request()
    request.command.command_id = "cli-0001"
    with pytest.raises(aio.AioRpcError) as err:
        await gateway.stub.SendCallCommand(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_get_call_command_errors(gateway: Gateway) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await gateway.stub.GetCallCommand(GetCallCommandRequest(command_id="nope"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(aio.AioRpcError) as err:
        await gateway.stub.GetCallCommand(GetCallCommandRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "command_id" in violations(err.value)


async def test_the_gateway_declares_the_call_command_queue(gateway: Gateway) -> None:
    # No voice service is running: the command waits in its durable queue.
    await gateway.stub.SendCallCommand(place_request(), timeout=5)
    assert gateway.bus.queue_depth("connector.voice.twilio.call") == 1
