"""Address normalization shared by connectors."""

from __future__ import annotations

from functools import lru_cache

import phonenumbers

from gateway.contract.errors import BadRequestError


def normalize_phone(raw: str, *, default_region: str | None = None) -> str:
    """Return ``raw`` as E.164 (``+14155550100``).

    A number that cannot be parsed, or is not a possible number, is rejected
    with :class:`BadRequestError`, never rewritten into something else.
    Numbers without ``+`` are read in ``default_region`` when given, otherwise
    as international digits (providers such as Vonage send ``447700900000``).
    """
    return _normalize_phone(raw.strip(), default_region)


# Parsing is a large share of a webhook's CPU, and the same numbers come back
# (our own numbers on every inbound message, customers in conversation). Only
# successes are cached: a rejected number raises and is parsed again next time.
@lru_cache(maxsize=65536)
def _normalize_phone(text: str, default_region: str | None) -> str:
    if not text:
        raise BadRequestError("empty phone number", code="invalid_phone")
    if not text.startswith("+") and default_region is None:
        text = "+" + text
    try:
        number = phonenumbers.parse(text, default_region)
    except phonenumbers.NumberParseException as exc:
        raise BadRequestError(f"unparsable phone number: {exc}", code="invalid_phone") from exc
    if not phonenumbers.is_possible_number(number):
        raise BadRequestError("not a possible phone number", code="invalid_phone")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def mask_phone(e164: str) -> str:
    """Mask a phone number for logs at INFO: ``+1415*****00``."""
    if len(e164) <= 6:
        return "*" * len(e164)
    return e164[:5] + "*" * (len(e164) - 7) + e164[-2:]


def mask_email(address: str) -> str:
    """Mask an email address for logs at INFO: ``j***@example.com``."""
    local, _, domain = address.partition("@")
    return (local[:1] + "***@" + domain) if domain else "***"
