"""SendMessage and GetMessage through a real in-process gRPC server (in-memory bus, SQLite)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2
from grpc import aio
from grpc_status import rpc_status
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy.exc import OperationalError

from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.content_pb2 import Attachment, Choice, ChoiceOption, Media, Text
from gateway.api.v1.delivery_pb2 import DeliveryState, DeliveryStatus
from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.gateway_service_pb2 import (
    ChannelIdentities,
    ChannelIdentity,
    FallbackPolicy,
    FallbackStep,
    GetMessageRequest,
    OutboundMessage,
    Recipient,
    SendMessageRequest,
    TimelineEntryKind,
)
from gateway.api.v1.gateway_service_pb2_grpc import GatewayServiceStub
from gateway.api.v1.message_pb2 import Message
from gateway.api.v1.participant_pb2 import Participant
from gateway.runtime.bus import OutgoingMessage, PublishTimeoutError
from gateway.runtime.codec import encode_event, event_routing_key
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.outbound import status_event
from gateway.runtime.topology import COMMANDS_EXCHANGE, EVENTS_EXCHANGE
from tests.server.conftest import Gateway, settings, start_gateway

S = DeliveryState
CUSTOMER = "+447700900123"


def text_request(
    key: str = "key-1", body: str = "Your order ships today.", **kw: object
) -> SendMessageRequest:
    request = SendMessageRequest(
        idempotency_key=key,
        recipient=Recipient(address=ChannelIdentity(channel="sms", address=CUSTOMER)),
        message=Message(text=Text(body=body)),
        correlation_id="order-1234",
        conversation_id="conv-1",
        metadata={"tenant": "acme"},
    )
    for name, value in kw.items():
        setattr(request, name, value)
    return request


def commands(bus: InMemoryBus) -> list[tuple[str, OutgoingMessage]]:
    return [(key, msg) for exchange, key, msg in bus.published if exchange == COMMANDS_EXCHANGE]


def decode(message: OutgoingMessage) -> SendMessageCommand:
    command = SendMessageCommand()
    command.ParseFromString(message.body)
    return command


def violations(error: aio.AioRpcError) -> dict[str, str]:
    """Field -> description of the google.rpc.BadRequest detail of a failed call."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status in the trailers"
    found: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.update({v.field: v.description for v in bad.field_violations})
    return found


async def test_send_records_accepted_and_publishes_the_command(gateway: Gateway) -> None:
    reply = await gateway.stub.SendMessage(text_request(), timeout=5)
    assert reply.created
    assert reply.state == S.DELIVERY_STATE_ACCEPTED
    assert (reply.channel, reply.provider) == ("sms", "twilio")
    assert len(reply.trace_id) == 32

    ((routing_key, message),) = commands(gateway.bus)
    assert routing_key == "send.sms.twilio"
    assert message.message_id == f"{reply.message_id}:1"
    command = decode(message)
    assert command.message_id == reply.message_id
    assert command.attempt == 1
    assert [r.address for r in command.message.recipients] == [CUSTOMER]
    assert command.message.text.body == "Your order ships today."
    assert command.correlation_id == "order-1234"
    assert dict(command.metadata) == {"tenant": "acme"}
    # The command carries the SendMessage trace.
    traceparent = str(message.headers["traceparent"])
    assert traceparent.split("-")[1] == reply.trace_id

    got = (await gateway.stub.GetMessage(GetMessageRequest(message_id=reply.message_id))).message
    assert got.state == S.DELIVERY_STATE_ACCEPTED
    assert got.idempotency_key == "key-1"
    assert got.recipient == CUSTOMER
    assert got.message.text.body == "Your order ships today."
    assert got.trace_id == reply.trace_id
    assert [e.state for e in got.timeline] == [S.DELIVERY_STATE_ACCEPTED]
    assert got.attempts[0].dispatched


