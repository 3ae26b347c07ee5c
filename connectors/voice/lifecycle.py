"""Canonical call-state ordering: a call's state only moves forward.

Providers send status callbacks out of order and more than once; folding the
call events of one call with :func:`advance` gives the same state whatever the
order and repeats. A final state (completed, busy, no answer, failed,
canceled) is never left, and between two final states the first one applied
wins (a provider does not report two outcomes of one call).
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.api.v1.call_pb2 import CallState
from gateway.api.v1.envelope_pb2 import Event

C = CallState

_RANK: dict[int, int] = {
    C.CALL_STATE_UNSPECIFIED: 0,
    C.CALL_STATE_INITIATED: 1,
    C.CALL_STATE_RINGING: 2,
    C.CALL_STATE_ANSWERED: 3,
    C.CALL_STATE_COMPLETED: 4,
    C.CALL_STATE_BUSY: 4,
    C.CALL_STATE_NO_ANSWER: 4,
    C.CALL_STATE_FAILED: 4,
    C.CALL_STATE_CANCELED: 4,
}

#: Canonical state -> its event type word (routing key ``call.<word>.voice.<provider>``).
STATE_WORDS: dict[CallState.ValueType, str] = {
    C.CALL_STATE_INITIATED: "initiated",
    C.CALL_STATE_RINGING: "ringing",
    C.CALL_STATE_ANSWERED: "answered",
    C.CALL_STATE_COMPLETED: "completed",
    C.CALL_STATE_BUSY: "busy",
    C.CALL_STATE_NO_ANSWER: "no_answer",
    C.CALL_STATE_FAILED: "failed",
    C.CALL_STATE_CANCELED: "canceled",
}

#: States a call never leaves.
FINAL_STATES = frozenset(state for state, rank in _RANK.items() if rank == 4)


def is_final(state: CallState.ValueType) -> bool:
    """True for the outcomes of a call."""
    return state in FINAL_STATES


def advance(current: CallState.ValueType, new: CallState.ValueType) -> CallState.ValueType:
    """The state after ``new`` was reported for a call in state ``current``."""
    if is_final(current):
        return current
    return new if _RANK[new] > _RANK[current] else current


def fold(events: Iterable[Event]) -> CallState.ValueType:
    """The state of a call after all of its call events, in any order."""
    state: CallState.ValueType = C.CALL_STATE_UNSPECIFIED
    for event in events:
        if event.HasField("call"):
            state = advance(state, event.call.state)
    return state
