"""SMS addresses: E.164 numbers, short codes, alphanumeric sender ids."""

from __future__ import annotations

import pytest

from connectors.sms.addresses import sms_address
from gateway.contract import BadRequestError


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("+14155550100", "+14155550100"),
        ("+1 (415) 555-0100", "+14155550100"),
        ("  +447700900123  ", "+447700900123"),
        ("447700900123", "+447700900123"),  # international digits without "+" (Vonage style)
        ("+4915123456789", "+4915123456789"),
        ("+5511987654321", "+5511987654321"),  # Brazil mobile: the 9th digit is kept
        ("+551132654321", "+551132654321"),  # Brazil landline: no digit invented
    ],
)
def test_phone_numbers_become_e164(raw: str, normalized: str) -> None:
    assert sms_address(raw) == normalized


@pytest.mark.parametrize("code", ["733", "12345", "898211", "12345678"])
def test_short_codes_are_kept(code: str) -> None:
    assert sms_address(code) == code


@pytest.mark.parametrize("sender", ["ACME", "Acme Bank", "MyShop24", "A", "ABCDEFGHIJK", "1A"])
def test_alphanumeric_sender_ids_are_kept(sender: str) -> None:
    assert sms_address(sender) == sender


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "+",
        "12",  # too short for a short code or a number
        "ABCDEFGHIJKL",  # 12 characters: too long for an alphanumeric sender id
        "ACME-BANK",  # punctuation is not allowed in sender ids
        "+1 415 555 01OO",  # letters O in a number
        "+999 1234",  # no such country code
        "+1415555010012345678",  # too long
        "user@example.com",
        "tel:+14155550100",
    ],
)
def test_unparsable_addresses_are_rejected(raw: str) -> None:
    with pytest.raises(BadRequestError) as caught:
        sms_address(raw)
    assert caught.value.code == "invalid_phone"
