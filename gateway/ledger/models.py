"""Value types of the delivery ledger (plain dataclasses, no SQLAlchemy).

These are the ledger's public vocabulary: the gRPC server maps them to and
from protobuf, the fallback engine and the status ingestor pass them around.
States are ``gateway.api.v1.DeliveryState`` integers throughout.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.contract.ids import new_id

S = DeliveryState

#: States a fallback step may wait for (``FallbackStep.success_state``).
SUCCESS_STATES: frozenset[int] = frozenset(
    {S.DELIVERY_STATE_SENT, S.DELIVERY_STATE_DELIVERED, S.DELIVERY_STATE_READ}
)

#: States that reject a send on a channel: the fallback moves on at once.
REJECTED_STATES: frozenset[int] = frozenset(
    {
        S.DELIVERY_STATE_FAILED,
        S.DELIVERY_STATE_UNDELIVERED,
        S.DELIVERY_STATE_EXPIRED,
        S.DELIVERY_STATE_CANCELED,
    }
)

#: ``reason_code`` of the final FAILED status when every fallback channel was
#: tried (the contract has no dedicated state for it).
REASON_FALLBACK_EXHAUSTED = "fallback_exhausted"
#: ``reason_code`` of the final EXPIRED status when the fallback TTL ran out.
REASON_FALLBACK_TTL = "fallback_ttl_expired"
#: ``reason_code`` of a SWITCHING_CHANNEL entry caused by a rejection.
REASON_REJECTED = "channel_rejected"
#: ``reason_code`` of a SWITCHING_CHANNEL entry caused by the step's wait running out.
REASON_TIMEOUT = "channel_timeout"
#: ``reason_code`` of the ACCEPTED entry of an explicit retry.
REASON_RETRY = "retry"
#: ``reason_code`` of a LATE_DELIVERY entry.
REASON_LATE_DELIVERY = "late_delivery"


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the default ledger clock)."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """``value`` as aware UTC; naive datetimes are taken to be UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def success_reached(state: int, success_state: int) -> bool:
    """True when ``state`` is at least ``success_state`` on SENT < DELIVERED < READ."""
    order = (S.DELIVERY_STATE_SENT, S.DELIVERY_STATE_DELIVERED, S.DELIVERY_STATE_READ)
    if state not in order:
        return False
    return order.index(state) >= order.index(success_state)


class EntryKind(enum.StrEnum):
    """What a timeline entry records."""

    #: The message's state changed to ``state`` (including SWITCHING_CHANNEL
    #: and the ACCEPTED of a new fallback attempt).
    TRANSITION = "transition"
    #: A status of an attempt that does not (or no longer) drive the message
    #: state: e.g. the rejection that triggers a fallback switch, or a SENT of
    #: the first channel after the switch.
    ATTEMPT = "attempt"
    #: A channel given up on delivered after the switch: downstream should
    #: suppress the duplicate. ``state`` is the delivered state, ``attempt``
    #: the old attempt.
    LATE_DELIVERY = "late_delivery"


@dataclass(frozen=True, kw_only=True)
class FallbackStep:
    """One channel to try: where to send and what counts as success, how long to wait."""

    channel: str
    provider: str
    address: str
    #: SENT, DELIVERED or READ (a DeliveryState value).
    success_state: int = S.DELIVERY_STATE_DELIVERED
    #: How long to wait for ``success_state`` before switching to the next step.
    wait: timedelta = timedelta(minutes=5)

    def __post_init__(self) -> None:
        if not self.channel or not self.provider or not self.address:
            raise ValueError("a fallback step needs a channel, a provider and an address")
        if self.success_state not in SUCCESS_STATES:
            raise ValueError(
                f"fallback success_state must be SENT, DELIVERED or READ, got {self.success_state}"
            )
        if self.wait <= timedelta(0):
            raise ValueError("a fallback step's wait must be positive")


