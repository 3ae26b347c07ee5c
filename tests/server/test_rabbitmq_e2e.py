"""End to end on the real RabbitMQ (a private vhost): SendMessage -> command -> Twilio
connector -> fake Twilio -> signed status callbacks -> ledger -> GetMessage timeline."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

from grpc import aio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.gateway_service_pb2 import (
    ChannelIdentities,
    ChannelIdentity,
    ConnectorHealth,
    ListConnectorsRequest,
    Recipient,
    StreamEventsRequest,
    TimelineEntryKind,
)
from gateway.api.v1.gateway_service_pb2_grpc import GatewayServiceStub
from gateway.runtime.config import RuntimeSettings
from gateway.runtime.service import Service
from gateway.server.app import GatewayServer
from gateway.testing.fake_twilio import FakeTwilio
from gateway.testing.fake_vonage import FakeVonage
from tests.server.conftest import ACCOUNT_SID
from tests.server.test_send import text_request, wait_for_state

S = DeliveryState


def _settings(tmp_path: Path, broker: str, fake_url: str) -> RuntimeSettings:
    return RuntimeSettings.model_validate(
        {
            "http": {"host": "127.0.0.1", "port": 0},
            "broker": {"url": broker, "publish_timeout": 5.0},
            "connectors": {
                "sms.twilio": {
                    "api_base_url": fake_url,
                    "accounts": {
                        "main": {
                            "account_sid": ACCOUNT_SID,
                            "auth_token": {"env": "E2E_TWILIO_TOKEN"},
                            "numbers": ["+14155550100"],
                        }
                    },
                }
            },
            "gateway": {
                "host": "127.0.0.1",
                "port": 0,
                "ledger_url": f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}",
                "shutdown_grace": 2.0,
            },
        }
    )


async def test_send_to_delivered_over_rabbitmq(tmp_path: Path, vhost_url: str) -> None:
    token = secrets.token_hex(16)
    provider = trace.get_tracer_provider()
    exporter = InMemorySpanExporter()
    async with FakeTwilio(
        auth_token=token, callback_statuses=("sent", "delivered"), callback_delay=0.05
    ) as fake:
        config = _settings(tmp_path, vhost_url, fake.url)
        service = Service(config, ["sms.twilio"], environ={"E2E_TWILIO_TOKEN": token})
        gateway = GatewayServer(config)
        await service.start()
        try:
            await gateway.start()
            provider = trace.get_tracer_provider()
            assert isinstance(provider, TracerProvider)
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            async with aio.insecure_channel(gateway.address) as channel:
                stub = GatewayServiceStub(channel)
                connectors = await stub.ListConnectors(ListConnectorsRequest(), timeout=5)
                twilio = next(c for c in connectors.connectors if c.name == "sms.twilio")
                assert twilio.health == ConnectorHealth.CONNECTOR_HEALTH_SERVING
                assert twilio.consumers == 1

                stream = stub.StreamEvents(
                    StreamEventsRequest(bindings=["message.status.sms.*"]), timeout=15
                )
                await asyncio.sleep(0.3)  # the stream binds its queue
                reply = await stub.SendMessage(text_request("e2e-1"), timeout=10)
                got = await wait_for_state(
                    stub, reply.message_id, S.DELIVERY_STATE_DELIVERED, timeout=8
                )
                again = await stub.SendMessage(text_request("e2e-1"), timeout=10)
                streamed = []
                while len(streamed) < 3:
                    item = await asyncio.wait_for(stream.read(), 5)
                    if item.event.status.message_id == reply.message_id:
                        streamed.append(item)
                stream.cancel()
        finally:
            await gateway.stop()
            await service.stop()
        assert again.message_id == reply.message_id
        assert len(fake.calls) == 1  # one provider call, despite the repeated request
        call = fake.calls[0]
        assert call.form["To"] == "+447700900123"
        assert call.form["Body"] == "Your order ships today."

    transitions = [
        e for e in got.timeline if e.kind == TimelineEntryKind.TIMELINE_ENTRY_KIND_TRANSITION
    ]
    assert [e.state for e in transitions] == [
        S.DELIVERY_STATE_ACCEPTED,
        S.DELIVERY_STATE_QUEUED,
        S.DELIVERY_STATE_SENT,
        S.DELIVERY_STATE_DELIVERED,
    ]
    assert got.provider_message_id.startswith("SM")
    # The same statuses reached a gRPC subscriber through its own queue on the broker.
    assert {i.event.status.state for i in streamed} == {
        S.DELIVERY_STATE_QUEUED,
        S.DELIVERY_STATE_SENT,
        S.DELIVERY_STATE_DELIVERED,
    }
    assert all(i.routing_key == "message.status.sms.twilio" for i in streamed)
    assert all(i.cursor == i.event.id for i in streamed)
    assert [e.provider_status for e in transitions[1:]] == ["queued", "sent", "delivered"]
    # One trace from SendMessage through the command to the connector's provider call
    # and its QUEUED status.
    assert transitions[1].trace_id == reply.trace_id
    names = {
        s.name
        for s in exporter.get_finished_spans()
        if format(s.context.trace_id, "032x") == reply.trace_id
    }
    assert {
        "gateway.api.v1.GatewayService/SendMessage",
        "publish channels.commands",
        "send sms.twilio",
    } <= names


async def test_rejected_send_falls_back_to_the_next_provider(
    tmp_path: Path, vhost_url: str
) -> None:
    """Twilio rejects the number; the gateway switches to Vonage, which delivers."""
    env = {
        "E2E_TWILIO_TOKEN": secrets.token_hex(16),
        "E2E_VONAGE_SECRET": secrets.token_hex(16),
        "E2E_VONAGE_SIGNATURE": secrets.token_hex(24),
    }
    twilio = FakeTwilio(auth_token=env["E2E_TWILIO_TOKEN"], callback_delay=0.05)
    vonage = FakeVonage(
        api_key="abcd1234",
        api_secret=env["E2E_VONAGE_SECRET"],
        signature_secret=env["E2E_VONAGE_SIGNATURE"],
        callback_delay=0.05,
    )
    async with twilio, vonage:
        twilio.reject_next(21610, "Attempt to send to unsubscribed recipient")
        raw = _settings(tmp_path, vhost_url, twilio.url).model_dump()
        raw["connectors"]["sms.vonage"] = {
            "api_base_url": vonage.url,
            "accounts": {
                "main": {
                    "api_key": "abcd1234",
                    "api_secret": {"env": "E2E_VONAGE_SECRET"},
                    "signature_secret": {"env": "E2E_VONAGE_SIGNATURE"},
                    "numbers": ["+14155550100"],
                }
            },
        }
        config = RuntimeSettings.model_validate(raw)
        service = Service(config, ["sms.twilio", "sms.vonage"], environ=env)
        gateway = GatewayServer(config)
        await service.start()
        try:
            await gateway.start()
            async with aio.insecure_channel(gateway.address) as channel:
                stub = GatewayServiceStub(channel)
                request = text_request("fallback-1")
                request.recipient.CopyFrom(
                    Recipient(
                        identities=ChannelIdentities(
                            identities=[
                                ChannelIdentity(
                                    channel="sms", provider="twilio", address="+447700900123"
                                ),
                                ChannelIdentity(
                                    channel="sms", provider="vonage", address="+447700900123"
                                ),
                            ]
                        )
                    )
                )
                reply = await stub.SendMessage(request, timeout=10)
                got = await wait_for_state(
                    stub, reply.message_id, S.DELIVERY_STATE_DELIVERED, timeout=8
                )
        finally:
            await gateway.stop()
            await service.stop()
        assert len(twilio.calls) == 1
        assert len(vonage.calls) == 1
    assert (got.provider, got.attempt) == ("vonage", 2)
    transitions = [
        (e.state, e.provider)
        for e in got.timeline
        if e.kind == TimelineEntryKind.TIMELINE_ENTRY_KIND_TRANSITION
    ]
    assert transitions[0] == (S.DELIVERY_STATE_ACCEPTED, "twilio")
    assert (S.DELIVERY_STATE_SWITCHING_CHANNEL, "twilio") in transitions
    assert transitions[-1] == (S.DELIVERY_STATE_DELIVERED, "vonage")
    rejected = [e for e in got.timeline if e.state == S.DELIVERY_STATE_FAILED]
    assert rejected[0].reason_code == "21610"
    assert [a.provider for a in got.attempts] == ["twilio", "vonage"]
