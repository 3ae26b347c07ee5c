"""The voice connector conformance suite: behaviour every voice connector must show.

Voice connectors do not fit :class:`~gateway.testing.conformance.ConnectorConformance`:
an answer webhook (the provider asking what a call should do) is answered with
a call-flow document even when the broker is down, their events are
:class:`~gateway.api.v1.call_pb2.CallEvent` s (``call.<state>.voice.<provider>``),
and outbound work is a :class:`~gateway.api.v1.call_pb2.CallCommand` executed
through ``CallControl.call`` by the runtime's
:class:`~gateway.runtime.outbound.CallCommandWorker`, which publishes one
``call.command`` outcome event per command.

A voice connector's tests subclass :class:`VoiceConnectorConformance` and
provide a small adapter (config, a signed answer webhook, a signed call-status
callback for a given state, forgeries, the fake provider API and how to read
the requests it recorded); every ``test_*`` method then runs against that
connector in the runtime's real :class:`~gateway.runtime.service.Service`
over real HTTP, with the durable spool enabled (as voice deployments run):

- answer webhooks: a valid one is answered with the flow's document (TwiML,
  NCCO ...) and publishes the call's CallEvent, a repeated one is answered
  again and is one event; every forgery is a 401/403 and publishes nothing;
- status callbacks: a repeated one is one event; shuffled and duplicated
  lifecycles fold (:func:`connectors.voice.lifecycle.fold`) to the right
  final state, one event per state;
- outages: with the broker refusing publishes the answer webhook still answers
  2xx with the flow and its event is spooled, then published once when the
  broker is back; a status callback in the outage is spooled (2xx) or refused
  (503), never 2xx-and-lost; with a stuck broker the answer still comes while
  a status callback waits for its confirm; without a spool an unconfirmed
  answer event is retried, not lost; on the real RabbitMQ behind a cut TCP
  proxy, the same, with the events on the broker once it is back;
- call commands through the runtime worker: place, transfer and hang up are
  accepted with the provider's call id; 429 then success, bounded server
  errors, a hang after the create was sent (ambiguous, never placed again), a
  command interrupted mid-call, a redelivered command, an expired command and
  a hang up or transfer of an unknown call, each with exact provider request
  counts and exactly one outcome; a placed call's progress arrives as outbound
  CallEvents and a hang up completes it; on the real RabbitMQ a command routes
  to the connector's call queue, and its outcome and the call's events come back;
- the manifest: every event type emitted is declared, and ``call_actions``
  implies ``CallControl`` and the ``call.command`` event type.

A new voice provider is done when its subclass passes this suite unchanged::

    class TestTwilioVoiceConformance(VoiceConnectorConformance):
        connector = "voice.twilio"
        answer_content_type = "text/xml"
        start_actions = ("Say", "Play", "Gather")
        def connector_settings(self, api_base_url): ...
        ...

The checks that claim broker behaviour run on the real RabbitMQ, each in a
private vhost: the subclass's module makes the ``vhost`` fixture of
``tests/integration/conftest.py`` available (``from tests.integration.conftest
import vhost``); they fail, never skip, when the broker is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import aio_pika
import pytest
from yarl import URL

from connectors.voice import lifecycle
from gateway.api.v1.call_pb2 import (
    CallCommand,
    CallCommandOutcome,
    CallState,
    HangUpCall,
    PlaceCall,
    TransferCall,
)
from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.message_pb2 import Direction
from gateway.contract import registry
from gateway.contract.connector import CallControl
from gateway.contract.errors import AmbiguousSendError
from gateway.runtime.bus import Bus
from gateway.runtime.codec import encode_call_command
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.outbound import CALL_COMMAND_EVENT_TYPE
from gateway.runtime.topology import COMMANDS_EXCHANGE, EVENTS_EXCHANGE
from gateway.testing.conformance import (
    EVENT_TIMEOUT,
    SEND_SETTINGS,
    SETTLE,
    FakeProvider,
    FlakyBus,
    GatedBus,
    Harness,
    TcpProxy,
    WebhookCall,
    check_manifest,
    serve,
)

C = CallState
Outcome = CallCommandOutcome

#: Call lifecycles the status checks play, each in the order a provider
#: produces it; the last state is where the call ends.
LIFECYCLES: tuple[tuple[CallState.ValueType, ...], ...] = (
    (C.CALL_STATE_INITIATED, C.CALL_STATE_RINGING, C.CALL_STATE_ANSWERED, C.CALL_STATE_COMPLETED),
    (C.CALL_STATE_INITIATED, C.CALL_STATE_RINGING, C.CALL_STATE_NO_ANSWER),
    (C.CALL_STATE_INITIATED, C.CALL_STATE_RINGING, C.CALL_STATE_BUSY),
)

#: Spool settings of the suite's services: fast replay so outage checks are quick.
SPOOL_SETTINGS: dict[str, Any] = {"enabled": True, "initial_backoff": 0.05, "max_backoff": 0.2}

#: The actions a CallCommand can name (its ``action`` oneof).
CALL_ACTIONS = frozenset(f.name for f in CallCommand.DESCRIPTOR.oneofs_by_name["action"].fields)

#: The callee and transfer target of the default commands (reserved fictional numbers).
CALLEE = "+447700900123"
TRANSFER_TARGET = "+447700900456"


class BrokerVhost(Protocol):
    """A private virtual host on the real RabbitMQ (the ``vhost`` fixture of
    ``tests/integration/conftest.py``): the suite's RabbitMQ checks own their
    queues there, so other services on the shared broker neither take their
    commands nor add to their events."""

    @property
    def url(self) -> str:
        """The AMQP URL of the vhost."""


@dataclass(frozen=True, kw_only=True)
class ProviderCallRequest:
    """One request the fake provider's call API received (as the adapter reads it)."""

    #: ``create``: a call was placed; ``update``: a live call was changed
    #: (transferred, redirected, hung up ...).
    kind: Literal["create", "update"]
    #: The call an update names ("" for a create).
    call_id: str = ""


