"""Outbound commands: a connector's command queues to provider calls and outcomes.

Two workers share one set of guarantees (:class:`CommandGuard`): the
:class:`CommandWorker` consumes a connector's send queue and calls
:meth:`Connector.send`; the :class:`CallCommandWorker` consumes a voice
connector's call queue and calls :meth:`CallControl.call`. For each command:

1. claim a ledger key (``send:<connector>:<message id>:<attempt>`` or
   ``call:<connector>:<command id>``) before calling the provider, so a command
   redelivered after a crash is recognized;
2. call the provider with retries for transient errors only (tenacity,
   honouring Retry-After), within a bounded number of attempts;
3. record the outcome in the ledger, then publish exactly one outcome event
   (a ``message.status`` or a ``call.command``) with confirms, then ack.

A redelivered command whose ledger record is done re-publishes the recorded
outcome (same deterministic event id) instead of calling the provider again.
While a worker calls the provider, it keeps a short lease alive beside its
claim: a copy of the command that finds the claim pending and the lease alive
is being executed elsewhere right now, so it waits for that outcome. A pending
claim with no live lease was interrupted mid-call: unless the provider takes an
idempotency key the outcome is unknown, so it ends FAILED with reason
``ambiguous_send`` rather than risk a duplicate send (or a second call placed).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from gateway.api.v1.call_pb2 import CallCommand, CallCommandOutcome, CallCommandResult
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.delivery_pb2 import DeliveryState, DeliveryStatus
from gateway.api.v1.envelope_pb2 import Event
from gateway.contract.connector import CallControl, Connector, ConnectorSpec, SendResult
from gateway.contract.errors import (
    AmbiguousSendError,
    BadRequestError,
    ConnectorError,
    PermanentError,
    TransientError,
)
from gateway.contract.ids import inbound_event_id
from gateway.contract.times import timestamp, to_datetime
from gateway.runtime.bus import Delivery
from gateway.runtime.codec import decode_call_command, decode_command
from gateway.runtime.config import SendSettings
from gateway.runtime.idempotency import Claim, ClaimState, IdempotencyStore
from gateway.runtime.publisher import EventPublisher
from gateway.runtime.telemetry import (
    CALL_COMMANDS,
    DEAD_LETTERS,
    SEND_RETRIES,
    SENDS,
    extract_trace_context,
    get_logger,
    tracer,
)
from gateway.runtime.topology import Topology, call_command_queue, command_queue

log = get_logger("gateway.outbound")

#: How long a sender's lease outlives its last renewal. A crashed sender's
#: redelivered command waits at most this long before it is called ambiguous.
SEND_LEASE_SECONDS = 10.0
#: How often a waiting copy of a command looks for the other sender's outcome.
_POLL_SECONDS = 0.1

#: Event type of a call command's outcome (routing key ``call.command.<channel>.<provider>``).
CALL_COMMAND_EVENT_TYPE = "call.command"

_T = TypeVar("_T")
_Command = TypeVar("_Command", SendMessageCommand, CallCommand)
_Result = TypeVar("_Result", bound=Message)


def command_topology(spec: ConnectorSpec, delivery_limit: int) -> Topology:
    """The command queues a service hosting ``spec`` consumes.

    Every connector has a send queue; one whose manifest lists
    ``call_actions`` also has a call-command queue. The service declares
    exactly this and ``scripts/gen_definitions.py`` ships it as broker
    definitions.
    """
    queues = [command_queue(spec.channel, spec.provider, delivery_limit)]
    if spec.manifest.call_actions:
        queues.append(call_command_queue(spec.channel, spec.provider, delivery_limit))
    return Topology(queues=tuple(queues))


def _now() -> Timestamp:
    return timestamp(datetime.now(UTC))


def _expired(command: SendMessageCommand | CallCommand) -> bool:
    return command.HasField("expires_at") and to_datetime(command.expires_at) < datetime.now(UTC)


@dataclass(frozen=True)
class Outcome(Generic[_Result]):
    """A command's outcome as the ledger records it: enough to publish it again."""

    account: str
    result: _Result
    attributes: dict[str, str] | None = None