@dataclass(frozen=True, kw_only=True)
class FallbackPolicy:
    """Ordered channels to try. ``steps[0]`` is the first send (the message's own
    channel, provider and address); each later step is tried when the previous
    one is rejected or its wait runs out. ``ttl`` bounds the whole thing:
    past ``created_at + ttl`` no further channel is tried and the message
    ends EXPIRED (reason ``fallback_ttl_expired``) unless it already succeeded.
    """

    steps: Sequence[FallbackStep]
    ttl: timedelta | None = None

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError("a fallback policy needs at least one step")
        if self.ttl is not None and self.ttl <= timedelta(0):
            raise ValueError("a fallback policy's ttl must be positive")
        object.__setattr__(self, "steps", tuple(self.steps))

    def to_json(self) -> dict[str, object]:
        """JSON-able form stored with the message."""
        return {
            "ttl": self.ttl.total_seconds() if self.ttl is not None else None,
            "steps": [
                {
                    "channel": s.channel,
                    "provider": s.provider,
                    "address": s.address,
                    "success_state": s.success_state,
                    "wait": s.wait.total_seconds(),
                }
                for s in self.steps
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> FallbackPolicy:
        """Inverse of :meth:`to_json`."""
        raw_steps = data.get("steps")
        if not isinstance(raw_steps, list):
            raise ValueError("stored fallback policy has no steps")
        steps = [
            FallbackStep(
                channel=str(s["channel"]),
                provider=str(s["provider"]),
                address=str(s["address"]),
                success_state=int(s["success_state"]),
                wait=timedelta(seconds=float(s["wait"])),
            )
            for s in raw_steps
        ]
        ttl = data.get("ttl")
        return cls(
            steps=steps,
            ttl=timedelta(seconds=float(ttl)) if isinstance(ttl, int | float) else None,
        )


@dataclass(frozen=True, kw_only=True)
class NewMessage:
    """What :meth:`Ledger.accept` records: one outbound message, before it is sent.

    ``command`` is the serialized ``SendMessageCommand`` of the first attempt;
    the fallback engine derives the commands of later steps from it (changing
    channel, provider, recipient address and attempt), so it must be set for
    messages with a fallback policy. ``fingerprint`` (optional) identifies the
    request's content: re-using an idempotency key with a different
    fingerprint raises :class:`IdempotencyConflictError`.
    """

    idempotency_key: str
    channel: str
    provider: str
    address: str
    message_id: str = field(default_factory=new_id)
    conversation_id: str = ""
    correlation_id: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    command: bytes = b""
    fallback: FallbackPolicy | None = None
    expires_at: datetime | None = None
    trace_id: str = ""
    fingerprint: str = ""
    #: Defaults to the ledger clock.
    created_at: datetime | None = None

    def __post_init__(self) -> None:
        if not self.idempotency_key:
            raise ValueError("idempotency_key is required")
        if len(self.idempotency_key) > 255:
            raise ValueError("idempotency_key is longer than 255 characters")
        if not self.message_id or not self.channel or not self.provider:
            raise ValueError("message_id, channel and provider are required")
        if self.fallback is not None:
            first = self.fallback.steps[0]
            if (first.channel, first.provider, first.address) != (
                self.channel,
                self.provider,
                self.address,
            ):
                raise ValueError(
                    "the fallback policy's first step must be the message's own channel, "
                    "provider and address"
                )
            if not self.command:
                raise ValueError("a message with a fallback policy needs its command")


@dataclass(frozen=True, kw_only=True)
class StatusUpdate:
    """A status to apply (the fields of a ``message.status`` event).

    Identify the message by ``message_id`` or, for callbacks that carry only
    the provider's id, by ``provider_message_id``. ``event_id`` makes
    re-delivery idempotent; when empty, a deterministic id is derived from the
    other fields. ``attempt`` 0 means unknown (matched by provider id, then
    channel/provider, then the current attempt).
    """

    state: int
    message_id: str = ""
    provider_message_id: str = ""
    provider_status: str = ""
    reason_code: str = ""
    reason: str = ""
    permanent: bool = False
    channel: str = ""
    provider: str = ""
    attempt: int = 0
    trace_id: str = ""
    occurred_at: datetime | None = None
    event_id: str = ""

    def __post_init__(self) -> None:
        if self.state not in DeliveryState.values() or self.state == S.DELIVERY_STATE_UNSPECIFIED:
            raise ValueError(f"invalid delivery state {self.state!r}")
        if not self.message_id and not self.provider_message_id:
            raise ValueError("a status needs a message_id or a provider_message_id")
        if self.attempt < 0:
            raise ValueError("attempt must not be negative")


@dataclass(frozen=True, kw_only=True)
class StatusEntry:
    """One timeline entry of a message, in the order the ledger recorded them."""

    seq: int
    kind: EntryKind
    state: int
    attempt: int
    channel: str
    provider: str
    provider_status: str = ""
    reason_code: str = ""
    reason: str = ""
    permanent: bool = False
    provider_message_id: str = ""
    trace_id: str = ""
    event_id: str = ""
    #: When the provider / gateway says it happened (may be out of order).
    occurred_at: datetime | None = None
    #: When the ledger recorded it (monotonic with ``seq`` within a process).
    recorded_at: datetime


@dataclass(frozen=True, kw_only=True)
class Attempt:
    """One send of the message on one channel (attempt 1 is the first send)."""

    attempt: int
    channel: str
    provider: str
    address: str
    state: int
    provider_message_id: str
    #: True once the command of this attempt was confirmed by the broker
    #: (see :meth:`Ledger.mark_dispatched`).
    dispatched: bool
    created_at: datetime


@dataclass(frozen=True, kw_only=True)
class MessageRecord:
    """An outbound message, its current state and (from ``get``) its timeline.

    ``channel``/``provider``/``address``/``attempt``/``provider_message_id``
    are those of the current attempt. ``fallback_active`` is True while the
    fallback engine still holds a timer for the message.
    """

    message_id: str
    idempotency_key: str
    state: int
    channel: str
    provider: str
    address: str
    attempt: int
    provider_message_id: str
    conversation_id: str
    correlation_id: str
    metadata: Mapping[str, str]
    command: bytes
    fallback: FallbackPolicy | None
    fallback_active: bool
    expires_at: datetime | None
    trace_id: str
    reason_code: str
    reason: str
    #: True when a channel given up on delivered after the switch.
    late_delivery: bool
    created_at: datetime
    updated_at: datetime
    attempts: tuple[Attempt, ...] = ()
    #: Ordered timeline; empty in list results (fetch with ``get``).
    timeline: tuple[StatusEntry, ...] = ()

    @property
    def state_name(self) -> str:
        """The state's enum name, e.g. ``DELIVERY_STATE_DELIVERED``."""
        return DeliveryState.Name(self.state)  # type: ignore[arg-type]

    @property
    def dispatched(self) -> bool:
        """True when the current attempt's command was confirmed by the broker."""
        return any(a.dispatched for a in self.attempts if a.attempt == self.attempt)


@dataclass(frozen=True, kw_only=True)
class ListFilter:
    """Filter of :meth:`Ledger.list`; empty fields do not filter.

    ``since`` is inclusive and ``until`` exclusive, on ``created_at``.
    """

    conversation_id: str = ""
    correlation_id: str = ""
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True, kw_only=True)
class Page:
    """One page of :meth:`Ledger.list` (newest first).

    ``next_page_token`` is empty on the last page; pass it back with the same
    filter to get the next page (AIP-158).
    """

    messages: tuple[MessageRecord, ...]
    next_page_token: str


@dataclass(frozen=True, kw_only=True)
class Timer:
    """A persisted fallback timer: ``message_id`` needs the engine at ``due_at``."""

    message_id: str
    due_at: datetime
    #: The attempt the timer was set for (a stale timer is recognised by it).
    attempt: int


@dataclass(frozen=True, kw_only=True)
class Applied:
    """What :meth:`gateway.ledger.Ledger.record_status` did with one status.

    ``entries`` are the timeline entries it appended (empty for a duplicate,
    a stale status or a pending one); ``record`` is None while the message is
    unknown (the status is kept as pending).
    """

    record: MessageRecord | None
    entries: tuple[StatusEntry, ...] = ()
    duplicate: bool = False
    pending: bool = False
    #: True when the status made a fallback timer due now (wake the engine).
    fallback_due: bool = False
    #: Pending statuses this one (or its batch) let through: they were applied
    #: now, and their entries are news too (e.g. a late delivery).
    released: tuple[Applied, ...] = ()


class LedgerError(Exception):
    """Base of the ledger's errors."""


class IdempotencyConflictError(LedgerError):
    """The idempotency key was used before for a different request, or the
    message id is taken by another key."""


class InvalidPageTokenError(LedgerError, ValueError):
    """A page token that this ledger did not issue, or for another filter."""


class MessageNotFoundError(LedgerError, LookupError):
    """No message with that id."""


class NotRetryableError(LedgerError):
    """Only a message in a failed final state can be retried."""
