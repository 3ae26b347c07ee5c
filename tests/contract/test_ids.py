"""Deterministic inbound event ids."""

from __future__ import annotations

import uuid

import pytest

from gateway.contract.ids import conversation_id, inbound_event_id, new_id


def test_inbound_event_id_is_stable() -> None:
    first = inbound_event_id("twilio", "main", "message", "SM123")
    assert first == inbound_event_id("twilio", "main", "message", "SM123")
    # A known value: the id must not change between releases (consumers dedupe on it).
    assert first == str(
        uuid.uuid5(
            uuid.UUID("6f1c2b8e-3f0a-5d7c-9a41-2f6e0c1d7b3a"), "twilio\x1fmain\x1fmessage\x1fSM123"
        )
    )
    assert uuid.UUID(first).version == 5


@pytest.mark.parametrize(
    "other",
    [
        ("vonage", "main", "message", "SM123"),
        ("twilio", "other", "message", "SM123"),
        ("twilio", "main", "status", "SM123"),
        ("twilio", "main", "message", "SM124"),
        ("twilio", "main", "message", "SM123", "delivered"),
    ],
)
def test_inbound_event_id_differs_for_any_other_input(other: tuple[str, ...]) -> None:
    assert inbound_event_id(*other) != inbound_event_id("twilio", "main", "message", "SM123")


def test_parts_cannot_be_shifted_across_the_separator() -> None:
    assert inbound_event_id("twilio", "ab", "c", "d") != inbound_event_id("twilio", "a", "bc", "d")


@pytest.mark.parametrize("ids", [(), ("",), ("SM1", "")])
def test_inbound_event_id_refuses_empty_provider_ids(ids: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="non-empty provider ids"):
        inbound_event_id("twilio", "main", "message", *ids)


def test_new_ids_are_random_uuids() -> None:
    ids = {new_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(uuid.UUID(i).version == 4 for i in ids)


def test_conversation_id_is_stable_and_directional() -> None:
    a = conversation_id("sms", "+14155550100", "+14155550199")
    assert a == conversation_id("sms", "+14155550100", "+14155550199")
    assert a != conversation_id("sms", "+14155550199", "+14155550100")
    assert a != conversation_id("whatsapp", "+14155550100", "+14155550199")


def test_ids_equal_the_stdlib_uuid5_for_any_name() -> None:
    import random

    from gateway.contract.ids import NAMESPACE

    rng = random.Random(5)
    for _ in range(2000):
        parts = ["".join(chr(rng.randint(32, 0x2FFF)) for _ in range(rng.randint(1, 12)))]
        parts += [str(rng.random())]
        expected = str(uuid.uuid5(NAMESPACE, "\x1f".join(("p", "a", "k", *parts))))
        assert inbound_event_id("p", "a", "k", *parts) == expected
    assert conversation_id("sms", "+1", "+2") == str(
        uuid.uuid5(NAMESPACE, "\x1f".join(("conversation", "sms", "+1", "+2")))
    )
