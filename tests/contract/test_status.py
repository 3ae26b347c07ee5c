"""Delivery-state folding: statuses only move forward, final states stay final."""

from __future__ import annotations

import itertools

import pytest

from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.contract.status import FINAL_STATES, advance, fold

S = DeliveryState
ALL_STATES = [v.number for v in DeliveryState.DESCRIPTOR.values]
PROGRESS = [
    S.DELIVERY_STATE_ACCEPTED,
    S.DELIVERY_STATE_QUEUED,
    S.DELIVERY_STATE_SENT,
    S.DELIVERY_STATE_DELIVERED,
    S.DELIVERY_STATE_READ,
]


@pytest.mark.parametrize(
    ("current", "new", "allowed"),
    [
        (S.DELIVERY_STATE_UNSPECIFIED, S.DELIVERY_STATE_ACCEPTED, True),
        (S.DELIVERY_STATE_QUEUED, S.DELIVERY_STATE_SENT, True),
        (S.DELIVERY_STATE_SENT, S.DELIVERY_STATE_DELIVERED, True),
        (S.DELIVERY_STATE_DELIVERED, S.DELIVERY_STATE_READ, True),
        (S.DELIVERY_STATE_SENT, S.DELIVERY_STATE_FAILED, True),
        (S.DELIVERY_STATE_SENT, S.DELIVERY_STATE_UNDELIVERED, True),
        (S.DELIVERY_STATE_QUEUED, S.DELIVERY_STATE_EXPIRED, True),
        (S.DELIVERY_STATE_SENT, S.DELIVERY_STATE_SWITCHING_CHANNEL, True),
        # a late SENT never overwrites DELIVERED
        (S.DELIVERY_STATE_DELIVERED, S.DELIVERY_STATE_SENT, False),
        (S.DELIVERY_STATE_DELIVERED, S.DELIVERY_STATE_QUEUED, False),
        # a late carrier "undelivered" does not overwrite DELIVERED
        (S.DELIVERY_STATE_DELIVERED, S.DELIVERY_STATE_UNDELIVERED, False),
        (S.DELIVERY_STATE_DELIVERED, S.DELIVERY_STATE_FAILED, False),
        (S.DELIVERY_STATE_SENT, S.DELIVERY_STATE_SENT, False),
        (S.DELIVERY_STATE_SENT, S.DELIVERY_STATE_QUEUED, False),
        (S.DELIVERY_STATE_FAILED, S.DELIVERY_STATE_DELIVERED, False),
        (S.DELIVERY_STATE_READ, S.DELIVERY_STATE_FAILED, False),
    ],
)
def test_advance_table(current: int, new: int, allowed: bool) -> None:
    assert advance(current, new) is allowed


@pytest.mark.parametrize("final", sorted(FINAL_STATES))
def test_nothing_leaves_a_final_state(final: int) -> None:
    assert not any(advance(final, new) for new in ALL_STATES)


def test_final_states_are_the_documented_ones() -> None:
    assert {
        S.DELIVERY_STATE_READ,
        S.DELIVERY_STATE_FAILED,
        S.DELIVERY_STATE_EXPIRED,
        S.DELIVERY_STATE_UNDELIVERED,
        S.DELIVERY_STATE_CANCELED,
    } == FINAL_STATES


def test_every_state_has_a_rank() -> None:
    # A state added to the proto without a rank would raise KeyError in advance().
    for current, new in itertools.product(ALL_STATES, ALL_STATES):
        advance(current, new)


@pytest.mark.parametrize("order", list(itertools.permutations(PROGRESS)))
def test_fold_of_the_progress_states_is_order_independent(order: tuple[int, ...]) -> None:
    assert fold(order) == S.DELIVERY_STATE_READ


@pytest.mark.parametrize(
    "order",
    list(
        itertools.permutations(
            [S.DELIVERY_STATE_QUEUED, S.DELIVERY_STATE_SENT, S.DELIVERY_STATE_DELIVERED]
        )
    ),
)
def test_fold_ends_delivered_whatever_the_callback_order(order: tuple[int, ...]) -> None:
    assert fold(order) == S.DELIVERY_STATE_DELIVERED


@pytest.mark.parametrize(
    "states",
    [
        [S.DELIVERY_STATE_QUEUED, S.DELIVERY_STATE_DELIVERED, S.DELIVERY_STATE_SENT],
        [S.DELIVERY_STATE_SENT, S.DELIVERY_STATE_FAILED, S.DELIVERY_STATE_DELIVERED],
        [S.DELIVERY_STATE_READ, S.DELIVERY_STATE_DELIVERED, S.DELIVERY_STATE_SENT],
        [S.DELIVERY_STATE_ACCEPTED, S.DELIVERY_STATE_EXPIRED, S.DELIVERY_STATE_SENT],
    ],
)
def test_fold_is_monotonic(states: list[int]) -> None:
    """Every step of a fold either keeps the state or moves it forward legally."""
    current = S.DELIVERY_STATE_UNSPECIFIED
    for state in states:
        after = fold([state], start=current)
        assert after == current or advance(current, after)
        if current in FINAL_STATES:
            assert after == current
        current = after


def test_fold_duplicates_change_nothing() -> None:
    once = fold([S.DELIVERY_STATE_SENT, S.DELIVERY_STATE_DELIVERED])
    twice = fold([S.DELIVERY_STATE_SENT] * 3 + [S.DELIVERY_STATE_DELIVERED] * 2)
    assert once == twice == S.DELIVERY_STATE_DELIVERED


def test_fold_starts_from_a_given_state() -> None:
    assert fold([S.DELIVERY_STATE_SENT], start=S.DELIVERY_STATE_DELIVERED) == (
        S.DELIVERY_STATE_DELIVERED
    )
    assert fold([], start=S.DELIVERY_STATE_QUEUED) == S.DELIVERY_STATE_QUEUED


def test_between_conflicting_outcomes_the_first_applied_wins() -> None:
    # Documented: nothing leaves a final state, and a late failure never
    # overwrites DELIVERED, so order decides between these two.
    assert fold([S.DELIVERY_STATE_FAILED, S.DELIVERY_STATE_DELIVERED]) == S.DELIVERY_STATE_FAILED
    assert fold([S.DELIVERY_STATE_DELIVERED, S.DELIVERY_STATE_FAILED]) == (
        S.DELIVERY_STATE_DELIVERED
    )
