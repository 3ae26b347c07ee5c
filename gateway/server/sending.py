"""SendMessageRequest -> a validated, adapted send command and its fallback plan.

Pure functions (no I/O): every rule of SendMessage's validation lives here, so
the servicer only records and publishes. Validation runs in three rounds with
their own error codes: the request's shape (INVALID_ARGUMENT), the channels it
names (FAILED_PRECONDITION), the content against each target connector's
manifest (INVALID_ARGUMENT).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

from connectors.sms.addresses import sms_address
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.gateway_service_pb2 import ChannelIdentity, SendMessageRequest
from gateway.api.v1.gateway_service_pb2 import FallbackStep as FallbackStepPb
from gateway.api.v1.message_pb2 import Direction
from gateway.api.v1.participant_pb2 import Participant, ParticipantRole
from gateway.contract.connector import ConnectorSpec
from gateway.contract.errors import BadRequestError
from gateway.ledger.models import SUCCESS_STATES, FallbackPolicy, FallbackStep, NewMessage
from gateway.server.connectors import ConnectorDirectory
from gateway.server.content import Adapted, Violation, adapt
from gateway.server.errors import invalid

S = DeliveryState
MAX_IDEMPOTENCY_KEY = 255
MAX_ID = 128
MAX_METADATA = 64
MAX_METADATA_VALUE = 1024
MAX_IDENTITIES = 8
#: A fallback step without a wait waits this long.
DEFAULT_STEP_WAIT = timedelta(minutes=5)

#: Address normalizers by channel; a channel without one takes any non-empty address.
_ADDRESS_RULES: dict[str, Callable[[str], str]] = {"sms": sms_address}


@dataclass(frozen=True, kw_only=True)
class PreparedSend:
    """A request that passed validation: what to record and what to publish."""

    spec: ConnectorSpec
    address: str
    command: SendMessageCommand
    fallback: FallbackPolicy | None
    expires_at: datetime | None
    created_at: datetime
    fingerprint: str
    adapted: Adapted

    def new_message(self, request: SendMessageRequest, *, trace_id: str) -> NewMessage:
        """The ledger record of this send."""
        return NewMessage(
            idempotency_key=request.idempotency_key,
            message_id=self.command.message_id,
            channel=self.spec.channel,
            provider=self.spec.provider,
            address=self.address,
            conversation_id=request.conversation_id,
            correlation_id=request.correlation_id,
            metadata=dict(request.metadata),
            command=self.command.SerializeToString(),
            fallback=self.fallback,
            expires_at=self.expires_at,
            trace_id=trace_id,
            fingerprint=self.fingerprint,
            created_at=self.created_at,
        )


def fingerprint(request: SendMessageRequest) -> str:
    """Hash of everything in the request but its idempotency key, addresses
    normalized (``+44 7700 900123`` and ``+447700900123`` are one recipient).
    Call on a request whose addresses passed validation."""
    copy = SendMessageRequest()
    copy.CopyFrom(request)
    copy.idempotency_key = ""
    for _, identity in _identities(copy):
        identity.address = normalize_address(identity.channel, identity.address)
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


def _identities(request: SendMessageRequest) -> list[tuple[str, ChannelIdentity]]:
    """(field path, identity) of the recipient, in order."""
    target = request.recipient.WhichOneof("target")
    if target == "address":
        return [("recipient.address", request.recipient.address)]
    if target == "identities":
        return [
            (f"recipient.identities.identities[{i}]", identity)
            for i, identity in enumerate(request.recipient.identities.identities)
        ]
    return []


def normalize_address(channel: str, address: str) -> str:
    """The normalized address on ``channel`` (BadRequestError when it is not one)."""
    rule = _ADDRESS_RULES.get(channel)
    return rule(address) if rule is not None else address.strip()


def _step_identity(
    step: FallbackStepPb, identities: list[tuple[str, ChannelIdentity]]
) -> tuple[str, ChannelIdentity] | None:
    """The recipient's identity a fallback step sends to: the first on its channel
    (and its provider, when the step names one), with the step's provider applied."""
    for path, identity in identities:
        if identity.channel != step.channel:
            continue
        if step.provider and identity.provider not in ("", step.provider):
            continue
        if step.provider and not identity.provider:
            chosen = ChannelIdentity()
            chosen.CopyFrom(identity)
            chosen.provider = step.provider
            return path, chosen
        return path, identity
    return None