async def test_same_idempotency_key_returns_same_id_and_never_publishes_twice(
    gateway: Gateway,
) -> None:
    first = await gateway.stub.SendMessage(text_request("same"), timeout=5)
    replies = await asyncio.gather(
        *(gateway.stub.SendMessage(text_request("same"), timeout=5) for _ in range(5))
    )
    assert {r.message_id for r in replies} == {first.message_id}
    assert not any(r.created for r in replies)
    assert len(commands(gateway.bus)) == 1


async def test_reused_key_with_other_content_is_already_exists(gateway: Gateway) -> None:
    await gateway.stub.SendMessage(text_request("k"), timeout=5)
    with pytest.raises(aio.AioRpcError) as err:
        await gateway.stub.SendMessage(text_request("k", body="something else"), timeout=5)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert len(commands(gateway.bus)) == 1


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: setattr(r, "idempotency_key", ""), "idempotency_key"),
        (lambda r: r.ClearField("recipient"), "recipient"),
        (lambda r: r.ClearField("message"), "message"),
        (lambda r: r.recipient.address.ClearField("channel"), "recipient.address.channel"),
        (
            lambda r: setattr(r.recipient.address, "address", "not a number"),
            "recipient.address.address",
        ),
        (
            lambda r: r.message.recipients.append(Participant(channel="sms", address=CUSTOMER)),
            "message.recipients",
        ),
        (lambda r: r.message.text.ClearField("body"), "message.text.body"),
        (lambda r: setattr(r.message.text, "body", "x" * 1601), "message.text.body"),
        (lambda r: r.message.ClearField("text"), "message"),
        (
            lambda r: r.message.attachments.extend(
                Attachment(url=f"https://x.test/{i}") for i in range(11)
            ),
            "message.attachments",
        ),
        (
            lambda r: r.message.attachments.append(Attachment(url="file:///etc/passwd")),
            "message.attachments[0].url",
        ),
        (
            lambda r: r.fallback.steps.append(FallbackStep(channel="email")),
            "fallback.steps[0].channel",
        ),
        (
            lambda r: r.fallback.steps.extend([FallbackStep(channel="sms")] * 2),
            "fallback.steps[1].channel",
        ),
    ],
)
async def test_invalid_requests_are_invalid_argument_with_field_violations(
    gateway: Gateway, mutate: object, field: str
) -> None:
    request = text_request()
    mutate(request)  # type: ignore[operator]
    with pytest.raises(aio.AioRpcError) as err:
        await gateway.stub.SendMessage(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(err.value)
    assert field in found, found
    assert not commands(gateway.bus)


async def test_text_too_long_names_the_limit(gateway: Gateway) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await gateway.stub.SendMessage(text_request(body="y" * 2000), timeout=5)
    assert "1600" in violations(err.value)["message.text.body"]


async def test_media_on_a_text_only_connector_is_invalid_argument(tmp_path: Path) -> None:
    bus = InMemoryBus()
    await bus.connect()
    config = settings(tmp_path, connectors={"sms.twilio": {}, "sms.vonage": {}})
    server, channel = await start_gateway(config, bus=bus)
    try:
        stub = GatewayServiceStub(channel)
        request = text_request()
        request.recipient.address.provider = "vonage"
        request.message.attachments.append(Attachment(url="https://example.com/a.jpg"))
        with pytest.raises(aio.AioRpcError) as err:
            await stub.SendMessage(request, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "cannot send media" in violations(err.value)["message.attachments"]
        # Two SMS connectors enabled and none named: ambiguous, a precondition.
        with pytest.raises(aio.AioRpcError) as err:
            await stub.SendMessage(text_request("k2"), timeout=5)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "name the provider" in (err.value.details() or "")
        # Media on Twilio is fine.
        request.recipient.address.provider = "twilio"
        request.message.ClearField("text")
        request.message.media.CopyFrom(Media(caption="the receipt"))
        reply = await stub.SendMessage(request, timeout=5)
        assert reply.provider == "twilio"
    finally:
        await channel.close()
        await server.stop()
        await bus.close()


@pytest.mark.parametrize(
    ("channel", "provider", "needle"),
    [
        ("fax", "", "unknown channel"),
        ("sms", "vonage", "disabled"),
        ("sms", "nexmo", "unknown provider"),
    ],
)
async def test_unknown_or_disabled_channel_is_failed_precondition(
    gateway: Gateway, channel: str, provider: str, needle: str
) -> None:
    request = text_request()
    request.recipient.address.channel = channel
    request.recipient.address.provider = provider
    with pytest.raises(aio.AioRpcError) as err:
        await gateway.stub.SendMessage(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert needle in (err.value.details() or "")
    assert not commands(gateway.bus)


async def test_buttons_are_sent_as_numbered_text_on_sms(gateway: Gateway) -> None:
    request = text_request()
    request.message.choice.CopyFrom(
        Choice(
            body="When should we deliver?",
            options=[
                ChoiceOption(id="am", title="Morning"),
                ChoiceOption(id="pm", title="Afternoon"),
            ],
        )
    )
    await gateway.stub.SendMessage(request, timeout=5)
    command = decode(commands(gateway.bus)[0][1])
    assert command.message.WhichOneof("content") == "text"
    assert command.message.text.body == "When should we deliver?\n1. Morning\n2. Afternoon"


async def test_identities_become_a_fallback_plan(tmp_path: Path) -> None:
    bus = InMemoryBus()
    await bus.connect()
    config = settings(tmp_path, connectors={"sms.twilio": {}, "sms.vonage": {}})
    server, channel = await start_gateway(config, bus=bus)
    try:
        stub = GatewayServiceStub(channel)
        request = text_request()
        request.recipient.CopyFrom(
            Recipient(
                identities=ChannelIdentities(
                    identities=[
                        ChannelIdentity(channel="sms", provider="twilio", address=CUSTOMER),
                        ChannelIdentity(channel="sms", provider="vonage", address="+447700900999"),
                    ]
                )
            )
        )
        reply = await stub.SendMessage(request, timeout=5)
        got = (await stub.GetMessage(GetMessageRequest(message_id=reply.message_id))).message
        assert [s.channel for s in got.fallback.steps] == ["sms", "sms"]
        assert got.fallback_active
        assert got.provider == "twilio"
        # Only the first step is sent now; the fallback engine owns the rest.
        assert [k for k, _ in commands(bus)] == ["send.sms.twilio"]

        # Twilio rejects it: the gateway switches to Vonage and says so on the bus.
        first = decode(commands(bus)[0][1])
        rejected = status_event(
            first,
            account="main",
            status=DeliveryStatus(
                state=S.DELIVERY_STATE_FAILED, reason_code="21211", permanent=True
            ),
        )
        await bus.publish(
            EVENTS_EXCHANGE, event_routing_key(rejected), encode_event(rejected), timeout=2
        )
        for _ in range(100):
            if len(commands(bus)) == 2:
                break
            await asyncio.sleep(0.05)
        routing_key, message = commands(bus)[1]
        assert routing_key == "send.sms.vonage"
        second = decode(message)
        assert (second.message_id, second.attempt) == (reply.message_id, 2)
        assert [r.address for r in second.message.recipients] == ["+447700900999"]
        got = (await stub.GetMessage(GetMessageRequest(message_id=reply.message_id))).message
        assert S.DELIVERY_STATE_SWITCHING_CHANNEL in [e.state for e in got.timeline]
        assert (got.provider, got.attempt, got.recipient) == ("vonage", 2, "+447700900999")
        notices = []
        for exchange, _, m in bus.published:
            if exchange == EVENTS_EXCHANGE:
                event = Event()
                event.ParseFromString(m.body)
                if event.attributes.get("gateway.origin") == "ledger":
                    notices.append(event.status.state)
        # The gateway's own SWITCHING_CHANNEL notice reached the bus.
        assert S.DELIVERY_STATE_SWITCHING_CHANNEL in notices
    finally:
        await channel.close()
        await server.stop()
        await bus.close()


async def test_fallback_steps_need_an_identity_on_their_channel(gateway: Gateway) -> None:
    request = text_request()
    request.fallback.CopyFrom(
        FallbackPolicy(steps=[FallbackStep(channel="sms", success_state=S.DELIVERY_STATE_QUEUED)])
    )
    with pytest.raises(aio.AioRpcError) as err:
        await gateway.stub.SendMessage(request, timeout=5)
    assert "fallback.steps[0].success_state" in violations(err.value)


async def test_unconfirmed_publish_is_unavailable_and_a_retry_sends_it(tmp_path: Path) -> None:
    bus = InMemoryBus()
    await bus.connect()
    server, channel = await start_gateway(settings(tmp_path, broker="memory://"), bus=bus)
    try:
        stub = GatewayServiceStub(channel)
        bus.available = False
        with pytest.raises(aio.AioRpcError) as err:
            await stub.SendMessage(text_request("retry-me"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "retry with the same idempotency_key" in (err.value.details() or "")
        assert not commands(bus)
        bus.available = True
        # publish_timeout is 2 s: the retry waits until the first request surely gave up.
        reply = await stub.SendMessage(text_request("retry-me"), timeout=8)
        assert not reply.created
        ((_, message),) = commands(bus)
        assert decode(message).message_id == reply.message_id
        got = (await stub.GetMessage(GetMessageRequest(message_id=reply.message_id))).message
        assert got.attempts[0].dispatched
    finally:
        await channel.close()
        await server.stop()
        await bus.close()


class SlowBus(InMemoryBus):
    """Commands never get a confirm: the publish waits until its timeout."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float] = []

    async def publish(
        self, exchange: str, routing_key: str, message: OutgoingMessage, *, timeout: float
    ) -> None:
        if exchange != COMMANDS_EXCHANGE:
            await super().publish(exchange, routing_key, message, timeout=timeout)
            return
        self.timeouts.append(timeout)
        await asyncio.sleep(timeout)
        raise PublishTimeoutError(f"no confirm within {timeout}s")


async def test_publish_is_bounded_by_the_callers_deadline(tmp_path: Path) -> None:
    bus = SlowBus()
    await bus.connect()
    server, channel = await start_gateway(settings(tmp_path), bus=bus)
    try:
        stub = GatewayServiceStub(channel)
        with pytest.raises(aio.AioRpcError) as err:
            await stub.SendMessage(text_request(), timeout=0.6)
        assert err.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        assert bus.timeouts
        assert bus.timeouts[0] < 0.6
    finally:
        await channel.close()
        await server.stop()
        await bus.close()


async def test_get_message_errors(gateway: Gateway) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await gateway.stub.GetMessage(GetMessageRequest(message_id="nope"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(aio.AioRpcError) as err:
        await gateway.stub.GetMessage(GetMessageRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message_id" in violations(err.value)


async def test_send_span_is_the_parent_of_the_command(gateway: Gateway) -> None:
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    reply = await gateway.stub.SendMessage(text_request(), timeout=5)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    send = spans["gateway.api.v1.GatewayService/SendMessage"]
    publish = spans["publish channels.commands"]
    assert format(send.context.trace_id, "032x") == reply.trace_id
    assert publish.parent is not None
    assert publish.parent.span_id == send.context.span_id
    assert send.attributes is not None
    assert send.attributes["messaging.message.id"] == reply.message_id
    command_message = commands(gateway.bus)[0][1]
    assert str(command_message.headers["traceparent"]).split("-")[2] == format(
        publish.context.span_id, "016x"
    )


async def test_status_events_build_the_timeline(gateway: Gateway) -> None:
    reply = await gateway.stub.SendMessage(text_request(), timeout=5)
    command = decode(commands(gateway.bus)[0][1])
    # Out of order, with a duplicate: the state ends DELIVERED, the late QUEUED is not applied.
    for state, provider_status in (
        (S.DELIVERY_STATE_SENT, "sent"),
        (S.DELIVERY_STATE_QUEUED, "queued"),
        (S.DELIVERY_STATE_DELIVERED, "delivered"),
        (S.DELIVERY_STATE_DELIVERED, "delivered"),
    ):
        event = status_event(
            command,
            account="main",
            status=DeliveryStatus(
                state=state, provider_status=provider_status, provider_message_id="SM1"
            ),
        )
        await gateway.bus.publish(
            EVENTS_EXCHANGE, event_routing_key(event), encode_event(event), timeout=2
        )
    got = await wait_for_state(gateway.stub, reply.message_id, S.DELIVERY_STATE_DELIVERED)
    transitions = [
        e.state for e in got.timeline if e.kind == TimelineEntryKind.TIMELINE_ENTRY_KIND_TRANSITION
    ]
    assert transitions == [
        S.DELIVERY_STATE_ACCEPTED,
        S.DELIVERY_STATE_SENT,
        S.DELIVERY_STATE_DELIVERED,
    ]
    assert got.provider_message_id == "SM1"
    delivered = [e for e in got.timeline if e.state == S.DELIVERY_STATE_DELIVERED]
    assert len(delivered) == 1  # the duplicate event changed nothing
    assert delivered[0].provider_status == "delivered"
    assert delivered[0].channel == "sms"


async def wait_for_state(
    stub: GatewayServiceStub, message_id: str, state: int, timeout: float = 5.0
) -> OutboundMessage:
    """GetMessage until the message reaches ``state``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = (await stub.GetMessage(GetMessageRequest(message_id=message_id), timeout=2)).message
        if got.state == state:
            return got
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"state is {DeliveryState.Name(got.state)}: {got}")
        await asyncio.sleep(0.05)


class DelayedBus(InMemoryBus):
    """Commands are confirmed after a delay (a slow broker), so an RPC is in flight."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.publishing = asyncio.Event()

    async def publish(
        self, exchange: str, routing_key: str, message: OutgoingMessage, *, timeout: float
    ) -> None:
        if exchange == COMMANDS_EXCHANGE:
            self.publishing.set()
            await asyncio.sleep(self.delay)
        await super().publish(exchange, routing_key, message, timeout=timeout)


async def test_graceful_shutdown_finishes_rpcs_in_flight(tmp_path: Path) -> None:
    bus = DelayedBus(0.5)
    await bus.connect()
    server, channel = await start_gateway(settings(tmp_path), bus=bus)
    stub = GatewayServiceStub(channel)
    try:
        in_flight = asyncio.ensure_future(stub.SendMessage(text_request(), timeout=5))
        await asyncio.wait_for(bus.publishing.wait(), 5)
        await server.stop()  # waits up to shutdown_grace for the send
        reply = await in_flight
        assert reply.created
        assert len(commands(bus)) == 1
        with pytest.raises(aio.AioRpcError) as err:
            await stub.SendMessage(text_request("after"), timeout=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close()
        await server.stop()
        await bus.close()


async def test_ledger_outage_is_unavailable_without_details(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_: object, **__: object) -> None:
        raise OperationalError("INSERT ...", {}, Exception("could not connect to db-secret-host"))

    monkeypatch.setattr(gateway.server.ledger, "accept", broken)
    with pytest.raises(aio.AioRpcError) as err:
        await gateway.stub.SendMessage(text_request(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "db-secret-host" not in (err.value.details() or "")
    assert not commands(gateway.bus)


async def test_slow_ledger_reads_end_at_the_deadline(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    abandoned = asyncio.Event()

    async def slow(*_: object, **__: object) -> None:
        try:
            await asyncio.sleep(30)
        finally:
            abandoned.set()  # the server gave up on the read, it does not run on

    monkeypatch.setattr(gateway.server.ledger, "get", slow)
    with pytest.raises(aio.AioRpcError) as err:
        await gateway.stub.GetMessage(GetMessageRequest(message_id="m"), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(abandoned.wait(), 2)


async def test_send_joins_the_callers_trace(gateway: Gateway) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    metadata = (("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),)
    reply = await gateway.stub.SendMessage(text_request(), timeout=5, metadata=metadata)
    assert reply.trace_id == trace_id
    traceparent = str(commands(gateway.bus)[0][1].headers["traceparent"])
    assert traceparent.split("-")[1] == trace_id


async def test_timeout_switch_and_late_delivery_notices(tmp_path: Path) -> None:
    """No SENT within the step's wait: switch to the next provider. The first one
    delivering afterwards is announced as a late delivery; ordinary statuses are not
    echoed by the gateway (consumers already have them)."""
    bus = InMemoryBus()
    await bus.connect()
    config = settings(tmp_path, connectors={"sms.twilio": {}, "sms.vonage": {}})
    server, channel = await start_gateway(config, bus=bus)
    try:
        stub = GatewayServiceStub(channel)
        request = text_request()
        request.recipient.CopyFrom(
            Recipient(
                identities=ChannelIdentities(
                    identities=[ChannelIdentity(channel="sms", address=CUSTOMER)]
                )
            )
        )
        short, long = Duration(), Duration()
        short.FromMilliseconds(300)
        long.FromSeconds(60)
        request.fallback.CopyFrom(
            FallbackPolicy(
                steps=[
                    FallbackStep(
                        channel="sms",
                        provider="twilio",
                        success_state=S.DELIVERY_STATE_SENT,
                        wait=short,
                    ),
                    FallbackStep(channel="sms", provider="vonage", wait=long),
                ]
            )
        )
        reply = await stub.SendMessage(request, timeout=5)
        assert reply.provider == "twilio"
        for _ in range(100):  # the engine fires the persisted timer
            if len(commands(bus)) == 2:
                break
            await asyncio.sleep(0.05)
        assert [k for k, _ in commands(bus)] == ["send.sms.twilio", "send.sms.vonage"]
        first, second = (decode(m) for _, m in commands(bus))

        for command, state in (
            (second, S.DELIVERY_STATE_QUEUED),  # an ordinary status of the current attempt
            (first, S.DELIVERY_STATE_DELIVERED),  # the channel given up on delivers
        ):
            event = status_event(command, account="main", status=DeliveryStatus(state=state))
            await bus.publish(
                EVENTS_EXCHANGE, event_routing_key(event), encode_event(event), timeout=2
            )
        got = await wait_for_late_delivery(stub, reply.message_id)
        assert (got.provider, got.attempt) == ("vonage", 2)
        assert got.fallback.steps[0].provider == "twilio"
        await asyncio.sleep(0.2)
        notices = []
        for exchange, _, m in bus.published:
            if exchange == EVENTS_EXCHANGE:
                event = Event()
                event.ParseFromString(m.body)
                if event.attributes.get("gateway.origin") == "ledger":
                    notices.append(
                        (event.status.state, event.attributes.get("gateway.late_delivery"))
                    )
        assert (S.DELIVERY_STATE_SWITCHING_CHANNEL, None) in notices
        assert (S.DELIVERY_STATE_DELIVERED, "true") in notices
        assert (S.DELIVERY_STATE_QUEUED, None) not in notices  # not echoed
    finally:
        await channel.close()
        await server.stop()
        await bus.close()


async def wait_for_late_delivery(stub: GatewayServiceStub, message_id: str) -> OutboundMessage:
    for _ in range(100):
        got = (await stub.GetMessage(GetMessageRequest(message_id=message_id), timeout=2)).message
        if got.late_delivery:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"no late delivery recorded: {got}")
