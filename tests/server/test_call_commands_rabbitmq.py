"""End to end on the real RabbitMQ (a private vhost): SendCallCommand -> call command
queue -> the voice.twilio service -> the fake Twilio Calls API -> call.command outcome
-> the gateway's ledger -> GetCallCommand."""

from __future__ import annotations

import secrets
from pathlib import Path

import yaml
from grpc import aio

from gateway.api.v1.call_pb2 import CallCommand, HangUpCall, PlaceCall
from gateway.api.v1.gateway_service_pb2 import (
    CallCommandState,
    GetCallCommandRequest,
    SendCallCommandRequest,
)
from gateway.api.v1.gateway_service_pb2_grpc import GatewayServiceStub
from gateway.runtime.config import RuntimeSettings
from gateway.runtime.service import Service
from gateway.server.app import GatewayServer
from gateway.testing.fake_twilio import FakeTwilio
from tests.connectors.voice.test_flow import FLOWS_YAML
from tests.server.test_call_commands import wait_for_call_state

C = CallCommandState
ACCOUNT_SID = "AC" + "e5" * 16
OUR_NUMBER = "+14155550100"
CALLEE = "+447700900123"
TOKEN_ENV = "E2E_TWILIO_VOICE_TOKEN"


def _settings(tmp_path: Path, broker: str, fake_url: str) -> RuntimeSettings:
    return RuntimeSettings.model_validate(
        {
            "http": {"host": "127.0.0.1", "port": 0},
            "broker": {"url": broker, "publish_timeout": 5.0},
            "connectors": {
                "voice.twilio": {
                    "api_base_url": fake_url,
                    "accounts": {
                        "main": {
                            "account_sid": ACCOUNT_SID,
                            "auth_token": {"env": TOKEN_ENV},
                            "caller_number": OUR_NUMBER,
                        }
                    },
                    "call_flows": yaml.safe_load(FLOWS_YAML),
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


async def test_place_and_hang_up_through_the_gateway_over_rabbitmq(
    tmp_path: Path, vhost_url: str
) -> None:
    token = secrets.token_hex(16)
    # The call stays live (no "completed"), so it can be hung up afterwards.
    async with FakeTwilio(
        auth_token=token, call_progress=("initiated", "ringing", "answered"), callback_delay=0.02
    ) as fake:
        config = _settings(tmp_path, vhost_url, fake.url)
        service = Service(config, ["voice.twilio"], environ={TOKEN_ENV: token})
        gateway = GatewayServer(config)
        # The gateway first: its call-command queue holds the command until the
        # voice service consumes it.
        await gateway.start()
        try:
            async with aio.insecure_channel(gateway.address) as channel:
                stub = GatewayServiceStub(channel)
                place = SendCallCommandRequest(
                    idempotency_key="e2e-place",
                    command=CallCommand(
                        provider="twilio",
                        correlation_id="ticket-42",
                        place=PlaceCall(to="+44 7700 900123", say="Your order has shipped."),
                    ),
                )
                placed = await stub.SendCallCommand(place, timeout=10)
                assert placed.created
                await service.start()
                got = await wait_for_call_state(
                    stub, placed.command_id, C.CALL_COMMAND_STATE_ACCEPTED, timeout=10
                )
                # A repeated request: the same command, not a second call.
                again = await stub.SendCallCommand(place, timeout=10)

                hang_up = SendCallCommandRequest(
                    idempotency_key="e2e-hang-up",
                    command=CallCommand(hang_up=HangUpCall(call_id=got.call_id)),
                )
                ended = await stub.SendCallCommand(hang_up, timeout=10)
                hung = await wait_for_call_state(
                    stub, ended.command_id, C.CALL_COMMAND_STATE_ACCEPTED, timeout=10
                )
                reread = (
                    await stub.GetCallCommand(
                        GetCallCommandRequest(command_id=placed.command_id), timeout=5
                    )
                ).call_command
        finally:
            await gateway.stop()
            await service.stop()

    # The outcome carries the Twilio call sid of the one call the fake placed.
    assert list(fake.placed) == [got.call_id]
    call = fake.placed[got.call_id]
    assert (call.to, call.sender) == (CALLEE, OUR_NUMBER)
    assert "Your order has shipped." in call.twiml
    assert got.provider_status == "queued"
    assert (got.account, got.action, got.correlation_id) == ("main", "place", "ticket-42")
    assert got.dispatched
    assert got.HasField("completed_at")
    assert (again.command_id, again.created, again.state) == (
        placed.command_id,
        False,
        C.CALL_COMMAND_STATE_ACCEPTED,
    )
    assert reread == got
    # The hang-up reached Twilio as a Status=completed update of that call.
    assert hung.call_id == got.call_id
    updates = [r for r in fake.call_requests if r.call_sid == got.call_id]
    assert [r.form.get("Status") for r in updates] == ["completed"]
