"""The connector conformance suite: behaviour every connector must show, written once.

A connector's tests subclass :class:`ConnectorConformance` and provide a small
adapter (how to configure the connector, sign a webhook, forge one, play a
status sequence, and which fake provider API to call); every ``test_*`` method
here then runs against that connector, through the runtime's real
:class:`~gateway.runtime.service.Service` over real HTTP:

- signature rejection matrix: every forgery is a 401/403, never a 500, and
  publishes nothing;
- dedup: one provider message delivered twice, or concurrently, is one event;
- confirmed publish before 2xx: the answer waits for the bus; an unroutable or
  failed publish (in-memory bus) and a broker outage (real RabbitMQ behind a
  TCP proxy) are a 503 with nothing acked, and the provider's retry is
  accepted afterwards;
- batch completeness: every item of a batched payload is emitted, and a retry
  after a partial failure re-emits only what is missing;
- monotonic statuses: status callbacks in any order fold (with
  :func:`gateway.contract.status.fold`) to the state of the true order;
- send retry semantics: 429 with Retry-After, 5xx, 4xx, a hang, a redelivered
  command, each with exact provider call counts and one terminal status;
- manifest honesty: every event seen during the suite has a type, content case
  and delivery state its manifest declares.

A new provider is done when its subclass passes this suite unchanged::

    class TestTwilioConformance(ConnectorConformance):
        connector = "sms.twilio"
        def connector_settings(self, api_base_url): ...
        ...

The RabbitMQ checks need the ``rabbitmq_url`` and ``redis_url`` fixtures of
the test tree's ``conftest.py`` (they fail, never skip, when a broker is down).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, ClassVar, Protocol, Self

import aio_pika
import aiohttp
import pytest
from yarl import URL

from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.connector_pb2 import ConnectorManifest
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.envelope_pb2 import Event
from gateway.contract import registry
from gateway.contract.status import advance, fold
from gateway.runtime.bus import (
    Bus,
    Delivery,
    OutgoingMessage,
    PublishTimeoutError,
    Subscription,
)
from gateway.runtime.codec import decode_event, encode_command
from gateway.runtime.config import RuntimeSettings
from gateway.runtime.idempotency import IdempotencyStore, RedisIdempotencyStore
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.service import Service
from gateway.runtime.topology import COMMANDS_EXCHANGE, EVENTS_EXCHANGE

S = DeliveryState

#: How long the suite waits for an expected event before failing.
EVENT_TIMEOUT = 5.0
#: How long it keeps listening after the expected events, to catch duplicates.
SETTLE = 0.3

#: Send settings the suite runs with: few, short retries so every case is fast.
SEND_SETTINGS: dict[str, Any] = {
    "max_attempts": 3,
    "initial_backoff": 0.01,
    "max_backoff": 0.05,
    "max_retry_after": 5.0,
    "provider_timeout": 0.5,
}


# -- what the adapter provides --------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class WebhookCall:
    """One HTTP request as the provider would send it to the service."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    method: str = "POST"
    #: What this request is (for forgeries: what was tampered with).
    description: str = ""


@dataclass(frozen=True, kw_only=True)
class StatusCase:
    """A message's status callbacks in the order the provider produced them."""

    calls: Sequence[WebhookCall]
    #: The canonical state the message ends in (folding the true order).
    final_state: DeliveryState.ValueType


@dataclass(frozen=True, kw_only=True)
class BatchCase:
    """A webhook carrying several items (messages, statuses or media)."""

    call: WebhookCall
    #: Identity of every item the webhook carries (e.g. message ids, media URLs).
    expected_items: frozenset[str]
    #: The item identities found in the events published for it.
    items_of: Callable[[Sequence[Event]], list[str]]


class FakeProvider(Protocol):
    """A scriptable fake of the provider's send API on 127.0.0.1.

    ``calls`` records every send request it received; the ``*_next`` methods
    script the answer to the next one.
    """

    url: str

    @property
    def calls(self) -> Sequence[object]:
        """Every send request received so far."""

    def rate_limit_next(self, retry_after: int = 1) -> None:
        """Answer the next send with 429 and ``Retry-After: retry_after``."""

    def server_error_next(self, status: int = 500) -> None:
        """Answer the next send with a 5xx."""

    def reject_next(self) -> None:
        """Answer the next send with the provider's 4xx validation error."""

    def hang_next(self, seconds: float) -> None:
        """Accept the next send but answer only after ``seconds``."""

    async def start(self) -> None:
        """Start listening."""

    async def stop(self) -> None:
        """Stop listening."""


