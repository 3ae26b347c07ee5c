"""A voice connector double that implements CallControl, shared by the call-command
tests on the in-memory bus and on the real RabbitMQ."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import BaseModel

from gateway.api.v1.call_pb2 import CallCommand, HangUpCall, PlaceCall
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.connector_pb2 import ConnectorManifest
from gateway.contract import registry
from gateway.contract.connector import (
    CallResult,
    ConnectorContext,
    ConnectorSpec,
    SendResult,
    WebhookRoute,
)
from gateway.contract.errors import PermanentError
from gateway.runtime.config import BrokerSettings, HttpSettings, RuntimeSettings, SendSettings

CHANNEL, PROVIDER = "voice", "fake"
NAME = f"{CHANNEL}.{PROVIDER}"
DEFAULT_ACTIONS = ("place", "hang_up")


class FakeVoiceSettings(BaseModel):
    """The double's (empty) config section."""


class FakeVoice:
    """Call commands follow a script of results and errors; every call is recorded."""

    def __init__(
        self,
        script: Sequence[CallResult | Exception] = (),
        *,
        actions: Sequence[str] = DEFAULT_ACTIONS,
        delay: float = 0.0,
    ) -> None:
        self.manifest = ConnectorManifest(
            channel=CHANNEL, provider=PROVIDER, call_actions=list(actions)
        )
        self.script = list(script)
        self.delay = delay
        self.calls: list[tuple[float, CallCommand]] = []
        #: Set once the first call command reached the provider.
        self.called = asyncio.Event()

    def webhook_routes(self) -> Sequence[WebhookRoute]:
        return ()

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def send(self, command: SendMessageCommand) -> SendResult:
        raise PermanentError("the fake voice connector sends no messages")

    async def call(self, command: CallCommand) -> CallResult:
        self.calls.append((time.monotonic(), command))
        self.called.set()
        if self.delay:
            await asyncio.sleep(self.delay)
        outcome = self.script.pop(0) if self.script else accepted()
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


class NoCallControl(FakeVoice):
    """Lists call actions in its manifest but has no ``call`` method."""

    call = None  # type: ignore[assignment]


def accepted(call_id: str = "CA-1", status: str = "queued") -> CallResult:
    """What a provider answers when it accepts a command."""
    return CallResult(
        call_id=call_id, account="main", provider_status=status, attributes={"price": "0"}
    )


def spec(connector: FakeVoice | None = None) -> ConnectorSpec:
    """A spec whose factory hands out ``connector`` (its manifest is the spec's)."""
    built = connector or FakeVoice()

    def factory(_: ConnectorContext, __: Any) -> FakeVoice:
        return built

    return ConnectorSpec(
        channel=CHANNEL,
        provider=PROVIDER,
        settings=FakeVoiceSettings,
        factory=factory,
        manifest=built.manifest,
    )


def place(command_id: str = "cmd-1", **kw: Any) -> CallCommand:
    """A command placing a call that says a message."""
    command = CallCommand(
        command_id=command_id,
        channel=CHANNEL,
        provider=PROVIDER,
        correlation_id="corr-1",
        conversation_id="conv-1",
        place=PlaceCall(to="+14155550199", say="Your order has shipped."),
        **kw,
    )
    command.metadata["ticket"] = "T-7"
    return command


def hang_up(call_id: str = "CA-9", command_id: str = "cmd-2") -> CallCommand:
    """A command ending a live call."""
    return CallCommand(
        command_id=command_id,
        channel=CHANNEL,
        provider=PROVIDER,
        hang_up=HangUpCall(call_id=call_id),
    )


def in_seconds(seconds: float) -> Timestamp:
    """A timestamp ``seconds`` from now (negative: in the past)."""
    ts = Timestamp()
    ts.FromDatetime(datetime.now(UTC) + timedelta(seconds=seconds))
    return ts


def install(monkeypatch: pytest.MonkeyPatch, specs: list[ConnectorSpec]) -> None:
    """Make the registry (as the service looks connectors up) find ``specs`` by
    name, also those appended to the list later; other names load as usual."""
    real_load = registry.load

    def load(name: str) -> ConnectorSpec:
        return next((s for s in specs if s.name == name), None) or real_load(name)

    monkeypatch.setattr(registry, "load", load)


def runtime(broker_url: str = "memory://") -> RuntimeSettings:
    """Settings hosting the double on a random local port, with fast retries."""
    return RuntimeSettings(
        http=HttpSettings(host="127.0.0.1", port=0),
        broker=BrokerSettings(url=broker_url, publish_timeout=5, connect_timeout=5),
        send=SendSettings(max_attempts=4, initial_backoff=0.0, max_backoff=0.01),
        connectors={NAME: {}},
    )
