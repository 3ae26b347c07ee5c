"""Outbound sends: a connector's command queue to provider calls and statuses.

For each command:

1. claim ``send:<connector>:<message id>:<attempt>`` in the send ledger before
   calling the provider, so a command redelivered after a crash is recognized;
2. call the connector with retries for transient errors only (tenacity,
   honouring Retry-After), within a bounded number of attempts;
3. record the outcome in the ledger, then publish exactly one status event
   (SENT/QUEUED with the provider id, or FAILED) with confirms, then ack.

A redelivered command whose ledger record is done re-publishes the recorded
status (same deterministic event id) instead of sending again. While a worker
sends, it keeps a short lease alive beside its claim: a copy of the command that
finds the claim pending and the lease alive is being sent elsewhere right now,
so it waits for that outcome. A pending claim with no live lease was
interrupted mid-call: unless the provider takes an idempotency key the outcome
is unknown, so it ends FAILED with reason ``ambiguous_send`` rather than risk a
duplicate send.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.delivery_pb2 import DeliveryState, DeliveryStatus
from gateway.api.v1.envelope_pb2 import Event
from gateway.contract.connector import Connector, ConnectorSpec, SendResult
from gateway.contract.errors import (
    AmbiguousSendError,
    BadRequestError,
    ConnectorError,
    PermanentError,
    TransientError,
)
from gateway.contract.ids import inbound_event_id
from gateway.runtime.bus import Delivery
from gateway.runtime.codec import decode_command
from gateway.runtime.config import SendSettings
from gateway.runtime.idempotency import Claim, ClaimState, IdempotencyStore
from gateway.runtime.publisher import EventPublisher
from gateway.runtime.telemetry import (
    DEAD_LETTERS,
    SEND_RETRIES,
    SENDS,
    extract_trace_context,
    get_logger,
    tracer,
)

log = get_logger("gateway.outbound")

#: How long a sender's lease outlives its last renewal. A crashed sender's
#: redelivered command waits at most this long before it is called ambiguous.
SEND_LEASE_SECONDS = 10.0
#: How often a waiting copy of a command looks for the other sender's outcome.
_POLL_SECONDS = 0.1


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
    now = Timestamp()
    now.FromDatetime(datetime.now(UTC))
    event = Event(
        id=inbound_event_id(
            command.provider,
            account or "-",
            "send",
            command.message_id,
            str(attempt),
            DeliveryState.Name(status.state),
        ),
        type="message.status",
        channel=command.channel,
        provider=command.provider,
        account=account,
        occurred_at=now,
        received_at=now,
        correlation_id=command.correlation_id,
        causation_id=command.message_id,
        conversation_id=command.conversation_id,
        status=status,
    )
    event.attributes.update(command.metadata)
    if attributes:
        event.attributes.update(attributes)
    return event


def _failed(exc: ConnectorError, *, permanent: bool) -> DeliveryStatus:
    return DeliveryStatus(
        state=DeliveryState.DELIVERY_STATE_FAILED,
        reason_code=exc.code,
        reason=str(exc)[:500],
        permanent=permanent,
    )


class CommandWorker:
    """Handles deliveries from one connector's command queue."""

    def __init__(
        self,
        spec: ConnectorSpec,
        connector: Connector,
        publisher: EventPublisher,
        ledger: IdempotencyStore,
        settings: SendSettings,
    ) -> None:
        self._spec, self._connector = spec, connector
        self._publisher, self._ledger, self._settings = publisher, ledger, settings
        self._sends = {o: SENDS.labels(spec.name, o) for o in ("sent", "failed", "replayed")}
        self._retries = SEND_RETRIES.labels(spec.name)
        self._dead_letters = DEAD_LETTERS.labels(spec.name)

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

    async def _send_with_retries(self, command: SendMessageCommand) -> SendResult:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._settings.max_attempts),
            wait=self._wait,
            retry=retry_if_exception(self._retryable),
            before_sleep=lambda _: self._retries.inc(),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._connector.send(command)
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    async def handle(self, delivery: Delivery) -> None:
        """Process one command delivery (the bus acks when this returns)."""
        try:
            command = decode_command(delivery)
            if (command.channel, command.provider) != (self._spec.channel, self._spec.provider):
                raise PermanentError(
                    f"command for {command.channel}.{command.provider} on {self._spec.name}"
                )
        except (BadRequestError, PermanentError):
            self._dead_letters.inc()  # the bus rejects it to the dead-letter exchange
            raise
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

    @asynccontextmanager
    async def _lease(self, key: str) -> AsyncIterator[None]:
        """Tell concurrent copies of this command that a live worker is sending it."""
        lease_key = f"lease:{key}"
        # Taken before the first await of the send, so a copy that finds the
        # claim pending finds the lease too.
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

    async def _process(self, command: SendMessageCommand) -> None:
        key = f"send:{self._spec.name}:{command.message_id}:{command.attempt or 1}"
        ttl = self._settings.record_ttl
        claim = await self._ledger.claim(key, ttl=ttl)
        if claim.state is ClaimState.PENDING:
            claim = await self._await_other_sender(key)
        if claim.state is ClaimState.DONE and claim.value is not None:
            record = json.loads(claim.value)
            status = DeliveryStatus()
            status.ParseFromString(bytes.fromhex(record["status"]))
            self._sends["replayed"].inc()
            log.info(
                "command already handled; re-publishing its status", message_id=command.message_id
            )
            await self._publisher.publish(
                status_event(
                    command,
                    account=record["account"],
                    status=status,
                    attributes=record.get("attributes"),
                )
            )
            return
        if claim.state is ClaimState.PENDING and not self._connector.manifest.idempotent_send:
            exc = AmbiguousSendError("a previous delivery of this command was interrupted mid-send")
            await self._finish(
                command, key, account=command.account, status=_failed(exc, permanent=False)
            )
            return
        async with self._lease(key):
            await self._send_claimed(command, key)

    async def _send_claimed(self, command: SendMessageCommand, key: str) -> None:
        """Send a command this worker holds the claim of, and record the outcome."""
        if command.HasField("expires_at") and command.expires_at.ToDatetime(
            tzinfo=UTC
        ) < datetime.now(UTC):
            status = DeliveryStatus(
                state=DeliveryState.DELIVERY_STATE_EXPIRED,
                reason_code="ttl_expired",
                reason="command expired before it was sent",
                permanent=True,
            )
            await self._finish(command, key, account=command.account, status=status)
            return
        try:
            result = await self._send_with_retries(command)
        except PermanentError as exc:
            status = _failed(exc, permanent=True)
        except AmbiguousSendError as exc:
            status = _failed(exc, permanent=False)
        except TransientError as exc:
            status = _failed(exc, permanent=False)
        else:
            status = DeliveryStatus(
                state=result.state,
                provider_status=result.provider_status,
                provider_message_id=result.provider_message_id,
                segments=result.segments,
            )
            await self._finish(
                command,
                key,
                account=result.account,
                status=status,
                attributes=dict(result.attributes),
            )
            return
        await self._finish(command, key, account=command.account, status=status)

    async def _finish(
        self,
        command: SendMessageCommand,
        key: str,
        *,
        account: str,
        status: DeliveryStatus,
        attributes: dict[str, str] | None = None,
    ) -> None:
        # Record first: if the status publish fails, the redelivered command
        # finds the record and re-publishes instead of sending again.
        record = {
            "account": account,
            "status": status.SerializeToString().hex(),
            "attributes": attributes or {},
        }
        await self._ledger.complete(key, json.dumps(record), ttl=self._settings.record_ttl)
        failed = status.state == DeliveryState.DELIVERY_STATE_FAILED
        self._sends["failed" if failed else "sent"].inc()
        log.info(
            "send finished",
            connector=self._spec.name,
            message_id=command.message_id,
            state=DeliveryState.Name(status.state),
            reason_code=status.reason_code or None,
        )
        await self._publisher.publish(
            status_event(command, account=account, status=status, attributes=attributes)
        )
