"""Canonical delivery-state ordering: statuses only move forward.

Providers send callbacks out of order and more than once; folding them with
:func:`advance` gives the same result whatever the order of the progress
states (accepted, queued, sent, delivered, read) and of repeats. A final state
is only left by an explicit retry (a new attempt), so between conflicting
outcomes (e.g. FAILED and DELIVERED for one attempt) the first one applied wins.
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.api.v1.delivery_pb2 import DeliveryState

S = DeliveryState

#: Progress rank: a status with a higher rank replaces a lower one.
_RANK: dict[int, int] = {
    S.DELIVERY_STATE_UNSPECIFIED: 0,
    S.DELIVERY_STATE_ACCEPTED: 1,
    S.DELIVERY_STATE_QUEUED: 2,
    S.DELIVERY_STATE_SENT: 3,
    S.DELIVERY_STATE_SWITCHING_CHANNEL: 4,
    S.DELIVERY_STATE_DELIVERED: 5,
    S.DELIVERY_STATE_UNDELIVERED: 6,
    S.DELIVERY_STATE_EXPIRED: 6,
    S.DELIVERY_STATE_CANCELED: 6,
    S.DELIVERY_STATE_FAILED: 6,
    S.DELIVERY_STATE_READ: 7,
}

#: States nothing leaves (except an explicit retry, which starts a new attempt).
FINAL_STATES: frozenset[int] = frozenset(
    {
        S.DELIVERY_STATE_READ,
        S.DELIVERY_STATE_FAILED,
        S.DELIVERY_STATE_EXPIRED,
        S.DELIVERY_STATE_UNDELIVERED,
        S.DELIVERY_STATE_CANCELED,
    }
)


def advance(current: int, new: int) -> bool:
    """Return True when ``new`` may replace ``current``.

    DELIVERED may still become READ; a failure after DELIVERED (some carriers
    send "undelivered" late) does not overwrite it.
    """
    if current in FINAL_STATES:
        return False
    if current == S.DELIVERY_STATE_DELIVERED and new != S.DELIVERY_STATE_READ:
        return False
    return _RANK[new] > _RANK[current]


def fold(states: Iterable[int], start: int = S.DELIVERY_STATE_UNSPECIFIED) -> int:
    """Final state after applying ``states`` in the given (any) order."""
    current = start
    for state in states:
        if advance(current, state):
            current = state
    return current
