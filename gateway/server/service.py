"""The GatewayService servicer: send, timeline, listing, connectors, preview, stream,
and call commands.

Every handler raises :class:`~gateway.server.errors.RpcError` for an error
answer; :func:`_answer` turns it into a status with google.rpc details. A
handler honours the caller's deadline: the broker publish is bounded by what
is left of it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, TypeVar

import grpc
from grpc import aio
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from sqlalchemy.exc import SQLAlchemyError

from gateway.api.v1 import gateway_service_pb2_grpc
from gateway.api.v1.call_pb2 import CallCommand
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.gateway_service_pb2 import Adaptation as AdaptationPb
from gateway.api.v1.gateway_service_pb2 import (
    CallCommandState,
    GetCallCommandRequest,
    GetCallCommandResponse,
    GetMessageRequest,
    GetMessageResponse,
    ListConnectorsRequest,
    ListConnectorsResponse,
    ListMessagesRequest,
    ListMessagesResponse,
    PreviewMessageRequest,
    PreviewMessageResponse,
    SendCallCommandRequest,
    SendCallCommandResponse,
    SendMessageRequest,
    SendMessageResponse,
    StreamEventsRequest,
    StreamEventsResponse,
)
from gateway.api.v1.gateway_service_pb2 import ContentViolation as ContentViolationPb
from gateway.contract.errors import BadRequestError
from gateway.contract.ids import new_id
from gateway.contract.status import FINAL_STATES
from gateway.ledger.calls import CallCommandNotFoundError, CallCommandRecord
from gateway.ledger.models import (
    IdempotencyConflictError,
    InvalidPageTokenError,
    ListFilter,
    MessageNotFoundError,
    MessageRecord,
)
from gateway.ledger.store import Ledger
from gateway.runtime.bus import Bus, OutgoingMessage, PublishError
from gateway.runtime.codec import encode_call_command, encode_command
from gateway.runtime.telemetry import extract_trace_context, get_logger, tracer
from gateway.runtime.topology import (
    COMMANDS_EXCHANGE,
    call_command_routing_key,
    command_routing_key,
)
from gateway.server.calls import outbound_call_command, prepare_call, stored_command
from gateway.server.connectors import ConnectorDirectory
from gateway.server.content import Violation, adapt
from gateway.server.convert import outbound_message
from gateway.server.errors import RpcError, invalid
from gateway.server.events import EventHub
from gateway.server.metrics import CALL_COMMANDS, MESSAGES, RPC_SECONDS, RPCS
from gateway.server.sending import normalize_address, prepare_send

log = get_logger("gateway.server")
T = TypeVar("T")
#: Handlers pass their typed context to helpers that only abort or read the deadline.
Context = aio.ServicerContext[Any, Any]
SERVICE_NAME = "gateway.api.v1.GatewayService"
#: Publishing needs at least this much of the caller's deadline to be worth starting.
_MIN_PUBLISH_BUDGET = 0.05
_POLL = 0.05


async def _abort(context: Context, error: RpcError) -> NoReturn:
    status = error.to_status()
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


async def _answer(context: Context, method: str, work: Awaitable[T]) -> T:
    """Run a handler: within the deadline, errors as rich statuses, counted."""
    started = time.perf_counter()
    code = "OK"
    try:
        return await _within_deadline(work, context.time_remaining())
    except RpcError as exc:
        code = exc.code.name
        await _abort(context, exc)
    except asyncio.CancelledError:
        code = "CANCELLED"
        raise
    except Exception:
        code = "UNKNOWN"
        log.exception("unexpected error in handler", method=method)
        raise
    finally:
        RPCS.labels(method, code).inc()
        RPC_SECONDS.labels(method).observe(time.perf_counter() - started)


async def _within_deadline(work: Awaitable[T], remaining: float | None) -> T:
    """``work`` bounded by what is left of the caller's deadline (None: no deadline);
    a timeout or a ledger failure becomes an RpcError."""
    deadline = asyncio.timeout(remaining)
    try:
        async with deadline:
            return await work
    except TimeoutError as exc:
        if deadline.expired():
            raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from exc
        log.error("a dependency timed out", error=repr(exc))
        raise RpcError(grpc.StatusCode.UNAVAILABLE, "a dependency timed out") from exc
    except (SQLAlchemyError, OSError) as exc:
        # The database's own message may name hosts and users: log it, answer plainly.
        log.error("delivery ledger unavailable", error=repr(exc))
        raise RpcError(
            grpc.StatusCode.UNAVAILABLE,
            "the delivery ledger is unavailable; retry (with the same idempotency_key)",
            reason="LEDGER_UNAVAILABLE",
        ) from exc


def _budget(context: Context, limit: float) -> float:
    """Seconds an operation may take: ``limit``, cut to what is left of the deadline."""
    remaining = context.time_remaining()
    if remaining is None:
        return limit
    if remaining < _MIN_PUBLISH_BUDGET:
        raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "too little of the deadline is left")
    return min(limit, remaining - _MIN_PUBLISH_BUDGET / 2)


@contextmanager
def _server_span(context: Context, method: str) -> Iterator[Span]:
    """The RPC's server span; a caller that traces sends its W3C context as gRPC
    metadata, and the span joins its trace."""
    metadata: Mapping[str, str | bytes] = {
        item[0]: item[1] for item in context.invocation_metadata() or ()
    }
    with tracer().start_as_current_span(
        f"{SERVICE_NAME}/{method}",
        context=extract_trace_context(metadata),
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": SERVICE_NAME, "rpc.method": method},
    ) as span:
        yield span


def _span_error(span: Span, error: RpcError) -> None:
    span.set_status(Status(StatusCode.ERROR, error.message))
    span.set_attribute("rpc.grpc.status_code", error.code.value[0])


class GatewayServicer(gateway_service_pb2_grpc.GatewayServiceServicer):
    """``gateway.api.v1.GatewayService`` on a ledger, a bus and the connector registry."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        bus: Bus,
        directory: ConnectorDirectory,
        events: EventHub,
        publish_timeout: float,
        page_size: int = 50,
        max_page_size: int = 1000,
    ) -> None:
        self._ledger, self._directory, self._events = ledger, directory, events
        self._bus = bus
        self._publish_timeout = publish_timeout
        self._page_size, self._max_page_size = page_size, max_page_size

    # -- SendMessage -----------------------------------------------------------

    async def SendMessage(
        self,
        request: SendMessageRequest,
        context: aio.ServicerContext[SendMessageRequest, SendMessageResponse],
    ) -> SendMessageResponse:
        return await _answer(context, "SendMessage", self._send(request, context))

    async def _send(self, request: SendMessageRequest, context: Context) -> SendMessageResponse:
        with _server_span(context, "SendMessage") as span:
            try:
                prepared = prepare_send(
                    request, self._directory, message_id=new_id(), now=self._ledger.now()
                )
                trace_id = format(span.get_span_context().trace_id, "032x")
                try:
                    record, created = await self._ledger.accept(
                        prepared.new_message(request, trace_id=trace_id)
                    )
                except IdempotencyConflictError as exc:
                    raise RpcError(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"idempotency_key {request.idempotency_key!r} was used for a different "
                        "request: use a new key for new content",
                        reason="IDEMPOTENCY_KEY_REUSED",
                    ) from exc
                span.set_attribute("messaging.message.id", record.message_id)
                span.set_attribute("gateway.connector", f"{record.channel}.{record.provider}")
                span.set_attribute("gateway.idempotent_replay", not created)
                if created:
                    await self._dispatch(record.message_id, 1, prepared.command, context)
                elif not record.dispatched and record.state not in FINAL_STATES:
                    record = await self._redispatch(record, context)
            except RpcError as exc:
                _span_error(span, exc)
                raise
            MESSAGES.labels(
                f"{record.channel}.{record.provider}", "accepted" if created else "replayed"
            ).inc()
            log.info(
                "message accepted" if created else "idempotent replay",
                message_id=record.message_id,
                connector=f"{record.channel}.{record.provider}",
            )
            return SendMessageResponse(
                message_id=record.message_id,
                state=DeliveryState.ValueType(record.state),
                created=created,
                channel=record.channel,
                provider=record.provider,
                trace_id=record.trace_id,
            )

    async def _dispatch(
        self,
        message_id: str,
        attempt: int,
        command: SendMessageCommand,
        context: Context,
    ) -> None:
        """Publish the command with confirms, then note it in the ledger."""
        await self._publish_command(
            command_routing_key(command.channel, command.provider),
            lambda: encode_command(command),
            message_id,
            context,
            what="send command",
        )
        await self._ledger.mark_dispatched(message_id, attempt)

    async def _publish_command(
        self,
        routing_key: str,
        encode: Callable[[], tuple[str, OutgoingMessage]],
        message_id: str,
        context: Context,
        *,
        what: str,
    ) -> None:
        """Publish a command on ``channels.commands`` with confirms, within the
        caller's deadline; UNAVAILABLE when the broker does not confirm it."""
        timeout = _budget(context, self._publish_timeout)
        with tracer().start_as_current_span(
            f"publish {COMMANDS_EXCHANGE}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "send",
                "messaging.destination.name": COMMANDS_EXCHANGE,
                "messaging.rabbitmq.destination.routing_key": routing_key,
                "messaging.message.id": message_id,
            },
        ):
            # Encoded inside the producer span: its context is the command's traceparent.
            routing_key, outgoing = encode()
            try:
                await self._bus.publish(COMMANDS_EXCHANGE, routing_key, outgoing, timeout=timeout)
            except PublishError as exc:
                raise RpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the broker did not confirm the {what} ({exc}); it is recorded but not "
                    "sent: retry with the same idempotency_key to send it",
                    reason="PUBLISH_FAILED",
                ) from exc

    async def _first_publish_over(
        self, created_at: datetime, settled: Callable[[], Awaitable[bool]], context: Context
    ) -> bool:
        """For a repeated key whose command was never confirmed: wait until the
        first request (maybe on another replica) surely stopped publishing, so a
        slow confirm does not become a second command. True when ``settled()``
        (re-reading the ledger) says the command got confirmed or ended meanwhile;
        False when it is ours to publish now."""
        settle_at = created_at + timedelta(seconds=self._publish_timeout + 1.0)
        while not await settled():
            wait = (settle_at - self._ledger.now().astimezone(UTC)).total_seconds()
            if wait <= 0:
                return False
            remaining = context.time_remaining()
            if remaining is not None and remaining < wait + _MIN_PUBLISH_BUDGET:
                raise RpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    "the first request with this idempotency_key is still being published; "
                    "retry shortly with the same key",
                    reason="SEND_IN_PROGRESS",
                )
            await asyncio.sleep(min(_POLL, wait))
        return True

    async def _redispatch(self, record: MessageRecord, context: Context) -> MessageRecord:
        """A repeated key whose command was never confirmed: publish it now (once
        the first request surely gave up, see :meth:`_first_publish_over`)."""

        async def settled() -> bool:
            nonlocal record
            record = await self._ledger.get(record.message_id)
            return record.dispatched or record.state in FINAL_STATES

        if await self._first_publish_over(record.created_at, settled, context):
            return record
        command = await self._ledger.command_for(record.message_id, record.attempt)
        log.warning(
            "re-publishing a command that was never confirmed",
            message_id=record.message_id,
            attempt=record.attempt,
        )
        await self._dispatch(record.message_id, record.attempt, command, context)
        return await self._ledger.get(record.message_id)

    # -- call commands -----------------------------------------------------------

    async def SendCallCommand(
        self,
        request: SendCallCommandRequest,
        context: aio.ServicerContext[SendCallCommandRequest, SendCallCommandResponse],
    ) -> SendCallCommandResponse:
        return await _answer(context, "SendCallCommand", self._send_call(request, context))

    async def _send_call(
        self, request: SendCallCommandRequest, context: Context
    ) -> SendCallCommandResponse:
        with _server_span(context, "SendCallCommand") as span:
            try:
                prepared = prepare_call(
                    request,
                    self._directory,
                    command_id=request.command.command_id or new_id(),
                    now=self._ledger.now(),
                )
                trace_id = format(span.get_span_context().trace_id, "032x")
                try:
                    record, created = await self._ledger.accept_call_command(
                        prepared.new_call_command(request, trace_id=trace_id)
                    )
                except IdempotencyConflictError as exc:
                    raise RpcError(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"{exc}: use a new idempotency_key (and command_id) for a new command",
                        reason="IDEMPOTENCY_KEY_REUSED",
                    ) from exc
                span.set_attribute("messaging.message.id", record.command_id)
                span.set_attribute("gateway.connector", f"{record.channel}.{record.provider}")
                span.set_attribute("gateway.call.action", record.action)
                span.set_attribute("gateway.idempotent_replay", not created)
                if created:
                    await self._dispatch_call(prepared.command, context)
                elif not record.dispatched and record.pending:
                    record = await self._redispatch_call(record, context)
            except RpcError as exc:
                _span_error(span, exc)
                raise
            connector = f"{record.channel}.{record.provider}"
            CALL_COMMANDS.labels(connector, "accepted" if created else "replayed").inc()
            log.info(
                "call command sent" if created else "idempotent replay of a call command",
                command_id=record.command_id,
                action=record.action,
                connector=connector,
            )
            return SendCallCommandResponse(
                command_id=record.command_id,
                state=CallCommandState.ValueType(record.state),
                created=created,
                channel=record.channel,
                provider=record.provider,
                trace_id=record.trace_id,
            )

    async def _dispatch_call(self, command: CallCommand, context: Context) -> None:
        """Publish the call command with confirms, then note it in the ledger."""
        await self._publish_command(
            call_command_routing_key(command.channel, command.provider),
            lambda: encode_call_command(command),
            command.command_id,
            context,
            what="call command",
        )
        await self._ledger.mark_call_dispatched(command.command_id)

    async def _redispatch_call(
        self, record: CallCommandRecord, context: Context
    ) -> CallCommandRecord:
        """A repeated key whose call command was never confirmed: publish it now.
        The connector executes a command id at most once, so even a publish
        that raced a slow confirm cannot ring anyone twice."""

        async def settled() -> bool:
            nonlocal record
            record = await self._ledger.get_call_command(record.command_id)
            return record.dispatched or not record.pending

        if await self._first_publish_over(record.created_at, settled, context):
            return record
        command = stored_command(record)
        assert command is not None  # recorded by SendCallCommand, which stores it
        log.warning(
            "re-publishing a call command that was never confirmed", command_id=record.command_id
        )
        await self._dispatch_call(command, context)
        return await self._ledger.get_call_command(record.command_id)

    async def GetCallCommand(
        self,
        request: GetCallCommandRequest,
        context: aio.ServicerContext[GetCallCommandRequest, GetCallCommandResponse],
    ) -> GetCallCommandResponse:
        return await _answer(context, "GetCallCommand", self._get_call(request))

    async def _get_call(self, request: GetCallCommandRequest) -> GetCallCommandResponse:
        if not request.command_id:
            raise invalid([Violation("command_id", "required")])
        try:
            record = await self._ledger.get_call_command(request.command_id)
        except CallCommandNotFoundError as exc:
            raise RpcError(
                grpc.StatusCode.NOT_FOUND, f"no call command {request.command_id!r}"
            ) from exc
        return GetCallCommandResponse(call_command=outbound_call_command(record))

    # -- reads -----------------------------------------------------------------

    async def GetMessage(
        self,
        request: GetMessageRequest,
        context: aio.ServicerContext[GetMessageRequest, GetMessageResponse],
    ) -> GetMessageResponse:
        return await _answer(context, "GetMessage", self._get(request))

    async def _get(self, request: GetMessageRequest) -> GetMessageResponse:
        if not request.message_id:
            raise invalid([Violation("message_id", "required")])
        try:
            record = await self._ledger.get(request.message_id)
        except MessageNotFoundError as exc:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"no message {request.message_id!r}") from exc
        return GetMessageResponse(message=outbound_message(record, with_timeline=True))

    async def ListMessages(
        self,
        request: ListMessagesRequest,
        context: aio.ServicerContext[ListMessagesRequest, ListMessagesResponse],
    ) -> ListMessagesResponse:
        return await _answer(context, "ListMessages", self._list(request))

    async def _list(self, request: ListMessagesRequest) -> ListMessagesResponse:
        if request.page_size < 0:
            raise invalid([Violation("page_size", "must not be negative")])
        since = (
            request.created_after.ToDatetime(tzinfo=UTC)
            if request.HasField("created_after")
            else None
        )
        until = (
            request.created_before.ToDatetime(tzinfo=UTC)
            if request.HasField("created_before")
            else None
        )
        if since is not None and until is not None and since >= until:
            raise invalid([Violation("created_before", "must be after created_after")])
        flt = ListFilter(
            conversation_id=request.conversation_id,
            correlation_id=request.correlation_id,
            since=since,
            until=until,
        )
        try:
            # AIP-158: no size means the default; a larger one than allowed is capped.
            size = min(request.page_size or self._page_size, self._max_page_size)
            page = await self._ledger.list(flt, size, request.page_token)
        except InvalidPageTokenError as exc:
            raise invalid(
                [
                    Violation(
                        "page_token",
                        "not a token of this listing: pass next_page_token of the previous "
                        "page with the same filter",
                    )
                ]
            ) from exc
        return ListMessagesResponse(
            messages=[outbound_message(r, with_timeline=False) for r in page.messages],
            next_page_token=page.next_page_token,
        )

    async def ListConnectors(
        self,
        request: ListConnectorsRequest,
        context: aio.ServicerContext[ListConnectorsRequest, ListConnectorsResponse],
    ) -> ListConnectorsResponse:
        return await _answer(context, "ListConnectors", self._connectors(request))

    async def _connectors(self, request: ListConnectorsRequest) -> ListConnectorsResponse:
        return ListConnectorsResponse(connectors=await self._directory.describe(request.channel))

    # -- PreviewMessage ----------------------------------------------------------

    async def PreviewMessage(
        self,
        request: PreviewMessageRequest,
        context: aio.ServicerContext[PreviewMessageRequest, PreviewMessageResponse],
    ) -> PreviewMessageResponse:
        return await _answer(context, "PreviewMessage", self._preview(request))

    async def _preview(self, request: PreviewMessageRequest) -> PreviewMessageResponse:
        target = request.target
        if not target.channel:
            raise invalid([Violation("target.channel", "required, e.g. 'sms'")])
        spec = self._directory.resolve(target.channel, target.provider, field="target")
        adapted = adapt(request.message, spec.manifest)
        violations = list(adapted.violations)
        if target.address:
            try:
                normalize_address(target.channel, target.address)
            except BadRequestError as exc:
                violations.insert(0, Violation("target.address", str(exc)))
        if request.message.recipients:
            violations.insert(
                0, Violation("message.recipients", "must be empty: the target says whom to send to")
            )
        response = PreviewMessageResponse(
            channel=spec.channel,
            provider=spec.provider,
            message=adapted.message,
            adaptations=[
                AdaptationPb(kind=a.kind, field=a.field, description=a.description)
                for a in adapted.adaptations
            ],
            violations=[
                ContentViolationPb(field=v.field, description=v.description) for v in violations
            ],
        )
        if adapted.sms is not None:
            response.sms_segments = adapted.sms.segments
            response.sms_encoding = adapted.sms.encoding
            response.sms_units = adapted.sms.units
        return response

    # -- StreamEvents ------------------------------------------------------------

    async def StreamEvents(
        self,
        request: StreamEventsRequest,
        context: aio.ServicerContext[StreamEventsRequest, StreamEventsResponse],
    ) -> AsyncIterator[StreamEventsResponse]:
        started = time.perf_counter()
        code = "OK"
        try:
            async for item in self._events.stream(request.bindings, request.cursor):
                yield StreamEventsResponse(
                    event=item.event, routing_key=item.routing_key, cursor=item.cursor
                )
        except RpcError as exc:
            code = exc.code.name
            await _abort(context, exc)
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"  # the client went away
            raise
        finally:
            RPCS.labels("StreamEvents", code).inc()
            RPC_SECONDS.labels("StreamEvents").observe(time.perf_counter() - started)


__all__ = ["SERVICE_NAME", "GatewayServicer"]