class CommandGuard(Generic[_Result]):
    """What every outbound worker needs between the broker and a provider call.

    It accepts (or dead-letters) deliveries, runs a command at most once per
    ledger key (claim, live-sender lease, ambiguity after a crash), retries
    transient provider errors and records outcomes before they are published.
    An outcome's ``result`` (a ``result_type`` message) is recorded under
    ``field`` of the ledger record.
    """

    def __init__(
        self,
        spec: ConnectorSpec,
        ledger: IdempotencyStore,
        settings: SendSettings,
        *,
        result_type: type[_Result],
        field: str,
    ) -> None:
        self._spec, self._ledger, self._settings = spec, ledger, settings
        self._result_type, self._field = result_type, field
        self._retries = SEND_RETRIES.labels(spec.name)
        self._dead_letters = DEAD_LETTERS.labels(spec.name)

    def accept(self, delivery: Delivery, decode: Callable[[Delivery], _Command]) -> _Command:
        """The command in ``delivery``, if it is well-formed and for this connector.

        Raises BadRequestError or PermanentError otherwise (the bus rejects the
        message to the dead-letter exchange: no retry can make it valid).
        """
        try:
            command = decode(delivery)
            if (command.channel, command.provider) != (self._spec.channel, self._spec.provider):
                raise PermanentError(
                    f"command for {command.channel}.{command.provider} on {self._spec.name}"
                )
        except (BadRequestError, PermanentError):
            self._dead_letters.inc()
            raise
        return command

    async def run_once(
        self,
        key: str,
        *,
        repeatable: bool,
        execute: Callable[[], Awaitable[None]],
        replay: Callable[[Outcome[_Result]], Awaitable[None]],
        interrupted: Callable[[], Awaitable[None]],
    ) -> None:
        """Execute the command of ledger key ``key`` unless it was executed before.

        ``execute`` runs under the claim and a live lease, and must
        :meth:`record` the outcome before publishing it. ``replay`` gets the
        recorded outcome of a command done before (or by a concurrent copy);
        ``interrupted`` runs instead of ``execute`` when an earlier delivery
        died mid-call and the provider call is not ``repeatable``.
        """
        claim = await self._ledger.claim(key, ttl=self._settings.record_ttl)
        if claim.state is ClaimState.PENDING:
            claim = await self._await_other_sender(key)
        if claim.state is ClaimState.DONE and claim.value is not None:
            await replay(self._recorded(claim.value))
            return
        if claim.state is ClaimState.PENDING and not repeatable:
            await interrupted()
            return
        async with self._lease(key):
            await execute()

    async def record(self, key: str, outcome: Outcome[_Result]) -> None:
        """Complete ``key`` with an outcome (before it is published: if the
        publish fails, the redelivered command re-publishes instead of calling
        the provider again)."""
        record = {
            "account": outcome.account,
            self._field: outcome.result.SerializeToString().hex(),
            "attributes": outcome.attributes or {},
        }
        await self._ledger.complete(key, json.dumps(record), ttl=self._settings.record_ttl)

    def _recorded(self, value: str) -> Outcome[_Result]:
        record: dict[str, Any] = json.loads(value)
        result = self._result_type()
        result.ParseFromString(bytes.fromhex(record[self._field]))
        return Outcome(record["account"], result, record.get("attributes"))

    async def call_with_retries(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """``call()``, repeated on TransientError with backoff, bounded attempts."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._settings.max_attempts),
            wait=self._wait,
            retry=retry_if_exception(self._retryable),
            before_sleep=lambda _: self._retries.inc(),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await call()
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    def _retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, TransientError) and (
            exc.retry_after is None or exc.retry_after <= self._settings.max_retry_after
        )

    def _wait(self, state: RetryCallState) -> float:
        backoff = wait_exponential_jitter(
            multiplier=self._settings.initial_backoff, max=self._settings.max_backoff
        )(state)
        exc = state.outcome.exception() if state.outcome else None
        hint = exc.retry_after if isinstance(exc, TransientError) and exc.retry_after else 0.0
        return max(backoff, hint)

    @asynccontextmanager
    async def _lease(self, key: str) -> AsyncIterator[None]:
        """Tell concurrent copies of this command that a live worker is executing it."""
        lease_key = f"lease:{key}"
        # Taken before the first await of the provider call, so a copy that
        # finds the claim pending finds the lease too.
        await self._ledger.complete(lease_key, "alive", ttl=SEND_LEASE_SECONDS)

        async def renew() -> None:
            while True:
                await asyncio.sleep(SEND_LEASE_SECONDS / 3)
                await self._ledger.complete(lease_key, "alive", ttl=SEND_LEASE_SECONDS)

        renewer = asyncio.create_task(renew(), name=f"lease {key}")
        try:
            yield
        finally:
            # The lease is left to expire: the claim is complete by now, and a
            # waiter reads the claim before the lease.
            renewer.cancel()

    async def _await_other_sender(self, key: str) -> Claim:
        """A copy of this command is pending: wait while its sender is alive.

        Returns the claim once it is done, or still pending once no live
        sender holds the lease (it crashed mid-call).
        """
        lease_key = f"lease:{key}"
        misses = 0
        while True:
            claim = await self._ledger.claim(key, ttl=self._settings.record_ttl)
            if claim.state is not ClaimState.PENDING:
                return claim
            # A probe that leaves (almost) nothing behind: NEW means no lease.
            probe = await self._ledger.claim(lease_key, ttl=0.001)
            # Two misses a poll apart: the sender writes its lease one round
            # trip after its claim, and a single miss may fall in between.
            misses = misses + 1 if probe.state is ClaimState.NEW else 0
            if misses >= 2:
                return await self._ledger.claim(key, ttl=self._settings.record_ttl)
            await asyncio.sleep(_POLL_SECONDS)


def _outcome_event(
    command: SendMessageCommand | CallCommand,
    *,
    type: str,
    account: str,
    causation_id: str,
    id_parts: tuple[str, ...],
    attributes: Mapping[str, str] | None,
) -> Event:
    """The envelope of a command's outcome event, its payload left to the caller.

    The id is deterministic (provider, account and ``id_parts``), so an outcome
    re-published for a redelivered command dedupes downstream; the command's
    metadata become attributes, then ``attributes`` (the provider's) on top.
    """
    now = _now()
    event = Event(
        id=inbound_event_id(command.provider, account or "-", *id_parts),
        type=type,
        channel=command.channel,
        provider=command.provider,
        account=account,
        occurred_at=now,
        received_at=now,
        correlation_id=command.correlation_id,
        causation_id=causation_id,
        conversation_id=command.conversation_id,
    )
    event.attributes.update(command.metadata)
    if attributes:
        event.attributes.update(attributes)
    return event


# -- sends -----------------------------------------------------------------------------------


def status_event(
    command: SendMessageCommand,
    *,
    account: str,
    status: DeliveryStatus,
    attributes: dict[str, str] | None = None,
) -> Event:
    """The status event of a send outcome; its id is deterministic per
    (message, attempt, state) so a re-published outcome dedupes downstream."""
    attempt = command.attempt or 1
    status.message_id = command.message_id
    status.attempt = attempt
    if not status.recipient and command.message.recipients:
        status.recipient = command.message.recipients[0].address
    event = _outcome_event(
        command,
        type="message.status",
        account=account,
        causation_id=command.message_id,
        id_parts=("send", command.message_id, str(attempt), DeliveryState.Name(status.state)),
        attributes=attributes,
    )
    event.status.CopyFrom(status)
    return event


def _failed(exc: ConnectorError, *, permanent: bool) -> DeliveryStatus:
    return DeliveryStatus(
        state=DeliveryState.DELIVERY_STATE_FAILED,
        reason_code=exc.code,
        reason=str(exc)[:500],
        permanent=permanent,
    )


class CommandWorker:
    """Handles deliveries from one connector's send-command queue."""

    def __init__(
        self,
        spec: ConnectorSpec,
        connector: Connector,
        publisher: EventPublisher,
        ledger: IdempotencyStore,
        settings: SendSettings,
    ) -> None:
        self._spec, self._connector, self._publisher = spec, connector, publisher
        self._guard = CommandGuard(
            spec, ledger, settings, result_type=DeliveryStatus, field="status"
        )
        self._sends = {o: SENDS.labels(spec.name, o) for o in ("sent", "failed", "replayed")}

    async def handle(self, delivery: Delivery) -> None:
        """Process one command delivery (the bus acks when this returns)."""
        command = self._guard.accept(delivery, decode_command)
        with tracer().start_as_current_span(
            f"send {self._spec.name}",
            context=extract_trace_context(delivery.headers),
            attributes={
                "messaging.message.id": command.message_id,
                "gateway.connector": self._spec.name,
                "messaging.rabbitmq.delivery_count": delivery.delivery_count,
            },
        ):
            await self._process(command)

    async def _process(self, command: SendMessageCommand) -> None:
        key = f"send:{self._spec.name}:{command.message_id}:{command.attempt or 1}"

        async def replay(outcome: Outcome[DeliveryStatus]) -> None:
            self._sends["replayed"].inc()
            log.info(
                "command already handled; re-publishing its status", message_id=command.message_id
            )
            await self._publish(command, outcome)

        async def interrupted() -> None:
            exc = AmbiguousSendError("a previous delivery of this command was interrupted mid-send")
            await self._finish(
                command, key, Outcome(command.account, _failed(exc, permanent=False))
            )

        await self._guard.run_once(
            key,
            repeatable=self._connector.manifest.idempotent_send,
            execute=lambda: self._send_claimed(command, key),
            replay=replay,
            interrupted=interrupted,
        )

    async def _send_claimed(self, command: SendMessageCommand, key: str) -> None:
        """Send a command this worker holds the claim of, and record the outcome."""
        if _expired(command):
            expired = DeliveryStatus(
                state=DeliveryState.DELIVERY_STATE_EXPIRED,
                reason_code="ttl_expired",
                reason="command expired before it was sent",
                permanent=True,
            )
            await self._finish(command, key, Outcome(command.account, expired))
            return
        outcome: Outcome[DeliveryStatus]
        try:
            result: SendResult = await self._guard.call_with_retries(
                lambda: self._connector.send(command)
            )
        except PermanentError as exc:
            outcome = Outcome(command.account, _failed(exc, permanent=True))
        except (AmbiguousSendError, TransientError) as exc:
            outcome = Outcome(command.account, _failed(exc, permanent=False))
        else:
            sent = DeliveryStatus(
                state=result.state,
                provider_status=result.provider_status,
                provider_message_id=result.provider_message_id,
                segments=result.segments,
            )
            outcome = Outcome(result.account, sent, dict(result.attributes))
        await self._finish(command, key, outcome)

    async def _finish(
        self, command: SendMessageCommand, key: str, outcome: Outcome[DeliveryStatus]
    ) -> None:
        await self._guard.record(key, outcome)
        status = outcome.result
        failed = status.state == DeliveryState.DELIVERY_STATE_FAILED
        self._sends["failed" if failed else "sent"].inc()
        log.info(
            "send finished",
            connector=self._spec.name,
            message_id=command.message_id,
            state=DeliveryState.Name(status.state),
            reason_code=status.reason_code or None,
        )
        await self._publish(command, outcome)

    async def _publish(self, command: SendMessageCommand, outcome: Outcome[DeliveryStatus]) -> None:
        await self._publisher.publish(
            status_event(
                command,
                account=outcome.account,
                status=outcome.result,
                attributes=outcome.attributes,
            )
        )


# -- call commands ---------------------------------------------------------------------------


def call_command_event(
    command: CallCommand,
    *,
    account: str,
    result: CallCommandResult,
    attributes: Mapping[str, str] | None = None,
) -> Event:
    """The ``call.command`` event of a call command's outcome.

    Its id is deterministic per (command, outcome), so the outcome a
    redelivered command re-publishes has the id of the first one, and
    ``causation_id`` is the command id.
    """
    result.command_id = command.command_id
    result.action = command.WhichOneof("action") or ""
    event = _outcome_event(
        command,
        type=CALL_COMMAND_EVENT_TYPE,
        account=account,
        causation_id=command.command_id,
        id_parts=("call_command", command.command_id, CallCommandOutcome.Name(result.outcome)),
        attributes=attributes,
    )
    event.call_command.CopyFrom(result)
    return event


def _controlled_call_id(command: CallCommand) -> str:
    """The live call a command controls (empty for ``place``: no call yet)."""
    action = command.WhichOneof("action")
    if action is None or action == "place":
        return ""
    return str(getattr(command, action).call_id)


def _call_failed(
    command: CallCommand, code: str, reason: str, *, permanent: bool
) -> CallCommandResult:
    return CallCommandResult(
        outcome=CallCommandOutcome.CALL_COMMAND_OUTCOME_FAILED,
        call_id=_controlled_call_id(command),
        reason_code=code,
        reason=reason[:500],
        permanent=permanent,
    )


class CallCommandWorker:
    """Handles deliveries from one voice connector's call-command queue.

    The same guarantees as :class:`CommandWorker` (see the module docstring),
    keyed ``call:<connector>:<command id>``. A call command is never repeated
    after an interrupted provider call: placing a call twice rings a customer
    twice. An action the connector does not list in ``call_actions`` ends
    FAILED (permanent, ``unsupported_action``), never in a dead-letter loop.
    """

    def __init__(
        self,
        spec: ConnectorSpec,
        connector: CallControl,
        publisher: EventPublisher,
        ledger: IdempotencyStore,
        settings: SendSettings,
        *,
        actions: Collection[str],
    ) -> None:
        self._spec, self._connector, self._publisher = spec, connector, publisher
        self._actions = frozenset(actions)
        self._guard = CommandGuard(
            spec, ledger, settings, result_type=CallCommandResult, field="result"
        )

    async def handle(self, delivery: Delivery) -> None:
        """Process one call-command delivery (the bus acks when this returns)."""
        command = self._guard.accept(delivery, decode_call_command)
        with tracer().start_as_current_span(
            f"call {self._spec.name}",
            context=extract_trace_context(delivery.headers),
            attributes={
                "messaging.message.id": command.command_id,
                "gateway.connector": self._spec.name,
                "gateway.call.action": command.WhichOneof("action") or "",
                "messaging.rabbitmq.delivery_count": delivery.delivery_count,
            },
        ):
            await self._process(command)

    async def _process(self, command: CallCommand) -> None:
        key = f"call:{self._spec.name}:{command.command_id}"

        async def replay(outcome: Outcome[CallCommandResult]) -> None:
            self._count(command, "replayed")
            log.info(
                "call command already handled; re-publishing its outcome",
                command_id=command.command_id,
            )
            await self._publish(command, outcome)

        async def interrupted() -> None:
            result = _call_failed(
                command,
                AmbiguousSendError.code,
                "a previous delivery of this command was interrupted mid-call",
                permanent=False,
            )
            await self._finish(command, key, Outcome(command.account, result))

        await self._guard.run_once(
            key,
            repeatable=False,
            execute=lambda: self._call_claimed(command, key),
            replay=replay,
            interrupted=interrupted,
        )

    async def _call_claimed(self, command: CallCommand, key: str) -> None:
        """Execute a command this worker holds the claim of, and record the outcome."""
        action = command.WhichOneof("action") or ""
        account, attributes = command.account, None
        if action not in self._actions:
            result = _call_failed(
                command,
                "unsupported_action",
                f"{self._spec.name} does not support call action {action!r} "
                f"(supported: {', '.join(sorted(self._actions)) or 'none'})",
                permanent=True,
            )
        elif _expired(command):
            result = CallCommandResult(
                outcome=CallCommandOutcome.CALL_COMMAND_OUTCOME_EXPIRED,
                call_id=_controlled_call_id(command),
                reason_code="ttl_expired",
                reason="command expired before it was executed",
                permanent=True,
            )
        else:
            try:
                accepted = await self._guard.call_with_retries(
                    lambda: self._connector.call(command)
                )
            except PermanentError as exc:
                result = _call_failed(command, exc.code, str(exc), permanent=True)
            except (AmbiguousSendError, TransientError) as exc:
                result = _call_failed(command, exc.code, str(exc), permanent=False)
            else:
                result = CallCommandResult(
                    outcome=CallCommandOutcome.CALL_COMMAND_OUTCOME_ACCEPTED,
                    call_id=accepted.call_id,
                    provider_status=accepted.provider_status,
                )
                account, attributes = accepted.account, dict(accepted.attributes)
        await self._finish(command, key, Outcome(account, result, attributes))

    async def _finish(
        self, command: CallCommand, key: str, outcome: Outcome[CallCommandResult]
    ) -> None:
        await self._guard.record(key, outcome)
        result = outcome.result
        name = CallCommandOutcome.Name(result.outcome).removeprefix("CALL_COMMAND_OUTCOME_")
        self._count(command, name.lower())
        log.info(
            "call command finished",
            connector=self._spec.name,
            command_id=command.command_id,
            action=command.WhichOneof("action"),
            outcome=name,
            call_id=result.call_id or None,
            reason_code=result.reason_code or None,
        )
        await self._publish(command, outcome)

    async def _publish(self, command: CallCommand, outcome: Outcome[CallCommandResult]) -> None:
        await self._publisher.publish(
            call_command_event(
                command,
                account=outcome.account,
                result=outcome.result,
                attributes=outcome.attributes,
            )
        )

    def _count(self, command: CallCommand, outcome: str) -> None:
        CALL_COMMANDS.labels(self._spec.name, command.WhichOneof("action") or "", outcome).inc()