def check_idempotency_key(key: str) -> list[Violation]:
    """Violations of a request's ``idempotency_key`` (required, bounded)."""
    if not key:
        return [Violation("idempotency_key", "required: the same key never sends twice")]
    if len(key) > MAX_IDEMPOTENCY_KEY:
        return [Violation("idempotency_key", f"at most {MAX_IDEMPOTENCY_KEY} characters")]
    return []


def check_context(
    correlation_id: str, conversation_id: str, metadata: Mapping[str, str], *, prefix: str
) -> list[Violation]:
    """Violations of the ids and metadata echoed on a send's events (``prefix``: the
    field path of the message holding them, e.g. ``"command."``)."""
    v: list[Violation] = []
    for name, value in (("correlation_id", correlation_id), ("conversation_id", conversation_id)):
        if len(value) > MAX_ID:
            v.append(Violation(f"{prefix}{name}", f"at most {MAX_ID} characters"))
    if len(metadata) > MAX_METADATA:
        v.append(Violation(f"{prefix}metadata", f"at most {MAX_METADATA} entries"))
    for k, value in metadata.items():
        if not k or len(k) > MAX_ID or len(value) > MAX_METADATA_VALUE:
            v.append(
                Violation(
                    f"{prefix}metadata[{k!r}]",
                    f"keys 1..{MAX_ID} characters, values at most {MAX_METADATA_VALUE}",
                )
            )
    return v


def _check_shape(request: SendMessageRequest) -> list[Violation]:
    v = check_idempotency_key(request.idempotency_key)
    identities = _identities(request)
    if request.recipient.WhichOneof("target") is None:
        v.append(Violation("recipient", "required: an address, or a list of identities"))
    elif not identities:
        v.append(Violation("recipient.identities.identities", "at least one identity"))
    elif len(identities) > MAX_IDENTITIES:
        v.append(Violation("recipient.identities.identities", f"at most {MAX_IDENTITIES}"))
    for path, identity in identities:
        if not identity.channel:
            v.append(Violation(f"{path}.channel", "required, e.g. 'sms'"))
        if not identity.address:
            v.append(Violation(f"{path}.address", "required"))
        elif len(identity.address) > 320:
            v.append(Violation(f"{path}.address", "at most 320 characters"))
        else:
            try:
                normalize_address(identity.channel, identity.address)
            except BadRequestError as exc:
                v.append(Violation(f"{path}.address", str(exc)))
    if not request.HasField("message"):
        v.append(Violation("message", "required: the content to send"))
    elif request.message.recipients:
        v.append(
            Violation(
                "message.recipients", "must be empty: the recipient field says whom to send to"
            )
        )
    v += check_context(request.correlation_id, request.conversation_id, request.metadata, prefix="")
    if request.ttl.seconds < 0 or request.ttl.nanos < 0:
        v.append(Violation("ttl", "must not be negative"))
    if request.HasField("fallback"):
        steps = request.fallback.steps
        if not steps:
            v.append(Violation("fallback.steps", "at least one step"))
        if request.fallback.ttl.seconds < 0 or request.fallback.ttl.nanos < 0:
            v.append(Violation("fallback.ttl", "must not be negative"))
        for i, step in enumerate(steps):
            path = f"fallback.steps[{i}]"
            where = f"{step.channel}.{step.provider}" if step.provider else repr(step.channel)
            if any((e.channel, e.provider) == (step.channel, step.provider) for e in steps[:i]):
                v.append(Violation(f"{path}.channel", f"{where} is an earlier step too"))
            elif _step_identity(step, identities) is None:
                v.append(Violation(f"{path}.channel", f"the recipient has no identity on {where}"))
            state = step.success_state or S.DELIVERY_STATE_DELIVERED
            if state not in SUCCESS_STATES:
                v.append(Violation(f"{path}.success_state", "SENT, DELIVERED or READ"))
            if step.wait.seconds < 0 or step.wait.nanos < 0:
                v.append(Violation(f"{path}.wait", "must not be negative"))
    return v