# -- helpers over the messaging suite's Harness -------------------------------------------


async def request(h: Harness, call: WebhookCall) -> tuple[int, str, bytes]:
    """Send ``call`` to the service; (HTTP status, content type, body)."""
    async with h.http.request(
        call.method, call.url, headers=dict(call.headers), data=call.body
    ) as resp:
        return resp.status, resp.content_type, await resp.read()


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Wait until ``condition()`` holds (fails the test after the suite's timeout)."""
    deadline = asyncio.get_running_loop().time() + EVENT_TIMEOUT
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def of_call(call_id: str) -> Callable[[Event], bool]:
    """Predicate: a CallEvent of the call ``call_id``."""
    return lambda e: e.HasField("call") and e.call.call_id == call_id


def outcome_of(command_id: str) -> Callable[[Event], bool]:
    """Predicate: the ``call.command`` outcome of the command ``command_id``."""
    return lambda e: e.type == CALL_COMMAND_EVENT_TYPE and e.causation_id == command_id


def _ok(status: int) -> bool:
    return 200 <= status < 300


# -- the suite ----------------------------------------------------------------------------


class VoiceConnectorConformance:
    """Behaviour tests every voice connector inherits. Subclass, name it
    ``Test...``, set the class attributes and implement the adapter methods."""

    #: Registry name of the connector under test, e.g. ``"voice.twilio"``.
    connector: ClassVar[str]
    #: Content type of an answer webhook's document (``text/xml`` for TwiML,
    #: ``application/json`` for NCCO).
    answer_content_type: ClassVar[str]
    #: What :meth:`document_actions` returns for the called number's flow start step.
    start_actions: ClassVar[Sequence[str]]

    # -- adapter: the subclass implements these ------------------------------------------------

    def connector_settings(self, api_base_url: str) -> dict[str, Any]:
        """The connector's config section (call flows included), calling the
        fake at ``api_base_url``; secrets as ``{env: NAME}`` from :meth:`environ`."""
        raise NotImplementedError

    def environ(self) -> dict[str, str]:
        """Environment the config's secret references resolve from."""
        raise NotImplementedError

    def fake_provider(self) -> FakeProvider:
        """A new, unstarted fake of the provider's call API: creating and
        updating calls succeed, and a placed call reports its progress (at
        least up to answered, then completed once hung up) to the status
        callback URL the connector gave it; ``rate_limit_next``,
        ``server_error_next`` and ``hang_next`` (answer late, after the call
        was created) script the next answer; an update of a call it never
        created is its 404."""
        raise NotImplementedError

    def provider_requests(self, provider: FakeProvider) -> Sequence[ProviderCallRequest]:
        """Every call-API request ``provider`` received so far, in order."""
        raise NotImplementedError

    def placed_calls(self, provider: FakeProvider) -> Collection[str]:
        """Ids of the calls ``provider`` created."""
        raise NotImplementedError

    def new_call_id(self) -> str:
        """A fresh, well-formed provider call id."""
        raise NotImplementedError

    def answer_webhook(self, base_url: str, call_id: str) -> WebhookCall:
        """The validly signed answer webhook of a new inbound call to the
        number the configured flow answers."""
        raise NotImplementedError

    def document_actions(self, body: bytes) -> list[str]:
        """The verbs/actions of an answer document, checked against the
        provider's schema (raise AssertionError when it is not valid)."""
        raise NotImplementedError

    def status_callback(
        self, base_url: str, call_id: str, state: CallState.ValueType
    ) -> WebhookCall:
        """A validly signed call-status callback reporting ``state`` for the
        inbound call ``call_id`` (states: those of :data:`LIFECYCLES`)."""
        raise NotImplementedError

    def forgeries(self, base_url: str, call_id: str) -> Sequence[WebhookCall]:
        """Answer webhooks and status callbacks for ``call_id`` that must be
        refused (each with a description): wrong secret, missing or malformed
        signature, tampered body, stale token, unknown account ..."""
        raise NotImplementedError

    # -- adapter defaults (override when the provider needs other values) ----------------------

    def place_call(self) -> PlaceCall:
        """A valid ``place`` action."""
        return PlaceCall(to=CALLEE, say="Your order has shipped.")

    def unknown_call_id(self) -> str:
        """A well-formed id of a call the provider does not know."""
        return self.new_call_id()

    # -- harness -------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(
        self,
        *,
        bus: Bus | None = None,
        broker_url: str = "memory://",
        spool: bool = True,
        collect: bool = True,
    ) -> AsyncIterator[Harness]:
        """The connector in a started service with the durable spool in a
        temporary directory (unless ``spool`` is False), in-memory bus unless told otherwise."""
        with tempfile.TemporaryDirectory(prefix="voice-conformance-") as state_dir:
            extra = {"spool": {**SPOOL_SETTINGS, "path": str(Path(state_dir) / "voice.sqlite")}}
            async with serve(
                self.connector,
                self.fake_provider(),
                self.connector_settings,
                environ=self.environ(),
                bus=bus,
                broker_url=broker_url,
                collect=collect,
                extra_settings=extra if spool else None,
            ) as harness:
                yield harness

    def command(self, **action: Any) -> CallCommand:
        """A new call command for this connector with one action (``place=...``)."""
        channel, provider = self.connector.split(".", 1)
        return CallCommand(
            command_id=str(uuid.uuid4()), channel=channel, provider=provider, **action
        )

    async def execute(self, h: Harness, command: CallCommand, outcomes: int = 1) -> list[Event]:
        """Publish ``command`` on ``channels.commands`` as a downstream service
        does, and return its ``call.command`` outcome events (at least ``outcomes``)."""
        routing_key, message = encode_call_command(command)
        await h.bus.publish(COMMANDS_EXCHANGE, routing_key, message, timeout=5.0)
        return await h.wait_for(outcome_of(command.command_id), outcomes)

    def creates(self, h: Harness) -> list[ProviderCallRequest]:
        """The create-call requests the fake received."""
        return [r for r in self.provider_requests(h.provider) if r.kind == "create"]

    def updates(self, h: Harness, call_id: str) -> list[ProviderCallRequest]:
        """The update requests the fake received for ``call_id``."""
        return [
            r
            for r in self.provider_requests(h.provider)
            if r.kind == "update" and r.call_id == call_id
        ]

    def check_answer(self, status: int, content_type: str, body: bytes) -> None:
        """An answer webhook's response is the flow's start document."""
        assert _ok(status), f"answer webhook: HTTP {status} {body!r}"
        assert content_type == self.answer_content_type, content_type
        assert self.document_actions(body) == list(self.start_actions)

    def check_answer_event(self, event: Event, call_id: str) -> None:
        """The event of an answer webhook is the call's CallEvent, from this connector."""
        assert (event.channel, event.provider) == tuple(self.connector.split(".", 1))
        assert event.WhichOneof("payload") == "call"
        assert event.call.call_id == call_id
        assert event.call.state in lifecycle.STATE_WORDS, C.Name(event.call.state)
        assert event.type == f"call.{lifecycle.STATE_WORDS[event.call.state]}"
        assert event.call.flow_step, "an answer event names the flow step it answered"

    # -- answer webhooks and signatures --------------------------------------------------------

    async def test_answer_webhook_answers_the_flow_and_publishes_the_call_event(self) -> None:
        async with self.running() as h:
            call_id = self.new_call_id()
            self.check_answer(*await request(h, self.answer_webhook(h.base_url, call_id)))
            (event,) = await h.wait_for(of_call(call_id), 1)
            self.check_answer_event(event, call_id)
            assert [e.id for e in h.events] == [event.id], "the answer published something else"

    async def test_repeated_answer_webhook_is_answered_again_and_is_one_event(self) -> None:
        async with self.running() as h:
            call_id = self.new_call_id()
            answer = self.answer_webhook(h.base_url, call_id)
            # A provider retrying its answer webhook still gets the flow each time.
            for _ in range(2):
                self.check_answer(*await request(h, answer))
            for status, content_type, body in await asyncio.gather(
                *(request(h, answer) for _ in range(3))
            ):
                self.check_answer(status, content_type, body)
            (event,) = await h.wait_for(of_call(call_id), 1)
            self.check_answer_event(event, call_id)

    async def test_every_forgery_is_refused_and_publishes_nothing(self) -> None:
        async with self.running() as h:
            call_id = self.new_call_id()
            forgeries = list(self.forgeries(h.base_url, call_id))
            assert len(forgeries) >= 5, "a rejection matrix needs several forgeries"
            paths = {URL(f.url).path for f in forgeries}
            answer_path = URL(self.answer_webhook(h.base_url, call_id).url).path
            status_path = URL(self.status_callback(h.base_url, call_id, LIFECYCLES[0][0]).url).path
            assert answer_path in paths, "forge the answer webhook"
            assert status_path in paths, "forge the status callback"
            for forged in forgeries:
                assert forged.description, "describe what each forgery changes"
                status, _, body = await request(h, forged)
                assert status in (401, 403), f"{forged.description}: HTTP {status} {body!r}"
            await asyncio.sleep(SETTLE)
            assert h.events == [], "a forgery was published"
            # The valid originals are still accepted afterwards: nothing was claimed.
            self.check_answer(*await request(h, self.answer_webhook(h.base_url, call_id)))
            status, _, _ = await request(
                h, self.status_callback(h.base_url, call_id, C.CALL_STATE_COMPLETED)
            )
            assert _ok(status)
            events = await h.wait_for(lambda e: True, 2)
            assert len(events) == 2, "a forgery was published"

    # -- status callbacks ----------------------------------------------------------------------

    async def test_repeated_status_callback_is_one_event(self) -> None:
        async with self.running() as h:
            call_id = self.new_call_id()
            callback = self.status_callback(h.base_url, call_id, C.CALL_STATE_RINGING)
            for _ in range(3):
                status, _, _ = await request(h, callback)
                assert _ok(status)  # a duplicate is acknowledged, not refused
            concurrent = await asyncio.gather(*(request(h, callback) for _ in range(4)))
            assert all(_ok(status) for status, _, _ in concurrent), concurrent
            (event,) = await h.wait_for(of_call(call_id), 1)
            assert event.call.state == C.CALL_STATE_RINGING
            assert event.type == "call.ringing"

    async def test_shuffled_duplicated_lifecycle_folds_to_the_final_state(self) -> None:
        async with self.running() as h:
            rng = random.Random(6)
            for states in LIFECYCLES:
                for ordering in ("reversed", "shuffled"):
                    call_id = self.new_call_id()
                    calls = [self.status_callback(h.base_url, call_id, s) for s in states]
                    # Every callback once, plus provider retries of some of them.
                    played = (calls[::-1] if ordering == "reversed" else calls) + rng.choices(
                        calls, k=len(calls)
                    )
                    if ordering == "shuffled":
                        rng.shuffle(played)
                    for call in played:
                        status, _, body = await request(h, call)
                        assert _ok(status), f"{call.description}: HTTP {status} {body!r}"
                    events = await h.wait_for(of_call(call_id), len(states))
                    where = f"{ordering} {[C.Name(s) for s in states]}"
                    assert len(events) == len(states), f"{where}: lost or duplicated events"
                    assert sorted(e.call.state for e in events) == sorted(states), where
                    for event in events:
                        assert event.type == f"call.{lifecycle.STATE_WORDS[event.call.state]}"
                    # Folded as they arrived (any order), the call ends where it ended.
                    assert lifecycle.fold(events) == states[-1], where
                    assert lifecycle.fold(reversed(events)) == states[-1], where

    # -- broker outages ------------------------------------------------------------------------

    async def test_broker_outage_answer_still_answers_and_nothing_is_lost(self) -> None:
        spec = registry.load(self.connector)
        assert spec.spool_on_outage, (
            "a voice connector's spec sets spool_on_outage: answered calls cannot wait for "
            "the broker, and their events must survive the outage"
        )
        async with self.running() as h:
            bus, spool = h.bus, h.service.spool
            assert isinstance(bus, InMemoryBus)
            assert spool is not None
            bus.available = False  # the broker refuses every publish
            call_id = self.new_call_id()
            self.check_answer(*await request(h, self.answer_webhook(h.base_url, call_id)))
            callback = self.status_callback(h.base_url, call_id, C.CALL_STATE_COMPLETED)
            callback_status, _, body = await request(h, callback)
            assert _ok(callback_status) or callback_status == 503, (
                f"a status callback in an outage is spooled (2xx) or refused (503), "
                f"got HTTP {callback_status} {body!r}"
            )
            # The answer's event reaches the durable spool during the outage (and a
            # 2xx status callback was spooled before its 2xx).
            held = 2 if _ok(callback_status) else 1
            await eventually(lambda: spool.stats.events >= held, f"{held} spooled event(s)")
            assert spool.stats.events == held
            assert h.events == [], "published while the broker was down"
            bus.available = True  # the broker is back: the spool drains
            if not _ok(callback_status):
                status, _, _ = await request(h, callback)  # the provider's retry
                assert _ok(status)
            events = await h.wait_for(of_call(call_id), 2)
            assert len(events) == 2, "an event was lost or published twice"
            assert sorted(e.call.state for e in events)[-1] == C.CALL_STATE_COMPLETED
            await eventually(lambda: spool.stats.events == 0, "the spool to drain")
            assert lifecycle.fold(events) == C.CALL_STATE_COMPLETED

    async def test_stuck_broker_answer_comes_and_status_callback_waits_for_its_confirm(
        self,
    ) -> None:
        bus = GatedBus()
        async with self.running(bus=bus) as h:
            call_id = self.new_call_id()
            # The publish never confirms until the gate opens: the call is answered anyway.
            self.check_answer(*await request(h, self.answer_webhook(h.base_url, call_id)))
            assert bus.entered.is_set()
            callback = asyncio.create_task(
                request(h, self.status_callback(h.base_url, call_id, C.CALL_STATE_COMPLETED))
            )
            await asyncio.sleep(0.2)
            assert not callback.done(), "a status callback answered before its event was confirmed"
            bus.gate.set()
            status, _, _ = await callback
            assert _ok(status)
            events = await h.wait_for(of_call(call_id), 2)
            assert len(events) == 2

    async def test_unconfirmed_answer_event_without_a_spool_is_retried_not_lost(self) -> None:
        bus = FlakyBus(failures=1)
        async with self.running(bus=bus, spool=False) as h:
            call_id = self.new_call_id()
            self.check_answer(*await request(h, self.answer_webhook(h.base_url, call_id)))
            (event,) = await h.wait_for(of_call(call_id), 1)
            self.check_answer_event(event, call_id)
            # A status callback needs its confirm: refused, then the provider's retry lands.
            bus.failures = 1
            callback = self.status_callback(h.base_url, call_id, C.CALL_STATE_COMPLETED)
            status, _, _ = await request(h, callback)
            assert status == 503
            status, _, _ = await request(h, callback)
            assert _ok(status)
            events = await h.wait_for(of_call(call_id), 2)
            assert len(events) == 2

    # -- call commands through the runtime worker ----------------------------------------------

    async def test_place_is_one_provider_call_and_one_accepted_outcome(self) -> None:
        async with self.running() as h:
            command = self.command(place=self.place_call())
            command.correlation_id = "ticket-7"
            command.metadata["agent"] = "a-17"
            (outcome,) = await self.execute(h, command)
            assert len(self.creates(h)) == 1
            result = outcome.call_command
            assert result.outcome == Outcome.CALL_COMMAND_OUTCOME_ACCEPTED, result
            assert (result.command_id, result.action) == (command.command_id, "place")
            assert result.call_id, "the outcome names the placed call"
            assert set(self.placed_calls(h.provider)) == {result.call_id}
            assert outcome.correlation_id == "ticket-7"
            assert outcome.attributes["agent"] == "a-17"
            assert outcome.account, "the outcome names the account that acted"

    async def test_transfer_and_hang_up_of_a_placed_call_are_accepted(self) -> None:
        async with self.running() as h:
            (placed,) = await self.execute(h, self.command(place=self.place_call()))
            call_id = placed.call_command.call_id
            transfer = self.command(transfer=TransferCall(call_id=call_id, to=TRANSFER_TARGET))
            (moved,) = await self.execute(h, transfer)
            assert moved.call_command.outcome == Outcome.CALL_COMMAND_OUTCOME_ACCEPTED, moved
            assert moved.call_command.call_id == call_id
            assert len(self.updates(h, call_id)) == 1
            (ended,) = await self.execute(h, self.command(hang_up=HangUpCall(call_id=call_id)))
            assert ended.call_command.outcome == Outcome.CALL_COMMAND_OUTCOME_ACCEPTED, ended
            assert ended.call_command.call_id == call_id
            assert len(self.updates(h, call_id)) == 2
            assert len(self.creates(h)) == 1

    async def test_placed_call_reports_its_lifecycle_and_hang_up_completes_it(self) -> None:
        async with self.running() as h:
            place = self.place_call()
            (placed,) = await self.execute(h, self.command(place=place))
            call_id = placed.call_command.call_id
            # The provider reports the placed call's progress to the connector's routes.
            await h.wait_for(
                lambda e: of_call(call_id)(e) and e.call.state == C.CALL_STATE_ANSWERED, 1
            )
            (ended,) = await self.execute(h, self.command(hang_up=HangUpCall(call_id=call_id)))
            assert ended.call_command.outcome == Outcome.CALL_COMMAND_OUTCOME_ACCEPTED, ended
            await h.wait_for(
                lambda e: of_call(call_id)(e) and e.call.state == C.CALL_STATE_COMPLETED, 1
            )
            events = [e for e in h.events if of_call(call_id)(e)]
            assert len({e.id for e in events}) == len(events), "a call event arrived twice"
            for event in events:
                assert event.call.direction == Direction.DIRECTION_OUTBOUND, event.call
                assert event.call.to == place.to, event.call
            assert lifecycle.fold(events) == C.CALL_STATE_COMPLETED

    async def test_rate_limited_place_is_two_calls_one_outcome(self) -> None:
        async with self.running() as h:
            h.provider.rate_limit_next(retry_after=1)
            (outcome,) = await self.execute(h, self.command(place=self.place_call()))
            assert len(self.creates(h)) == 2
            assert outcome.call_command.outcome == Outcome.CALL_COMMAND_OUTCOME_ACCEPTED, outcome
            assert set(self.placed_calls(h.provider)) == {outcome.call_command.call_id}

    async def test_server_errors_are_bounded_then_one_failed(self) -> None:
        async with self.running() as h:
            for _ in range(SEND_SETTINGS["max_attempts"] + 2):
                h.provider.server_error_next(503)
            (outcome,) = await self.execute(h, self.command(place=self.place_call()))
            assert len(self.creates(h)) == SEND_SETTINGS["max_attempts"]
            result = outcome.call_command
            assert result.outcome == Outcome.CALL_COMMAND_OUTCOME_FAILED, result
            assert not result.permanent
            assert result.reason_code
            assert not self.placed_calls(h.provider)

    async def test_hang_after_the_create_was_sent_is_ambiguous_and_never_placed_again(
        self,
    ) -> None:
        async with self.running() as h:
            # The provider creates the call but its answer comes after our timeout.
            h.provider.hang_next(SEND_SETTINGS["provider_timeout"] * 3)
            command = self.command(place=self.place_call())
            (outcome,) = await self.execute(h, command)
            result = outcome.call_command
            assert len(self.creates(h)) == 1, "an ambiguous create was retried"
            assert result.outcome == Outcome.CALL_COMMAND_OUTCOME_FAILED, result
            assert result.reason_code == AmbiguousSendError.code
            assert not result.permanent
            # Redelivered (a consumer crash after the outcome): the same outcome, no new call.
            again = await self.execute(h, command, outcomes=2)
            assert {e.id for e in again} == {outcome.id}
            assert len(self.creates(h)) == 1, "an ambiguous place was placed again"

    async def test_command_interrupted_mid_call_is_ambiguous_without_a_provider_call(
        self,
    ) -> None:
        async with self.running() as h:
            command = self.command(place=self.place_call())
            # A worker claimed the command and died mid-call (no outcome, no live
            # lease): the ledger key of the runtime's CallCommandWorker.
            await h.service.store.claim(f"call:{self.connector}:{command.command_id}", ttl=60)
            (outcome,) = await self.execute(h, command)
            assert outcome.call_command.outcome == Outcome.CALL_COMMAND_OUTCOME_FAILED
            assert outcome.call_command.reason_code == AmbiguousSendError.code
            assert self.creates(h) == [], "a possibly placed call was placed again"

    async def test_redelivered_command_is_not_executed_twice(self) -> None:
        async with self.running() as h:
            command = self.command(place=self.place_call())
            (first,) = await self.execute(h, command)
            again = await self.execute(h, command, outcomes=2)
            assert len(self.creates(h)) == 1
            assert {e.id for e in again} == {first.id}, "a redelivery produced another outcome"
            assert len({e.call_command.call_id for e in again}) == 1

    async def test_expired_command_is_not_executed(self) -> None:
        async with self.running() as h:
            command = self.command(place=self.place_call())
            command.expires_at.FromDatetime(datetime.now(UTC) - timedelta(seconds=1))
            (outcome,) = await self.execute(h, command)
            assert outcome.call_command.outcome == Outcome.CALL_COMMAND_OUTCOME_EXPIRED
            assert outcome.call_command.permanent
            assert self.provider_requests(h.provider) == []

    async def test_control_of_an_unknown_call_is_permanent_call_not_found(self) -> None:
        async with self.running() as h:
            for action in (
                {"hang_up": HangUpCall(call_id=self.unknown_call_id())},
                {"transfer": TransferCall(call_id=self.unknown_call_id(), to=TRANSFER_TARGET)},
            ):
                command = self.command(**action)
                (outcome,) = await self.execute(h, command)
                result = outcome.call_command
                call_id = getattr(command, result.action).call_id
                assert result.outcome == Outcome.CALL_COMMAND_OUTCOME_FAILED, result
                assert result.permanent, result
                assert result.reason_code == "call_not_found", result
                assert result.call_id == call_id
                # Asked once: a 404 is not retried.
                assert self.updates(h, call_id) == [
                    ProviderCallRequest(kind="update", call_id=call_id)
                ]
            assert self.creates(h) == []

    # -- the manifest --------------------------------------------------------------------------

    async def test_manifest_declares_everything_the_connector_emits(self) -> None:
        spec = registry.load(self.connector)
        manifest = spec.manifest
        assert f"{manifest.channel}.{manifest.provider}" == self.connector
        assert manifest.api_version, "the manifest names the provider API version"
        assert manifest.docs_url, "the manifest links the provider's docs"
        unknown = set(manifest.call_actions) - CALL_ACTIONS
        assert not unknown, f"call_actions names no CallCommand action: {sorted(unknown)}"
        if manifest.call_actions:
            assert CALL_COMMAND_EVENT_TYPE in manifest.event_types, (
                "a connector with call_actions declares the runtime's call.command outcome"
            )
        async with self.running() as h:
            (hosted,) = h.service.hosted
            assert hosted.connector.manifest == manifest
            if manifest.call_actions:
                assert isinstance(hosted.connector, CallControl), (
                    "call_actions is non-empty but the connector does not implement CallControl"
                )
                assert hosted.call_worker is not None
            # Everything the suite makes the connector emit, in one service.
            base, call_id = h.base_url, self.new_call_id()
            await request(h, self.answer_webhook(base, call_id))
            for state in LIFECYCLES[0]:
                await request(h, self.status_callback(base, call_id, state))
            if manifest.call_actions:
                (placed,) = await self.execute(h, self.command(place=self.place_call()))
                await self.execute(
                    h, self.command(hang_up=HangUpCall(call_id=placed.call_command.call_id))
                )
                await self.execute(h, self.command(hang_up=HangUpCall(call_id=call_id)))
            await h.wait_for(of_call(call_id), len(LIFECYCLES[0]))
            seen = {e.type for e in h.events}
            assert seen <= set(manifest.event_types), sorted(seen - set(manifest.event_types))
            for event in h.events:
                assert check_manifest(manifest, event) == []
                if event.HasField("call") and event.call.state in lifecycle.STATE_WORDS:
                    assert event.type == f"call.{lifecycle.STATE_WORDS[event.call.state]}"

    # -- on the real RabbitMQ ------------------------------------------------------------------

    @pytest.mark.rabbitmq
    async def test_rabbitmq_call_command_round_trip(self, vhost: BrokerVhost) -> None:
        async with self.running(broker_url=vhost.url) as h:
            # Published confirmed and mandatory: routed to the connector's call queue.
            command = self.command(place=self.place_call())
            (outcome,) = await self.execute(h, command)
            result = outcome.call_command
            assert result.outcome == Outcome.CALL_COMMAND_OUTCOME_ACCEPTED, result
            assert set(self.placed_calls(h.provider)) == {result.call_id}
            # The placed call's progress comes back through the broker too.
            await h.wait_for(
                lambda e: of_call(result.call_id)(e) and e.call.state == C.CALL_STATE_ANSWERED, 1
            )
            # The same command delivered again: its recorded outcome, no second call.
            again = await self.execute(h, command, outcomes=2)
            assert {e.id for e in again} == {outcome.id}
            assert len(self.creates(h)) == 1

    @pytest.mark.rabbitmq
    async def test_rabbitmq_outage_answer_still_answers_and_events_arrive_once(
        self, vhost: BrokerVhost
    ) -> None:
        # Our own connection straight to the broker: the service's goes through the proxy.
        connection = await aio_pika.connect(vhost.url, timeout=5)
        try:
            channel = await connection.channel()
            parts = URL(vhost.url)
            async with TcpProxy(parts.host or "127.0.0.1", parts.port or 5672) as proxy:
                proxied = str(parts.with_port(proxy.port))
                async with self.running(broker_url=proxied, collect=False) as h:
                    # The service declared the topology in the fresh vhost.
                    queue = await channel.declare_queue(exclusive=True)
                    await queue.bind(EVENTS_EXCHANGE, routing_key=f"#.{self.connector}")
                    spool = h.service.spool
                    assert spool is not None
                    call_id = self.new_call_id()
                    await proxy.cut()  # the broker goes away
                    self.check_answer(*await request(h, self.answer_webhook(h.base_url, call_id)))
                    callback = self.status_callback(h.base_url, call_id, C.CALL_STATE_COMPLETED)
                    status, _, body = await request(h, callback)
                    assert _ok(status) or status == 503, f"HTTP {status} {body!r}"
                    held = 2 if _ok(status) else 1
                    await eventually(lambda: spool.stats.events >= held, "the spooled events")
                    left = await queue.get(fail=False, no_ack=True)
                    assert left is None, "published in an outage"
                    await proxy.resume()  # the broker is back: the bus reconnects, the spool drains
                    if not _ok(status):
                        await eventually(h.bus.is_ready, "the bus to reconnect")
                        status, _, _ = await request(h, callback)  # the provider's retry
                        assert _ok(status)
                    await eventually(lambda: spool.stats.events == 0, "the spool to drain")
                    await asyncio.sleep(SETTLE)
                    events = await _drain_events(queue)
            assert sorted(e.call.call_id for e in events) == [call_id, call_id], events
            assert len({e.id for e in events}) == 2, "an event arrived twice"
            assert lifecycle.fold(events) == C.CALL_STATE_COMPLETED
        finally:
            await connection.close()


async def _drain_events(queue: aio_pika.abc.AbstractQueue) -> list[Event]:
    """Every event left in ``queue``, decoded."""
    events = []
    while (message := await queue.get(fail=False, no_ack=True)) is not None:
        event = Event()
        event.ParseFromString(message.body)
        events.append(event)
    return events


__all__ = [
    "CALL_ACTIONS",
    "LIFECYCLES",
    "ProviderCallRequest",
    "VoiceConnectorConformance",
    "eventually",
    "of_call",
    "outcome_of",
    "request",
]
