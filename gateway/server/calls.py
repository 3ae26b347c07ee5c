"""SendCallCommandRequest -> a validated, normalized CallCommand; ledger record -> protobuf.

Pure functions (no I/O), in the three rounds of SendMessage's validation: the
request's shape (INVALID_ARGUMENT: required fields of each action, E.164 or
``sip:`` targets, bounded strings), the connector it names (FAILED_PRECONDITION:
unknown or disabled, or one that executes no call commands), and the action
against the connector's manifest (INVALID_ARGUMENT when ``call_actions`` lacks
it). Phone numbers are published normalized to E.164, so the connector and
every consumer of the outcome see one spelling.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import grpc

from gateway.api.v1.call_pb2 import (
    CallCommand,
    EnqueueCall,
    HangUpCall,
    PlaceCall,
    SpeakToCall,
    TransferCall,
)
from gateway.api.v1.gateway_service_pb2 import (
    CallCommandState,
    OutboundCallCommand,
    SendCallCommandRequest,
)
from gateway.contract.addresses import normalize_phone
from gateway.contract.connector import ConnectorSpec
from gateway.contract.errors import BadRequestError
from gateway.ledger.calls import CallCommandRecord, NewCallCommand
from gateway.server.connectors import ConnectorDirectory
from gateway.server.content import Violation
from gateway.server.convert import timestamp
from gateway.server.errors import RpcError, invalid
from gateway.server.sending import check_context, check_idempotency_key

#: The channel of a command that names none ("Always 'voice' today", call.proto).
DEFAULT_CHANNEL = "voice"
ACTIONS = ("place", "transfer", "enqueue", "speak", "hang_up")
#: Caller-chosen command ids: the ledger key and an AMQP message id, so no spaces.
_COMMAND_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_SIP = re.compile(r"^sips?:[^\s<>]+$")
_THEN_STEP = re.compile(r"^[^/\s]+/[^/\s]+$")
MAX_CALL_ID = 255
MAX_NAME = 128
MAX_ACCOUNT = 64
MAX_SAY = 4096
MAX_URL = 2048
MAX_LANGUAGE = 35
MAX_VOICE = 64
#: Twilio and Vonage both ring for at most 600 seconds.
MAX_RING_TIMEOUT = 600


def call_target(raw: str) -> str:
    """An E.164 number (normalized) or a ``sip:``/``sips:`` URI; BadRequestError otherwise.

    A number without ``+`` is refused rather than read in some country.
    """
    value = raw.strip()
    if _SIP.match(value):
        return value
    if not value.startswith("+"):
        raise BadRequestError("must be an E.164 number (+...) or a sip: URI")
    return normalize_phone(value)


def _e164(raw: str) -> str:
    value = raw.strip()
    if not value.startswith("+"):
        raise BadRequestError("must be an E.164 number (+...)")
    return normalize_phone(value)


class _Checker:
    """Collects the violations of one command and normalizes its fields in place."""

    def __init__(self) -> None:
        self.violations: list[Violation] = []

    def add(self, field: str, description: str) -> None:
        self.violations.append(Violation(field, description))

    def required(self, field: str, value: str, limit: int, what: str = "required") -> bool:
        if not value:
            self.add(field, what)
            return False
        if len(value) > limit:
            self.add(field, f"at most {limit} characters")
            return False
        return True

    def bounded(self, field: str, value: str, limit: int) -> None:
        if len(value) > limit:
            self.add(field, f"at most {limit} characters")

    def target(
        self, field: str, value: str, *, optional: bool = False, phone_only: bool = False
    ) -> str:
        """``value`` normalized (unchanged when invalid: the violation says why)."""
        if not value and optional:
            return value
        if not self.required(field, value, 320, "required: an E.164 number or a sip: URI"):
            return value
        try:
            return _e164(value) if phone_only else call_target(value)
        except BadRequestError as exc:
            self.add(field, str(exc))
            return value

    def script(self, path: str, message: PlaceCall | SpeakToCall, *, flows: bool) -> None:
        which = message.WhichOneof("script")
        if which is None:
            options = "flow, say or play_url" if flows else "say or play_url"
            self.add(f"{path}.script", f"required: one of {options}")
        elif which == "flow" and isinstance(message, PlaceCall):
            self.required(f"{path}.flow", message.flow, MAX_NAME)
        elif which == "say":
            self.required(f"{path}.say", message.say, MAX_SAY, "must not be empty")
        elif which == "play_url":
            url = message.play_url
            if self.required(f"{path}.play_url", url, MAX_URL, "must not be empty"):
                parts = urlsplit(url)
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    self.add(f"{path}.play_url", "must be an http(s) URL")
        self.bounded(f"{path}.language", message.language, MAX_LANGUAGE)
        self.bounded(f"{path}.voice", message.voice, MAX_VOICE)

    def place(self, path: str, place: PlaceCall) -> None:
        place.to = self.target(f"{path}.to", place.to)
        setattr(
            place,
            "from",
            self.target(f"{path}.from", getattr(place, "from"), optional=True, phone_only=True),
        )
        self.script(path, place, flows=True)
        if place.ring_timeout_seconds > MAX_RING_TIMEOUT:
            self.add(f"{path}.ring_timeout_seconds", f"at most {MAX_RING_TIMEOUT}")

    def transfer(self, path: str, transfer: TransferCall) -> None:
        self.required(f"{path}.call_id", transfer.call_id, MAX_CALL_ID)
        transfer.to = self.target(f"{path}.to", transfer.to)
        transfer.caller_id = self.target(
            f"{path}.caller_id", transfer.caller_id, optional=True, phone_only=True
        )

    def enqueue(self, path: str, enqueue: EnqueueCall) -> None:
        self.required(f"{path}.call_id", enqueue.call_id, MAX_CALL_ID)
        self.required(f"{path}.queue", enqueue.queue, MAX_NAME)

    def speak(self, path: str, speak: SpeakToCall) -> None:
        self.required(f"{path}.call_id", speak.call_id, MAX_CALL_ID)
        self.script(path, speak, flows=False)
        if speak.then_step and not _THEN_STEP.match(speak.then_step):
            self.add(f"{path}.then_step", "must be '<flow>/<step>' (empty hangs up)")

    def hang_up(self, path: str, hang_up: HangUpCall) -> None:
        self.required(f"{path}.call_id", hang_up.call_id, MAX_CALL_ID)


@dataclass(frozen=True, kw_only=True)
class PreparedCall:
    """A request that passed validation: what to record and what to publish."""

    spec: ConnectorSpec
    #: The command to publish: normalized, with its id, connector and created_at.
    command: CallCommand
    action: str
    fingerprint: str
    expires_at: datetime | None

    def new_call_command(self, request: SendCallCommandRequest, *, trace_id: str) -> NewCallCommand:
        """The ledger record of this command."""
        command = self.command
        return NewCallCommand(
            idempotency_key=request.idempotency_key,
            command_id=command.command_id,
            channel=command.channel,
            provider=command.provider,
            account=command.account,
            action=self.action,
            command=command.SerializeToString(),
            fingerprint=self.fingerprint,
            correlation_id=command.correlation_id,
            conversation_id=command.conversation_id,
            trace_id=trace_id,
            expires_at=self.expires_at,
            created_at=command.created_at.ToDatetime(tzinfo=UTC),
        )


def prepare_call(
    request: SendCallCommandRequest,
    directory: ConnectorDirectory,
    *,
    command_id: str,
    now: datetime,
) -> PreparedCall:
    """Validate ``request`` and build the command to publish (``command_id`` is the
    request's own, or the one the gateway assigns).

    Raises :class:`~gateway.server.errors.RpcError` (INVALID_ARGUMENT or
    FAILED_PRECONDITION).
    """
    check = _Checker()
    check.violations += check_idempotency_key(request.idempotency_key)
    if not request.HasField("command"):
        check.add("command", "required: the call command to send")
        raise invalid(check.violations)
    command = CallCommand()
    command.CopyFrom(request.command)
    if command.command_id and not _COMMAND_ID.match(command.command_id):
        check.add(
            "command.command_id",
            "1..128 letters, digits and . _ : @ - (or empty: the gateway assigns one)",
        )
    check.bounded("command.account", command.account, MAX_ACCOUNT)
    check.bounded("command.channel", command.channel, MAX_ACCOUNT)
    check.bounded("command.provider", command.provider, MAX_ACCOUNT)
    check.violations += check_context(
        command.correlation_id, command.conversation_id, command.metadata, prefix="command."
    )
    if command.HasField("expires_at") and command.expires_at.ToDatetime(tzinfo=UTC) <= now:
        check.add("command.expires_at", "already passed")
    action = command.WhichOneof("action")
    if action is None:
        check.add("command.action", f"required: one of {', '.join(ACTIONS)}")
    else:
        getattr(check, action)(f"command.{action}", getattr(command, action))
    if check.violations:
        raise invalid(check.violations)

    # Before the gateway fills in what the caller left out: a retry of the same
    # request (without an id, with numbers spelled differently) matches.
    fingerprint_copy = SendCallCommandRequest(command=command)
    fingerprint_copy.command.ClearField("created_at")
    fingerprint = hashlib.sha256(fingerprint_copy.SerializeToString(deterministic=True)).hexdigest()

    spec = directory.resolve(command.channel or DEFAULT_CHANNEL, command.provider, field="command")
    actions = list(spec.manifest.call_actions)
    if not actions:
        raise RpcError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"connector {spec.name} executes no call commands (its manifest lists no call_actions)",
            reason="CALL_COMMANDS_UNSUPPORTED",
        )
    assert action is not None  # checked above
    if action not in actions:
        raise invalid(
            [
                Violation(
                    f"command.{action}",
                    f"{spec.name} does not execute {action!r} (it executes: {', '.join(actions)})",
                )
            ]
        )
    command.command_id = command_id
    command.channel, command.provider = spec.channel, spec.provider
    command.created_at.FromDatetime(now)
    return PreparedCall(
        spec=spec,
        command=command,
        action=action,
        fingerprint=fingerprint,
        expires_at=command.expires_at.ToDatetime(tzinfo=UTC)
        if command.HasField("expires_at")
        else None,
    )


def stored_command(record: CallCommandRecord) -> CallCommand | None:
    """The command a record holds (None for a command known only from its outcome)."""
    if not record.command:
        return None
    command = CallCommand()
    command.ParseFromString(record.command)
    return command


def outbound_call_command(record: CallCommandRecord) -> OutboundCallCommand:
    """The API view of a ledger record."""
    out = OutboundCallCommand(
        command_id=record.command_id,
        idempotency_key=record.idempotency_key,
        state=CallCommandState.ValueType(record.state),
        channel=record.channel,
        provider=record.provider,
        account=record.account,
        action=record.action,
        call_id=record.call_id,
        provider_status=record.provider_status,
        reason_code=record.reason_code,
        reason=record.reason,
        permanent=record.permanent,
        dispatched=record.dispatched,
        correlation_id=record.correlation_id,
        conversation_id=record.conversation_id,
        trace_id=record.trace_id,
        outcome_event_id=record.outcome_event_id,
        created_at=timestamp(record.created_at),
        updated_at=timestamp(record.updated_at),
        completed_at=timestamp(record.completed_at),
        expires_at=timestamp(record.expires_at),
    )
    command = stored_command(record)
    if command is not None:
        out.command.CopyFrom(command)
    return out