# -- the running service --------------------------------------------------------


def check_manifest(manifest: ConnectorManifest, event: Event) -> list[str]:
    """What in ``event`` its connector's manifest does not declare (empty: honest)."""
    problems = []
    where = f"event {event.id} ({event.type})"
    if (event.channel, event.provider) != (manifest.channel, manifest.provider):
        problems.append(f"{where} is from {event.channel}.{event.provider}")
    if event.type not in manifest.event_types:
        problems.append(f"{where}: type not in manifest event_types {list(manifest.event_types)}")
    payload = event.WhichOneof("payload")
    if payload == "message":
        content = event.message.WhichOneof("content")
        if content not in manifest.inbound_content:
            problems.append(
                f"{where}: content {content!r} not in inbound_content "
                f"{list(manifest.inbound_content)}"
            )
    elif payload == "status" and event.status.state not in manifest.delivery_states:
        problems.append(
            f"{where}: state {DeliveryState.Name(event.status.state)} not in delivery_states"
        )
    return problems


class Harness:
    """One connector in a running :class:`Service`, a fake provider, and every
    event the service published (collected from a queue bound to ``#``)."""

    def __init__(
        self,
        service: Service,
        provider: FakeProvider,
        manifest: ConnectorManifest,
        http: aiohttp.ClientSession,
    ) -> None:
        self.service = service
        self.provider = provider
        self.manifest = manifest
        self.http = http
        self.events: list[Event] = []
        self.manifest_violations: list[str] = []
        self._arrived = asyncio.Condition()
        self._subscription: Subscription | None = None

    @property
    def bus(self) -> Bus:
        """The service's bus."""
        return self.service.bus

    @property
    def base_url(self) -> str:
        """Where the service's webhooks are (its public base URL)."""
        return self.service.base_url

    async def collect(self) -> None:
        """Bind a temporary queue to every event and start collecting."""
        queue = await self.bus.declare_temporary_queue(EVENTS_EXCHANGE, ["#"])
        self._subscription = await self.bus.consume(queue, self._on_event, prefetch=64)

    async def _on_event(self, delivery: Delivery) -> None:
        event = decode_event(delivery)
        self.manifest_violations.extend(check_manifest(self.manifest, event))
        async with self._arrived:
            self.events.append(event)
            self._arrived.notify_all()

    async def post(self, call: WebhookCall) -> tuple[int, bytes]:
        """Send ``call`` to the service; returns the HTTP status and body."""
        async with self.http.request(
            call.method, call.url, headers=dict(call.headers), data=call.body
        ) as resp:
            return resp.status, await resp.read()

    async def wait_for(
        self, predicate: Callable[[Event], bool], count: int, *, settle: float = SETTLE
    ) -> list[Event]:
        """The events matching ``predicate`` once at least ``count`` arrived,
        after listening ``settle`` seconds more for any extra one."""

        def matching() -> list[Event]:
            return [e for e in self.events if predicate(e)]

        async with self._arrived:
            try:
                await asyncio.wait_for(
                    self._arrived.wait_for(lambda: len(matching()) >= count), EVENT_TIMEOUT
                )
            except TimeoutError:
                pytest.fail(f"only {len(matching())} of {count} expected events arrived")
        await asyncio.sleep(settle)
        return matching()

    async def send(self, command: SendMessageCommand) -> None:
        """Publish a send command to the connector's command queue."""
        routing_key, message = encode_command(command)
        await self.bus.publish(COMMANDS_EXCHANGE, routing_key, message, timeout=5.0)

    async def statuses_of(self, message_id: str, count: int) -> list[Event]:
        """The status events of one outbound message (at least ``count``)."""
        return await self.wait_for(
            lambda e: e.type == "message.status" and e.status.message_id == message_id, count
        )

    async def close(self) -> None:
        """Stop collecting, the service and the fake provider."""
        try:
            if self._subscription is not None:
                await self._subscription.cancel()
            await self.service.stop()
        finally:
            await self.provider.stop()


