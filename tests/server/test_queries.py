"""ListMessages, ListConnectors, PreviewMessage, StreamEvents, health and reflection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.api.v1.content_pb2 import (
    Choice,
    ChoiceOption,
    Email,
    Location,
    Template,
    Text,
)
from gateway.api.v1.delivery_pb2 import DeliveryState, DeliveryStatus
from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.gateway_service_pb2 import (
    AdaptationKind,
    ChannelIdentity,
    ConnectorHealth,
    ListConnectorsRequest,
    ListMessagesRequest,
    PreviewMessageRequest,
    StreamEventsRequest,
)
from gateway.api.v1.gateway_service_pb2_grpc import GatewayServiceStub
from gateway.api.v1.message_pb2 import Message
from gateway.runtime.codec import encode_event, event_routing_key
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.topology import EVENTS_EXCHANGE
from gateway.server import events as events_module
from gateway.server.app import health_check
from gateway.server.connectors import QueueInfo
from gateway.server.errors import RpcError
from tests.server.conftest import FixedProbe, Gateway, settings, start_gateway
from tests.server.test_send import text_request, violations

S = DeliveryState


# -- ListMessages ------------------------------------------------------------------


async def test_list_messages_pages_through_a_conversation(gateway: Gateway) -> None:
    sent = []
    for i in range(5):
        reply = await gateway.stub.SendMessage(text_request(f"a{i}"), timeout=5)
        sent.append(reply.message_id)
    other = text_request("b0")
    other.conversation_id = "conv-2"
    await gateway.stub.SendMessage(other, timeout=5)

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await gateway.stub.ListMessages(
            ListMessagesRequest(conversation_id="conv-1", page_size=2, page_token=token), timeout=5
        )
        pages += 1
        assert len(page.messages) <= 2
        seen.extend(m.message_id for m in page.messages)
        assert all(not m.timeline for m in page.messages)  # timelines only from GetMessage
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert sorted(seen) == sorted(sent)
    assert len(set(seen)) == 5

    everything = await gateway.stub.ListMessages(ListMessagesRequest(), timeout=5)
    assert len(everything.messages) == 6
    created = [m.created_at.ToDatetime() for m in everything.messages]
    assert created == sorted(created, reverse=True)  # newest first

    by_correlation = await gateway.stub.ListMessages(
        ListMessagesRequest(correlation_id="order-1234", page_size=100), timeout=5
    )
    assert len(by_correlation.messages) == 6


async def test_list_messages_time_window(gateway: Gateway) -> None:
    await gateway.stub.SendMessage(text_request("w"), timeout=5)
    now = datetime.now(UTC)
    future, past = Timestamp(), Timestamp()
    future.FromDatetime(now + timedelta(hours=1))
    past.FromDatetime(now - timedelta(hours=1))
    inside = await gateway.stub.ListMessages(
        ListMessagesRequest(created_after=past, created_before=future), timeout=5
    )
    assert len(inside.messages) == 1
    after = await gateway.stub.ListMessages(ListMessagesRequest(created_after=future), timeout=5)
    assert not after.messages


async def test_list_messages_rejects_bad_paging(gateway: Gateway) -> None:
    for i in range(3):
        await gateway.stub.SendMessage(text_request(f"p{i}"), timeout=5)
    first = await gateway.stub.ListMessages(ListMessagesRequest(page_size=1), timeout=5)
    # AIP-158: a token belongs to its filter.
    with pytest.raises(aio.AioRpcError) as err:
        await gateway.stub.ListMessages(
            ListMessagesRequest(page_size=1, page_token=first.next_page_token, conversation_id="x"),
            timeout=5,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in violations(err.value)
    with pytest.raises(aio.AioRpcError) as err:
        await gateway.stub.ListMessages(ListMessagesRequest(page_token="garbage"), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(aio.AioRpcError) as err:
        await gateway.stub.ListMessages(ListMessagesRequest(page_size=-1), timeout=5)
    assert "page_size" in violations(err.value)


# -- ListConnectors ----------------------------------------------------------------


async def test_list_connectors_reports_manifests_and_live_health(gateway: Gateway) -> None:
    reply = await gateway.stub.ListConnectors(ListConnectorsRequest(), timeout=5)
    by_name = {c.name: c for c in reply.connectors}
    assert list(by_name) == sorted(by_name)
    twilio = by_name["sms.twilio"]
    assert twilio.enabled
    assert twilio.manifest.provider == "twilio"
    assert twilio.manifest.limits.max_text_length == 1600
    assert twilio.health == ConnectorHealth.CONNECTOR_HEALTH_SERVING
    assert twilio.consumers == 2
    vonage = by_name["sms.vonage"]
    assert not vonage.enabled
    assert vonage.health == ConnectorHealth.CONNECTOR_HEALTH_UNKNOWN
    assert (
        await gateway.stub.ListConnectors(ListConnectorsRequest(channel="fax"), timeout=5)
    ).connectors == []


async def test_list_connectors_not_serving_when_nothing_consumes(tmp_path: Path) -> None:
    bus = InMemoryBus()
    await bus.connect()
    probe = FixedProbe(
        {
            "connector.sms.twilio.send": QueueInfo(exists=True, consumers=0, messages=7),
            "connector.sms.vonage.send": QueueInfo(exists=False),
        }
    )
    server, channel = await start_gateway(settings(tmp_path), bus=bus, probe=probe)
    try:
        stub = GatewayServiceStub(channel)
        reply = await stub.ListConnectors(ListConnectorsRequest(channel="sms"), timeout=5)
        by_name = {c.name: c for c in reply.connectors}
        assert by_name["sms.twilio"].health == ConnectorHealth.CONNECTOR_HEALTH_NOT_SERVING
        assert by_name["sms.twilio"].pending_commands == 7
        assert by_name["sms.vonage"].health == ConnectorHealth.CONNECTOR_HEALTH_NOT_SERVING
        assert "does not exist" in by_name["sms.vonage"].health_detail
    finally:
        await channel.close()
        await server.stop()
        await bus.close()


# -- PreviewMessage ----------------------------------------------------------------


def preview(
    message: Message, channel: str = "sms", provider: str = "", address: str = ""
) -> PreviewMessageRequest:
    return PreviewMessageRequest(
        target=ChannelIdentity(channel=channel, provider=provider, address=address), message=message
    )


async def test_preview_degrades_buttons_to_text_and_counts_segments(gateway: Gateway) -> None:
    choice = Choice(
        header="Acme",
        body="Pick a slot",
        options=[
            ChoiceOption(id="1", title="Morning", description="8-12"),
            ChoiceOption(id="2", title="Evening"),
        ],
        footer="Reply with a number",
    )
    reply = await gateway.stub.PreviewMessage(preview(Message(choice=choice)), timeout=5)
    assert (reply.channel, reply.provider) == ("sms", "twilio")
    assert (
        reply.message.text.body
        == "Acme\nPick a slot\n1. Morning - 8-12\n2. Evening\nReply with a number"
    )
    (adaptation,) = reply.adaptations
    assert adaptation.kind == AdaptationKind.ADAPTATION_KIND_DEGRADED_TO_TEXT
    assert adaptation.field == "message.choice"
    assert not reply.violations
    assert (reply.sms_encoding, reply.sms_segments) == ("GSM-7", 1)
    assert len(gateway.bus.published) == 0  # nothing sent


@pytest.mark.parametrize(
    ("body", "encoding", "units", "segments"),
    [
        ("a" * 160, "GSM-7", 160, 1),
        ("a" * 161, "GSM-7", 161, 2),
        ("€" * 80, "GSM-7", 160, 1),  # extension characters take two septets
        ("Grüße 📦" * 10, "UCS-2", 80, 2),
    ],
)
async def test_preview_sms_segments(
    gateway: Gateway, body: str, encoding: str, units: int, segments: int
) -> None:
    reply = await gateway.stub.PreviewMessage(preview(Message(text=Text(body=body))), timeout=5)
    assert (reply.sms_encoding, reply.sms_units, reply.sms_segments) == (encoding, units, segments)


async def test_preview_reports_dropped_parts_and_violations(gateway: Gateway) -> None:
    email = Email(subject="Invoice", text="Your invoice is attached.", html="<p>Your invoice</p>")
    reply = await gateway.stub.PreviewMessage(preview(Message(email=email)), timeout=5)
    assert reply.message.text.body == "Invoice\n\nYour invoice is attached."
    kinds = {(a.kind, a.field) for a in reply.adaptations}
    assert (AdaptationKind.ADAPTATION_KIND_DROPPED, "message.email.html") in kinds
    assert (AdaptationKind.ADAPTATION_KIND_DEGRADED_TO_TEXT, "message.email") in kinds

    location = Location(latitude=51.5, longitude=-0.12, name="Depot")
    reply = await gateway.stub.PreviewMessage(preview(Message(location=location)), timeout=5)
    assert reply.message.text.body == "Depot\n51.500000,-0.120000"

    reply = await gateway.stub.PreviewMessage(
        preview(Message(template=Template(name="order_update")), address="not a number"), timeout=5
    )
    fields = {v.field for v in reply.violations}
    assert {"message.template", "target.address"} <= fields

    # Vonage is installed but not enabled on this gateway: a send there would fail too.
    with pytest.raises(aio.AioRpcError) as err:
        await gateway.stub.PreviewMessage(
            preview(Message(text=Text(body="hi")), provider="vonage"), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_preview_errors(gateway: Gateway) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await gateway.stub.PreviewMessage(
            preview(Message(text=Text(body="x")), channel=""), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "target.channel" in violations(err.value)
    with pytest.raises(aio.AioRpcError) as err:
        await gateway.stub.PreviewMessage(
            preview(Message(text=Text(body="x")), channel="fax"), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# -- StreamEvents ------------------------------------------------------------------


def status(n: int, channel: str = "sms") -> Event:
    return Event(
        id=f"evt-{n}",
        type="message.status",
        channel=channel,
        provider="twilio",
        status=DeliveryStatus(state=S.DELIVERY_STATE_SENT, message_id=f"m-{n}"),
    )


def inbound(n: int) -> Event:
    return Event(id=f"in-{n}", type="message.received", channel="sms", provider="twilio")


async def publish(bus: InMemoryBus, event: Event) -> None:
    await bus.publish(EVENTS_EXCHANGE, event_routing_key(event), encode_event(event), timeout=2)


async def test_stream_events_filters_by_binding_and_resumes_from_a_cursor(
    gateway: Gateway,
) -> None:
    request = StreamEventsRequest(bindings=["message.received.#"])
    call = gateway.stub.StreamEvents(request, timeout=10)
    await asyncio.sleep(0.2)  # let the stream bind its queue
    await publish(gateway.bus, status(1))
    await publish(gateway.bus, inbound(1))
    await publish(gateway.bus, inbound(2))
    first = await asyncio.wait_for(call.read(), 5)
    assert first.event.id == "in-1"
    assert first.routing_key == "message.received.sms.twilio"
    cursor = first.cursor
    call.cancel()

    # Published while nobody listened: a resumed stream gets them, then live ones.
    await publish(gateway.bus, inbound(3))
    await publish(gateway.bus, status(2))
    await asyncio.sleep(0.1)
    resumed = gateway.stub.StreamEvents(
        StreamEventsRequest(bindings=["message.received.#"], cursor=cursor), timeout=10
    )
    got = [(await asyncio.wait_for(resumed.read(), 5)).event.id for _ in range(2)]
    assert got == ["in-2", "in-3"]
    await publish(gateway.bus, inbound(4))
    live = await asyncio.wait_for(resumed.read(), 5)
    assert live.event.id == "in-4"
    resumed.cancel()


async def test_stream_events_errors(gateway: Gateway) -> None:
    call = gateway.stub.StreamEvents(StreamEventsRequest(cursor="never-seen"), timeout=5)
    with pytest.raises(aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    call = gateway.stub.StreamEvents(
        StreamEventsRequest(bindings=["message..x", "a.b c"]), timeout=5
    )
    with pytest.raises(aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {"bindings[0]", "bindings[1]"} <= set(violations(err.value))


# -- health and reflection ---------------------------------------------------------


async def test_health_and_reflection(gateway: Gateway) -> None:
    health = health_pb2_grpc.HealthStub(gateway.channel)
    for service in ("", "gateway.api.v1.GatewayService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    stub = reflection_pb2_grpc.ServerReflectionStub(gateway.channel)

    async def ask(
        request: reflection_pb2.ServerReflectionRequest,
    ) -> reflection_pb2.ServerReflectionResponse:
        async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield request

        async for response in stub.ServerReflectionInfo(requests(), timeout=5):
            return response
        raise AssertionError("no reflection answer")

    listed = await ask(reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert {"gateway.api.v1.GatewayService", "grpc.health.v1.Health"} <= names
    # What grpcurl asks next: the file defining the service, with its dependencies.
    found = await ask(
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="gateway.api.v1.GatewayService"
        )
    )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in found.file_descriptor_response.file_descriptor_proto
    ]
    by_name = {f.name: f for f in files}
    service_file = by_name["gateway/api/v1/gateway_service.proto"]
    assert [m.name for m in service_file.service[0].method] == [
        "SendMessage",
        "GetMessage",
        "ListMessages",
        "ListConnectors",
        "PreviewMessage",
        "StreamEvents",
        "SendCallCommand",
        "GetCallCommand",
    ]
    assert "gateway/api/v1/envelope.proto" in by_name
    assert "gateway/api/v1/call.proto" in by_name


async def test_health_follows_the_broker_and_shutdown(tmp_path: Path) -> None:
    bus = InMemoryBus()
    await bus.connect()
    server, channel = await start_gateway(settings(tmp_path), bus=bus)
    health = health_pb2_grpc.HealthStub(channel)
    try:
        bus.available = False
        for _ in range(40):
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.1)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        # Liveness does not follow the broker: a broker outage restarts nothing.
        alive = await health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5)
        assert alive.status == health_pb2.HealthCheckResponse.SERVING
        assert await health_check(server.address, service="liveness")
        assert not await health_check(server.address)
        bus.available = True
    finally:
        await server.stop()
    with pytest.raises(aio.AioRpcError) as err:
        await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    await channel.close()
    await bus.close()


async def test_a_stream_that_falls_behind_ends_and_resumes_without_loss(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events_module, "INBOX_SIZE", 3)
    hub = gateway.server.events
    stream = hub.stream(["message.received.#"], "")
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.05)  # subscribed
    for n in range(10):
        await publish(gateway.bus, inbound(n))
    await asyncio.sleep(0.2)  # all delivered to the hub; the reader has not read
    received = [(await first).event.id]

    async def read_until_ended() -> None:
        while True:
            received.append((await anext(stream)).event.id)

    with pytest.raises(RpcError) as err:
        await read_until_ended()
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert 1 <= len(received) <= 4
    resumed = hub.stream(["message.received.#"], received[-1])
    while len(received) < 10:
        received.append((await asyncio.wait_for(anext(resumed), 2)).event.id)
    assert received == [f"in-{n}" for n in range(10)]
    await resumed.aclose()


async def test_streams_end_unavailable_when_the_gateway_stops(tmp_path: Path) -> None:
    bus = InMemoryBus()
    await bus.connect()
    server, channel = await start_gateway(settings(tmp_path, shutdown_grace=5.0), bus=bus)
    try:
        stub = GatewayServiceStub(channel)
        call = stub.StreamEvents(StreamEventsRequest(), timeout=10)
        await asyncio.sleep(0.2)
        started = asyncio.get_running_loop().time()
        await server.stop()
        # Streams are ended first, so stopping does not wait out the grace period.
        assert asyncio.get_running_loop().time() - started < 4
        with pytest.raises(aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close()
        await server.stop()
        await bus.close()


async def test_page_size_default_and_cap_and_metrics(tmp_path: Path) -> None:
    bus = InMemoryBus()
    await bus.connect()
    config = settings(tmp_path, default_page_size=2, max_page_size=3, metrics_port=0)
    server, channel = await start_gateway(config, bus=bus)
    try:
        stub = GatewayServiceStub(channel)
        for i in range(5):
            await stub.SendMessage(text_request(f"m{i}"), timeout=5)
        assert len((await stub.ListMessages(ListMessagesRequest(), timeout=5)).messages) == 2
        capped = await stub.ListMessages(ListMessagesRequest(page_size=100), timeout=5)
        assert len(capped.messages) == 3
        with pytest.raises(aio.AioRpcError):
            await stub.SendMessage(text_request(""), timeout=5)

        assert server._metrics is not None
        url = f"http://127.0.0.1:{server._metrics.server_port}/metrics"
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            text = await resp.text()
        samples = {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("gateway_")
        }
        # Counters are per process: other tests' calls may be in them too.
        assert samples['gateway_grpc_requests_total{code="OK",method="SendMessage"}'] >= 5
        assert (
            samples['gateway_grpc_requests_total{code="INVALID_ARGUMENT",method="SendMessage"}']
            >= 1
        )
        assert samples['gateway_messages_total{connector="sms.twilio",outcome="accepted"}'] >= 5
    finally:
        await channel.close()
        await server.stop()
        await bus.close()
