"""Status callbacks join the send's trace: the send span's traceparent rides the callback URL
(Twilio StatusCallback, Vonage webhook_url), the webhook span links to the send span, and
every timeline entry of the message carries the send's trace id (real RabbitMQ, fake
providers over HTTP)."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from grpc import aio
from multidict import MultiDict
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.gateway_service_pb2 import ChannelIdentity, Recipient, TimelineEntryKind
from gateway.api.v1.gateway_service_pb2_grpc import GatewayServiceStub
from gateway.contract.callbacks import (
    CALLBACK_TRACE_PARAM,
    callback_trace,
    traced_callback_url,
)
from gateway.runtime.config import RuntimeSettings
from gateway.runtime.service import Service
from gateway.server.app import GatewayServer
from gateway.server.client import trace_json, trace_table
from gateway.testing.fake_twilio import FakeTwilio
from gateway.testing.fake_vonage import FakeVonage
from tests.server.conftest import ACCOUNT_SID
from tests.server.test_send import text_request, wait_for_state

S = DeliveryState


def test_traced_callback_url_round_trips_the_current_span() -> None:
    provider = TracerProvider()
    with provider.get_tracer("t").start_as_current_span("send") as span:
        url = traced_callback_url("https://gw.example/webhooks/sms/twilio/main/status?mid=m1")
    expected = format(span.get_span_context().trace_id, "032x")
    assert url.startswith("https://gw.example/webhooks/sms/twilio/main/status?mid=m1&")
    query = MultiDict(p.split("=", 1) for p in url.split("?", 1)[1].split("&"))
    linked = callback_trace(query)
    assert linked is not None
    assert linked.traceparent.split("-")[1] == expected
    assert linked.context.span_id == span.get_span_context().span_id
    with provider.get_tracer("t").start_as_current_span("another send"):
        # A URL that names a trace already keeps it.
        assert traced_callback_url(url) == url
    # Without a current span there is nothing to link: the URL is unchanged.
    assert traced_callback_url("https://gw.example/s") == "https://gw.example/s"


def test_malformed_callback_traceparent_is_ignored() -> None:
    for value in ("", "garbage", "00-" + "0" * 32 + "-" + "1" * 16 + "-01", "00-zz-yy-01"):
        assert callback_trace({CALLBACK_TRACE_PARAM: value}) is None
    assert callback_trace({}) is None


def _settings(tmp_path: Path, broker: str, twilio_url: str, vonage_url: str) -> RuntimeSettings:
    return RuntimeSettings.model_validate(
        {
            "http": {"host": "127.0.0.1", "port": 0},
            "broker": {"url": broker, "publish_timeout": 5.0},
            "connectors": {
                "sms.twilio": {
                    "api_base_url": twilio_url,
                    "accounts": {
                        "main": {
                            "account_sid": ACCOUNT_SID,
                            "auth_token": {"env": "TR_TWILIO_TOKEN"},
                            "numbers": ["+14155550100"],
                        }
                    },
                },
                "sms.vonage": {
                    "api_base_url": vonage_url,
                    "accounts": {
                        "main": {
                            "api_key": "abcd1234",
                            "api_secret": {"env": "TR_VONAGE_SECRET"},
                            "signature_secret": {"env": "TR_VONAGE_SIGNATURE"},
                            "numbers": ["+14155550100"],
                        }
                    },
                },
            },
            "gateway": {
                "host": "127.0.0.1",
                "port": 0,
                "ledger_url": f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}",
                "shutdown_grace": 2.0,
            },
        }
    )


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


async def test_status_callbacks_link_to_the_send_span(tmp_path: Path, vhost_url: str) -> None:
    env = {
        "TR_TWILIO_TOKEN": secrets.token_hex(16),
        "TR_VONAGE_SECRET": secrets.token_hex(16),
        "TR_VONAGE_SIGNATURE": secrets.token_hex(24),
    }
    exporter = InMemorySpanExporter()
    twilio = FakeTwilio(
        auth_token=env["TR_TWILIO_TOKEN"],
        callback_statuses=("sent", "delivered"),
        callback_delay=0.05,
    )
    vonage = FakeVonage(
        api_key="abcd1234",
        api_secret=env["TR_VONAGE_SECRET"],
        signature_secret=env["TR_VONAGE_SIGNATURE"],
        callback_delay=0.05,
    )
    got: dict[str, Any] = {}
    replies: dict[str, Any] = {}
    async with twilio, vonage:
        config = _settings(tmp_path, vhost_url, twilio.url, vonage.url)
        service = Service(config, ["sms.twilio", "sms.vonage"], environ=env)
        gateway = GatewayServer(config)
        await service.start()
        try:
            await gateway.start()
            provider = trace.get_tracer_provider()
            assert isinstance(provider, TracerProvider)
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            async with aio.insecure_channel(gateway.address) as channel:
                stub = GatewayServiceStub(channel)
                for name in ("twilio", "vonage"):
                    request = text_request(f"trace-{name}")
                    request.recipient.CopyFrom(
                        Recipient(
                            address=ChannelIdentity(
                                channel="sms", provider=name, address="+447700900123"
                            )
                        )
                    )
                    reply = await stub.SendMessage(request, timeout=10)
                    replies[name] = reply
                    got[name] = await wait_for_state(
                        stub, reply.message_id, S.DELIVERY_STATE_DELIVERED, timeout=8
                    )
        finally:
            await gateway.stop()
            await service.stop()
        # The URL given to each provider named the send span, and the signed callbacks
        # to those URLs were accepted (every one answered 2xx).
        assert CALLBACK_TRACE_PARAM + "=" in twilio.calls[0].form["StatusCallback"]
        assert all(200 <= status < 300 for _, _, status in twilio.callbacks_sent)
        assert CALLBACK_TRACE_PARAM + "=" in str(vonage.calls[0].body["webhook_url"])
        assert all(200 <= c.http_status < 300 for c in vonage.callbacks_sent)

    spans: list[ReadableSpan] = list(exporter.get_finished_spans())
    for name, status_route in (("twilio", "status"), ("vonage", "messages_status")):
        reply, message = replies[name], got[name]
        sends = [
            s
            for s in spans
            if s.name == f"send sms.{name}"
            and s.attributes is not None
            and s.attributes.get("messaging.message.id") == reply.message_id
        ]
        assert len(sends) == 1
        send = sends[0]
        assert _hex(send.context.trace_id, 32) == reply.trace_id
        webhooks = [s for s in spans if s.name == f"webhook sms.{name} {status_route}"]
        linked = [
            s
            for s in webhooks
            if any(link.context.span_id == send.context.span_id for link in s.links)
        ]
        # One webhook per callback status, each in its own trace, linked to the send span.
        callbacks = 2 if name == "twilio" else len(vonage.callback_statuses)
        assert len(linked) == callbacks
        for span in linked:
            assert span.context.trace_id != send.context.trace_id
            (link,) = span.links
            assert link.context.trace_id == send.context.trace_id
        # Every timeline entry (ACCEPTED by the gateway, QUEUED/ACCEPTED by the
        # connector, the callbacks' statuses) carries the send's trace id.
        transitions = [
            e
            for e in message.timeline
            if e.kind == TimelineEntryKind.TIMELINE_ENTRY_KIND_TRANSITION
        ]
        assert transitions[-1].state == S.DELIVERY_STATE_DELIVERED
        assert len(transitions) >= 3
        assert {e.trace_id for e in message.timeline} == {reply.trace_id}
        # ... and `channel-gateway trace` shows it on each line.
        as_json = json.loads(trace_json(message))
        assert {e["trace_id"] for e in as_json["timeline"]} == {reply.trace_id}
        table = trace_table(message, color=False).splitlines()
        rows = [
            line
            for line in table
            if line.endswith(reply.trace_id) and not line.startswith("trace ")
        ]
        assert len(rows) == len(message.timeline)
