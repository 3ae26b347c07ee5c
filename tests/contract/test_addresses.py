"""Phone normalization and masking."""

from __future__ import annotations

import pytest

from gateway.contract.addresses import mask_email, mask_phone, normalize_phone
from gateway.contract.errors import BadRequestError


@pytest.mark.parametrize(
    ("raw", "region", "expected"),
    [
        ("+14155550100", None, "+14155550100"),
        (" +1 (415) 555-0100 ", None, "+14155550100"),
        ("447700900123", None, "+447700900123"),  # Vonage sends international digits
        ("(415) 555-0100", "US", "+14155550100"),
        ("07700 900123", "GB", "+447700900123"),
        ("+44 7700 900123", "US", "+447700900123"),
    ],
)
def test_normalize_phone(raw: str, region: str | None, expected: str) -> None:
    assert normalize_phone(raw, default_region=region) == expected


@pytest.mark.parametrize("raw", ["", "   ", "not a number", "+1", "+123456789012345678", "++1"])
def test_normalize_phone_rejects_garbage(raw: str) -> None:
    with pytest.raises(BadRequestError) as info:
        normalize_phone(raw)
    assert info.value.code == "invalid_phone"
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("number", "masked"),
    [
        ("+14155550100", "+1415*****00"),
        ("+447700900123", "+4477******23"),
        ("+12345", "******"),
    ],
)
def test_mask_phone(number: str, masked: str) -> None:
    assert mask_phone(number) == masked
    assert len(masked) == len(number)


@pytest.mark.parametrize(
    ("address", "masked"),
    [("jane.doe@example.com", "j***@example.com"), ("x@y.org", "x***@y.org"), ("nodomain", "***")],
)
def test_mask_email(address: str, masked: str) -> None:
    assert mask_email(address) == masked