@contextlib.asynccontextmanager
async def serve(
    connector: str,
    provider: FakeProvider,
    connector_settings: Callable[[str], Mapping[str, Any]],
    *,
    environ: Mapping[str, str],
    bus: Bus | None = None,
    broker_url: str = "memory://",
    store: IdempotencyStore | None = None,
    collect: bool = True,
    http: Mapping[str, Any] | None = None,
    extra_settings: Mapping[str, Any] | None = None,
) -> AsyncIterator[Harness]:
    """Start ``provider`` and a :class:`Service` hosting ``connector`` whose config
    section is ``connector_settings(provider.url)``; stop both afterwards.

    The service runs on ``bus`` (default: a new in-memory bus, or the broker at
    ``broker_url`` when that is an ``amqp://`` URL) with the suite's fast send
    settings; ``http`` overrides webhook server settings (``public_base_url``);
    ``extra_settings`` adds further top-level runtime sections (e.g. ``spool``).
    Every event collected is checked against the connector's manifest.
    """
    await provider.start()
    try:
        settings = RuntimeSettings.model_validate(
            {
                "http": {"host": "127.0.0.1", "port": 0, **(http or {})},
                "broker": {"url": broker_url, "publish_timeout": 2.0, "connect_timeout": 3.0},
                "send": SEND_SETTINGS,
                "connectors": {connector: dict(connector_settings(provider.url))},
                **(extra_settings or {}),
            }
        )
        service = Service(
            settings,
            [connector],
            bus=bus if bus is not None or broker_url != "memory://" else InMemoryBus(),
            store=store,
            environ=environ,
        )
    except BaseException:
        await provider.stop()
        raise
    manifest = registry.load(connector).manifest
    async with aiohttp.ClientSession() as session:
        harness = Harness(service, provider, manifest, session)
        try:
            await service.start()
            if collect:
                await harness.collect()
            yield harness
        finally:
            await harness.close()
        # Manifest honesty holds for every event of every test, not only one.
        assert not harness.manifest_violations, harness.manifest_violations


# -- buses with injected faults (in-memory) --------------------------------------


class GatedBus(InMemoryBus):
    """An in-memory bus whose event publishes wait for :attr:`gate`."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def publish(
        self, exchange: str, routing_key: str, message: OutgoingMessage, *, timeout: float
    ) -> None:
        if exchange == EVENTS_EXCHANGE:
            self.entered.set()
            await self.gate.wait()
        await super().publish(exchange, routing_key, message, timeout=timeout)


class FlakyBus(InMemoryBus):
    """An in-memory bus whose first ``failures`` event publishes time out unconfirmed."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def publish(
        self, exchange: str, routing_key: str, message: OutgoingMessage, *, timeout: float
    ) -> None:
        if exchange == EVENTS_EXCHANGE and self.failures > 0:
            self.failures -= 1
            raise PublishTimeoutError("injected: no confirm")
        await super().publish(exchange, routing_key, message, timeout=timeout)


