"""SMS addresses: E.164 numbers, short codes and alphanumeric sender ids."""

from __future__ import annotations

import re

from gateway.contract import BadRequestError, normalize_phone

_SHORT_CODE = re.compile(r"^\d{3,8}$")
_ALPHANUMERIC = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9 ]{1,11}$")


def sms_address(raw: str) -> str:
    """Normalize an SMS address.

    Phone numbers become E.164; short codes (3-8 digits) and alphanumeric
    sender ids (up to 11 characters, at least one letter) are kept as they
    are, since they are not phone numbers. Anything else is rejected.
    """
    text = raw.strip()
    if _SHORT_CODE.match(text) or _ALPHANUMERIC.match(text):
        return text
    if not text:
        raise BadRequestError("missing SMS address", code="invalid_phone")
    return normalize_phone(text)