def prepare_send(
    request: SendMessageRequest,
    directory: ConnectorDirectory,
    *,
    message_id: str,
    now: datetime,
) -> PreparedSend:
    """Validate ``request`` and build its first command and fallback plan.

    Raises :class:`~gateway.server.errors.RpcError` (INVALID_ARGUMENT or
    FAILED_PRECONDITION).
    """
    violations = _check_shape(request)
    if violations:
        raise invalid(violations)
    identities = _identities(request)
    # The plan: (field path, identity, success state, wait) per step, in order.
    plan: list[tuple[str, ChannelIdentity, int, timedelta]]
    if request.HasField("fallback"):
        plan = []
        for step in request.fallback.steps:
            found = _step_identity(step, identities)
            assert found is not None  # checked by _check_shape
            plan.append(
                (
                    *found,
                    step.success_state or S.DELIVERY_STATE_DELIVERED,
                    step.wait.ToTimedelta() or DEFAULT_STEP_WAIT,
                )
            )
    else:
        plan = [
            (path, identity, S.DELIVERY_STATE_DELIVERED, DEFAULT_STEP_WAIT)
            for path, identity in identities
        ]
    specs = [
        directory.resolve(identity.channel, identity.provider, field=path)
        for path, identity, _, _ in plan
    ]
    primary = plan[0][1]
    adapted = adapt(request.message, specs[0].manifest)
    violations = list(adapted.violations)
    for spec in specs[1:]:
        # Fallback steps send the same content: it must be sendable there too.
        for item in adapt(request.message, spec.manifest).violations:
            violation = Violation(item.field, f"fallback to {spec.name}: {item.description}")
            if violation not in violations:
                violations.append(violation)
    if violations:
        raise invalid(violations)

    addresses = [
        normalize_address(identity.channel, identity.address) for _, identity, _, _ in plan
    ]
    fallback: FallbackPolicy | None = None
    ttl = request.ttl.ToTimedelta()
    if len(plan) > 1:
        policy_ttl = request.fallback.ttl.ToTimedelta() if request.HasField("fallback") else None
        fallback = FallbackPolicy(
            steps=[
                FallbackStep(
                    channel=spec.channel,
                    provider=spec.provider,
                    address=address,
                    success_state=state,
                    wait=wait,
                )
                for spec, address, (_, _, state, wait) in zip(specs, addresses, plan, strict=True)
            ],
            ttl=policy_ttl or ttl or None,
        )
    expires_at = now + ttl if ttl else None

    message = adapted.message
    message.direction = Direction.DIRECTION_OUTBOUND
    del message.recipients[:]
    message.recipients.append(
        Participant(
            channel=primary.channel,
            address=addresses[0],
            display_name=primary.display_name,
            role=ParticipantRole.PARTICIPANT_ROLE_CUSTOMER,
        )
    )
    created = Timestamp()
    created.FromDatetime(now)
    command = SendMessageCommand(
        message_id=message_id,
        channel=specs[0].channel,
        provider=specs[0].provider,
        account=primary.account,
        message=message,
        correlation_id=request.correlation_id,
        conversation_id=request.conversation_id,
        metadata=dict(request.metadata),
        attempt=1,
        created_at=created,
    )
    if expires_at is not None:
        command.expires_at.FromDatetime(expires_at)
    return PreparedSend(
        spec=specs[0],
        address=addresses[0],
        command=command,
        fallback=fallback,
        expires_at=expires_at,
        created_at=now,
        fingerprint=fingerprint(request),
        adapted=adapted,
    )