# -- a TCP proxy to cut the broker connection -----------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; :meth:`cut` drops every
    connection and refuses new ones (a broker outage as the client sees it)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.cut()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass  # the other side is gone: closing below ends both directions
        finally:
            dst.close()

    async def resume(self) -> None:
        """Listen again on the same port after :meth:`cut` (the broker is back)."""
        if self._server is None:
            self._server = await asyncio.start_server(
                self._accept, "127.0.0.1", self.port, reuse_address=True
            )

    async def cut(self) -> None:
        """Stop listening and close every proxied connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# -- the suite ------------------------------------------------------------------


class ConnectorConformance:
    """Behaviour tests every connector inherits. Subclass, name it ``Test...``,
    set :attr:`connector` and implement the adapter methods below."""

    #: Registry name of the connector under test, e.g. ``"sms.twilio"``.
    connector: ClassVar[str]

    # -- adapter: the subclass implements these ------------------------------------

    def connector_settings(self, api_base_url: str) -> dict[str, Any]:
        """The connector's config section, sending to the fake at ``api_base_url``.

        Secrets are references (``{env: NAME}``) resolved from :meth:`environ`."""
        raise NotImplementedError

    def environ(self) -> dict[str, str]:
        """Environment the config's secret references resolve from."""
        raise NotImplementedError

    def fake_provider(self) -> FakeProvider:
        """A new, unstarted fake provider API that plays back no callbacks by itself."""
        raise NotImplementedError

    def new_provider_message_id(self) -> str:
        """A fresh, well-formed provider message id."""
        raise NotImplementedError

    def inbound_webhook(self, base_url: str, provider_message_id: str) -> WebhookCall:
        """A validly signed inbound-message webhook yielding exactly one event."""
        raise NotImplementedError

    def forgeries(self, base_url: str, provider_message_id: str) -> Sequence[WebhookCall]:
        """Requests that must be refused (each with a description): tampered
        bodies, wrong secrets, missing or malformed signatures, replays ..."""
        raise NotImplementedError

    def status_case(self, base_url: str, provider_message_id: str, message_id: str) -> StatusCase:
        """Signed status callbacks for one outbound message (gateway id
        ``message_id``), each yielding one status event."""
        raise NotImplementedError

    def batch_case(self, base_url: str) -> BatchCase:
        """A signed webhook carrying several items."""
        raise NotImplementedError

    def send_command(self, message_id: str) -> SendMessageCommand:
        """A valid send command for this connector."""
        raise NotImplementedError

    # -- harness -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(
        self,
        *,
        bus: Bus | None = None,
        broker_url: str = "memory://",
        store: IdempotencyStore | None = None,
        collect: bool = True,
        http: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[Harness]:
        """The connector in a started service (in-memory bus unless told otherwise)."""
        async with serve(
            self.connector,
            self.fake_provider(),
            self.connector_settings,
            environ=self.environ(),
            bus=bus,
            broker_url=broker_url,
            store=store,
            collect=collect,
            http=http,
        ) as harness:
            yield harness

    @staticmethod
    def _received(event: Event) -> bool:
        return event.type != "message.status"

    # -- signature rejection matrix -----------------------------------------------------

    async def test_valid_webhook_is_accepted_and_published(self) -> None:
        async with self.running() as h:
            pmid = self.new_provider_message_id()
            status, _ = await h.post(self.inbound_webhook(h.base_url, pmid))
            assert 200 <= status < 300
            (event,) = await h.wait_for(self._received, 1)
            assert event.id
            assert (event.channel, event.provider) == tuple(self.connector.split(".", 1))
            assert event.WhichOneof("payload") == "message"
            assert event.message.provider_message_id == pmid

    async def test_every_forgery_is_refused_and_publishes_nothing(self) -> None:
        async with self.running() as h:
            pmid = self.new_provider_message_id()
            forgeries = list(self.forgeries(h.base_url, pmid))
            assert len(forgeries) >= 3, "a rejection matrix needs several forgeries"
            for call in forgeries:
                assert call.description, "describe what each forgery changes"
                status, body = await h.post(call)
                assert status in (401, 403), f"{call.description}: HTTP {status} {body!r}"
            # The valid original is still accepted afterwards: nothing was claimed.
            status, _ = await h.post(self.inbound_webhook(h.base_url, pmid))
            assert 200 <= status < 300
            events = await h.wait_for(lambda e: True, 1)
            assert len(events) == 1, "a forgery was published"

    # -- dedup ---------------------------------------------------------------------------

    async def test_repeated_webhook_is_one_event(self) -> None:
        async with self.running() as h:
            call = self.inbound_webhook(h.base_url, self.new_provider_message_id())
            for _ in range(3):
                status, _ = await h.post(call)
                assert 200 <= status < 300  # a duplicate is acknowledged, not refused
            events = await h.wait_for(self._received, 1)
            assert len(events) == 1

    async def test_concurrent_copies_of_a_webhook_are_one_event(self) -> None:
        async with self.running() as h:
            call = self.inbound_webhook(h.base_url, self.new_provider_message_id())
            results = await asyncio.gather(*(h.post(call) for _ in range(8)))
            assert all(200 <= status < 300 for status, _ in results), results
            events = await h.wait_for(self._received, 1)
            assert len(events) == 1
            assert isinstance(h.bus, InMemoryBus)
            assert len(h.bus.published) == 1

    # -- confirmed publish before 2xx ----------------------------------------------------

    async def test_answer_waits_for_the_publish_confirm(self) -> None:
        bus = GatedBus()
        async with self.running(bus=bus) as h:
            answer = asyncio.create_task(
                h.post(self.inbound_webhook(h.base_url, self.new_provider_message_id()))
            )
            await asyncio.wait_for(bus.entered.wait(), EVENT_TIMEOUT)
            await asyncio.sleep(0.1)
            assert not answer.done(), "answered before the event was confirmed"
            bus.gate.set()
            status, _ = await answer
            assert 200 <= status < 300
            assert len(await h.wait_for(self._received, 1)) == 1

    async def test_unroutable_publish_is_503_and_retry_is_accepted(self) -> None:
        async with self.running(collect=False) as h:
            bus = h.bus
            assert isinstance(bus, InMemoryBus)
            call = self.inbound_webhook(h.base_url, self.new_provider_message_id())
            status, _ = await h.post(call)  # no queue bound to channels.events
            assert status == 503
            assert bus.published == []
            await h.collect()
            status, _ = await h.post(call)  # the provider's retry
            assert 200 <= status < 300
            assert len(await h.wait_for(self._received, 1)) == 1

    async def test_unconfirmed_publish_is_503_and_retry_is_accepted(self) -> None:
        async with self.running(bus=FlakyBus(failures=1)) as h:
            call = self.inbound_webhook(h.base_url, self.new_provider_message_id())
            status, _ = await h.post(call)
            assert status == 503
            status, _ = await h.post(call)
            assert 200 <= status < 300
            assert len(await h.wait_for(self._received, 1)) == 1

    @pytest.mark.rabbitmq
    async def test_rabbitmq_event_is_on_the_broker_before_2xx(
        self, rabbitmq_url: str, unique: str, amqp_connection: aio_pika.abc.AbstractConnection
    ) -> None:
        channel = await amqp_connection.channel()
        queue = await channel.declare_queue(f"conformance.{unique}", auto_delete=False)
        # Only this connector's events: other publishers may share the broker.
        await queue.bind(EVENTS_EXCHANGE, routing_key=f"#.{self.connector}")
        try:
            async with self.running(broker_url=rabbitmq_url, collect=False) as h:
                await _stop_consuming_commands(h.service)
                call = self.inbound_webhook(h.base_url, self.new_provider_message_id())
                status, _ = await h.post(call)
                assert 200 <= status < 300
                # Confirmed means routed and stored: it is there the moment we got 2xx.
                first = await queue.get(fail=False, no_ack=True)
                assert first is not None, "2xx before the event reached the broker"
                status, _ = await h.post(call)  # a duplicate: acknowledged, not re-published
                assert 200 <= status < 300
                await asyncio.sleep(SETTLE)
                assert await _drain(queue, first.message_id) == []
        finally:
            await queue.delete(if_unused=False, if_empty=False)
            await channel.close()

    @pytest.mark.rabbitmq
    async def test_rabbitmq_outage_is_503_nothing_acked_and_retry_is_accepted(
        self,
        rabbitmq_url: str,
        redis_url: str,
        unique: str,
        amqp_connection: aio_pika.abc.AbstractConnection,
    ) -> None:
        channel = await amqp_connection.channel()
        queue = await channel.declare_queue(f"conformance.{unique}", auto_delete=False)
        # Only this connector's events: other publishers may share the broker.
        await queue.bind(EVENTS_EXCHANGE, routing_key=f"#.{self.connector}")
        parts = URL(rabbitmq_url)
        prefix = f"cg:conformance:{unique}:"
        try:
            async with TcpProxy(parts.host or "127.0.0.1", parts.port or 5672) as proxy:
                proxied = str(parts.with_port(proxy.port))
                call, public = None, None
                async with self.running(
                    broker_url=proxied,
                    store=RedisIdempotencyStore(redis_url, prefix=prefix),
                    collect=False,
                ) as h:
                    await _stop_consuming_commands(h.service)
                    public = h.base_url
                    call = self.inbound_webhook(public, self.new_provider_message_id())
                    await proxy.cut()  # the broker goes away
                    status, _ = await h.post(call)
                    assert status == 503
                assert await queue.get(fail=False, no_ack=True) is None, "published in an outage"
            # The provider retries to a healthy instance sharing the dedup store:
            # the failed attempt left no claim behind, so the event is emitted once.
            assert call is not None
            assert public is not None
            async with self.running(
                broker_url=rabbitmq_url,
                store=RedisIdempotencyStore(redis_url, prefix=prefix),
                collect=False,
                http={"public_base_url": public},
            ) as h:
                await _stop_consuming_commands(h.service)
                retry = _readdress(call, h.service)
                status, _ = await h.post(retry)
                assert 200 <= status < 300
                got = await queue.get(fail=False, no_ack=True)
                assert got is not None
                await asyncio.sleep(SETTLE)
                assert await _drain(queue, got.message_id) == []
        finally:
            await queue.delete(if_unused=False, if_empty=False)
            await channel.close()

    # -- batch completeness ---------------------------------------------------------------

    async def test_batch_webhook_yields_every_item(self) -> None:
        async with self.running() as h:
            case = self.batch_case(h.base_url)
            assert len(case.expected_items) >= 2, "a batch case needs several items"
            status, _ = await h.post(case.call)
            assert 200 <= status < 300
            await h.wait_for(lambda e: True, 1)
            assert sorted(case.items_of(h.events)) == sorted(case.expected_items)

    async def test_batch_retry_after_partial_failure_emits_only_what_is_missing(self) -> None:
        async with self.running(bus=FlakyBus(failures=1)) as h:
            case = self.batch_case(h.base_url)
            status, _ = await h.post(case.call)
            assert status == 503
            status, _ = await h.post(case.call)
            assert 200 <= status < 300
            await h.wait_for(lambda e: True, 1)
            ids = [e.id for e in h.events]
            assert len(ids) == len(set(ids)), "the retry re-published a confirmed event"
            assert sorted(case.items_of(h.events)) == sorted(case.expected_items)

    # -- monotonic statuses -----------------------------------------------------------------

    async def test_statuses_in_any_order_never_move_a_message_backwards(self) -> None:
        async with self.running() as h:
            true_states: list[DeliveryState.ValueType] = []
            for round_ in range(3):
                message_id, pmid = str(uuid.uuid4()), self.new_provider_message_id()
                case = self.status_case(h.base_url, pmid, message_id)
                calls = list(case.calls)
                assert len(calls) >= 2, "a status case needs several callbacks"
                # The true order, then reversed, then shuffled: each for a new message.
                order = [
                    list(range(len(calls))),
                    list(range(len(calls)))[::-1],
                    random.Random(7).sample(range(len(calls)), len(calls)),
                ][round_]
                for index in order:
                    status, _ = await h.post(calls[index])
                    assert 200 <= status < 300, calls[index].description
                events = await h.statuses_of(message_id, len(calls))
                assert len(events) == len(calls), "a status callback was lost or duplicated"
                for event in events:
                    assert event.status.provider_message_id == pmid
                arrived = [e.status.state for e in events]
                if round_ == 0:
                    true_states = arrived
                    assert fold(arrived) == case.final_state
                else:
                    # The same callbacks map to the same states whatever the order...
                    assert sorted(arrived) == sorted(true_states)
                    assert [arrived[order.index(i)] for i in range(len(calls))] == true_states
                # ...and folding them as they arrived never moves the message backwards.
                assert fold(arrived) == case.final_state, [S.Name(s) for s in arrived]
                # Once final, no callback of the sequence moves the message again.
                for state in arrived:
                    assert not advance(case.final_state, state), S.Name(state)
                # A provider retry of every callback publishes nothing new.
                for call in calls:
                    status, _ = await h.post(call)
                    assert 200 <= status < 300
                again = await h.statuses_of(message_id, len(calls))
                assert len(again) == len(calls), "a repeated status callback was re-published"

    # -- send retry semantics -----------------------------------------------------------------

    async def _send(self, h: Harness, statuses: int = 1) -> tuple[SendMessageCommand, list[Event]]:
        command = self.send_command(str(uuid.uuid4()))
        await h.send(command)
        return command, await h.statuses_of(command.message_id, statuses)

    async def test_send_success_is_one_call_and_one_status(self) -> None:
        async with self.running() as h:
            _, (status,) = await self._send(h)
            assert len(h.provider.calls) == 1
            assert status.status.state in (
                S.DELIVERY_STATE_ACCEPTED,
                S.DELIVERY_STATE_QUEUED,
                S.DELIVERY_STATE_SENT,
            )
            assert status.status.provider_message_id

    async def test_send_rate_limited_then_success_is_two_calls_one_status(self) -> None:
        async with self.running() as h:
            h.provider.rate_limit_next(retry_after=1)
            _, (status,) = await self._send(h)
            assert len(h.provider.calls) == 2
            assert status.status.state != S.DELIVERY_STATE_FAILED
            assert status.status.provider_message_id

    async def test_send_server_errors_are_bounded_then_one_failed(self) -> None:
        async with self.running() as h:
            for _ in range(SEND_SETTINGS["max_attempts"] + 2):
                h.provider.server_error_next(503)
            _, (status,) = await self._send(h)
            assert len(h.provider.calls) == SEND_SETTINGS["max_attempts"]
            assert status.status.state == S.DELIVERY_STATE_FAILED
            assert not status.status.permanent

    async def test_send_rejected_is_one_call_and_permanent_failure(self) -> None:
        async with self.running() as h:
            h.provider.reject_next()
            _, (status,) = await self._send(h)
            assert len(h.provider.calls) == 1
            assert status.status.state == S.DELIVERY_STATE_FAILED
            assert status.status.permanent
            assert status.status.reason_code

    async def test_send_hang_is_ambiguous_and_never_resent(self) -> None:
        async with self.running() as h:
            manifest = registry.load(self.connector).manifest
            h.provider.hang_next(SEND_SETTINGS["provider_timeout"] * 3)
            _, (status,) = await self._send(h)
            if manifest.idempotent_send:
                assert len(h.provider.calls) >= 1
            else:
                assert len(h.provider.calls) == 1, "an ambiguous send was retried"
                assert status.status.state == S.DELIVERY_STATE_FAILED
                assert status.status.reason_code == "ambiguous_send"
                assert not status.status.permanent

    async def test_redelivered_command_is_not_sent_again(self) -> None:
        async with self.running() as h:
            command, (first,) = await self._send(h)
            await h.send(command)  # the same command again (a redelivery)
            again = await h.statuses_of(command.message_id, 2)
            assert len(h.provider.calls) == 1
            assert {e.id for e in again} == {first.id}, "a redelivery produced another outcome"

    async def test_expired_command_is_not_sent(self) -> None:
        async with self.running() as h:
            command = self.send_command(str(uuid.uuid4()))
            command.expires_at.FromDatetime(datetime.now(UTC) - timedelta(seconds=1))
            await h.send(command)
            (status,) = await h.statuses_of(command.message_id, 1)
            assert len(h.provider.calls) == 0
            assert status.status.state == S.DELIVERY_STATE_EXPIRED
            # The harness then checks the manifest declares EXPIRED: the runtime
            # emits it on the connector's behalf.

    # -- manifest honesty ------------------------------------------------------------------------

    async def test_manifest_declares_everything_the_connector_emits(self) -> None:
        manifest = registry.load(self.connector).manifest
        assert f"{manifest.channel}.{manifest.provider}" == self.connector
        assert manifest.api_version, "the manifest names the provider API version"
        assert manifest.docs_url, "the manifest links the provider's docs"
        assert manifest.event_types, "the manifest declares the event types it publishes"
        assert manifest.delivery_states or manifest.inbound_content
        async with self.running() as h:
            # The connector built by the service declares what its spec declares.
            assert [c.connector.manifest for c in h.service.hosted] == [manifest]
            base = h.base_url
            await h.post(self.inbound_webhook(base, self.new_provider_message_id()))
            await h.post(self.batch_case(base).call)
            case = self.status_case(base, self.new_provider_message_id(), str(uuid.uuid4()))
            for call in case.calls:
                await h.post(call)
            await self._send(h)
            h.provider.reject_next()
            await self._send(h)
            assert h.events
            seen_types = {e.type for e in h.events}
            assert seen_types <= set(manifest.event_types)
            for event in h.events:
                assert check_manifest(manifest, event) == []


async def _stop_consuming_commands(service: Service) -> None:
    # The shared broker's command queue may carry other test runs' commands;
    # these checks are about webhooks, so the service must not take them.
    for subscription in service._subscriptions:
        await subscription.cancel()
    service._subscriptions.clear()


async def _drain(queue: aio_pika.abc.AbstractQueue, message_id: str | None) -> list[str]:
    """Ids of the messages left in ``queue`` (all of them, or those with ``message_id``)."""
    left = []
    while (message := await queue.get(fail=False, no_ack=True)) is not None:
        if message_id is None or message.message_id == message_id:
            left.append(message.message_id or "")
    return left


def _readdress(call: WebhookCall, service: Service) -> WebhookCall:
    """``call`` sent to ``service``'s socket; the URL the provider signed is what
    the service rebuilds from its configured public base URL."""
    target = URL(call.url).with_host(service.settings.http.host).with_port(service.port)
    return WebhookCall(
        url=str(target),
        headers=call.headers,
        body=call.body,
        method=call.method,
        description=call.description,
    )
