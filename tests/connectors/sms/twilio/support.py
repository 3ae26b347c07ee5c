"""Twilio test material: accounts, and requests signed by Twilio's own SDK.

Signatures come from ``twilio.request_validator.RequestValidator`` (the
provider's SDK), never from our verifier's signer, so the tests check our
verifier against an independent implementation.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Mapping, Sequence
from urllib.parse import urlencode

from multidict import MultiDict
from twilio.request_validator import RequestValidator  # type: ignore[import-untyped]

from gateway.testing.conformance import WebhookCall

SIGNATURE_HEADER = "X-Twilio-Signature"
FORM = "application/x-www-form-urlencoded"
ACCOUNT_SID = "AC" + "a1" * 16
OTHER_ACCOUNT_SID = "AC" + "b2" * 16
OUR_NUMBER = "+14155550100"
OTHER_NUMBER = "+14155550199"
CUSTOMER = "+447700900123"
MEDIA_BASE = f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT_SID}"
TOKEN_ENV = "TEST_TWILIO_TOKEN_MAIN"
OTHER_TOKEN_ENV = "TEST_TWILIO_TOKEN_OTHER"


def new_token() -> str:
    """A random auth token (32 hex digits, like Twilio's)."""
    return secrets.token_hex(16)


def message_sid() -> str:
    """A fresh Twilio message SID."""
    return "SM" + uuid.uuid4().hex


def settings(api_base_url: str, *, two_accounts: bool = False) -> dict[str, object]:
    """The ``connectors.sms.twilio`` section (secrets from the environment)."""
    accounts: dict[str, object] = {
        "main": {
            "account_sid": ACCOUNT_SID,
            "auth_token": {"env": TOKEN_ENV},
            "numbers": [OUR_NUMBER],
        }
    }
    if two_accounts:
        accounts["other"] = {
            "account_sid": OTHER_ACCOUNT_SID,
            "auth_token": {"env": OTHER_TOKEN_ENV},
            "numbers": [OTHER_NUMBER],
        }
    return {"api_base_url": api_base_url, "accounts": accounts}


def sign(token: str, url: str, pairs: Sequence[tuple[str, str]]) -> str:
    """Twilio's signature of a form request, computed by Twilio's SDK (every
    value of a repeated parameter counts, hence the MultiDict)."""
    return str(RequestValidator(token).compute_signature(url, MultiDict(pairs)))


def form_call(
    url: str,
    params: Sequence[tuple[str, str]] | Mapping[str, str],
    *,
    token: str | None,
    signature: str | None = None,
    description: str = "",
    extra_headers: Mapping[str, str] | None = None,
) -> WebhookCall:
    """A form POST; signed with ``token`` by the SDK unless ``signature`` is given."""
    pairs = list(params.items()) if isinstance(params, Mapping) else list(params)
    headers = {"Content-Type": FORM, **(extra_headers or {})}
    if signature is None and token is not None:
        signature = sign(token, url, pairs)
    if signature is not None:
        headers[SIGNATURE_HEADER] = signature
    return WebhookCall(
        url=url, headers=headers, body=urlencode(pairs).encode(), description=description
    )


def json_call(url: str, body: bytes, *, token: str, description: str = "") -> WebhookCall:
    """A JSON POST as Twilio signs it: ``bodySHA256`` in the URL, the URL signed alone."""
    signed_url = f"{url}{'&' if '?' in url else '?'}bodySHA256={hashlib.sha256(body).hexdigest()}"
    signature = RequestValidator(token).compute_signature(signed_url, None)
    return WebhookCall(
        url=signed_url,
        headers={"Content-Type": "application/json", SIGNATURE_HEADER: str(signature)},
        body=body,
        description=description,
    )


def inbound_params(
    sid: str, *, body: str = "Hello from the handset", **extra: str
) -> dict[str, str]:
    """An incoming SMS webhook's parameters as Twilio documents them."""
    return {
        "ToCountry": "US",
        "ToState": "CA",
        "SmsMessageSid": sid,
        "NumMedia": "0",
        "ToCity": "SAN FRANCISCO",
        "FromZip": "",
        "SmsSid": sid,
        "FromState": "",
        "SmsStatus": "received",
        "FromCity": "",
        "Body": body,
        "FromCountry": "GB",
        "To": OUR_NUMBER,
        "MessagingServiceSid": "",
        "ToZip": "94105",
        "NumSegments": "1",
        "MessageSid": sid,
        "AccountSid": ACCOUNT_SID,
        "From": CUSTOMER,
        "ApiVersion": "2010-04-01",
        **extra,
    }


def status_params(
    sid: str, status: str, *, error_code: str = "", to: str = CUSTOMER
) -> dict[str, str]:
    """A status callback's parameters as Twilio documents them."""
    params = {
        "MessageSid": sid,
        "SmsSid": sid,
        "AccountSid": ACCOUNT_SID,
        "MessageStatus": status,
        "SmsStatus": status,
        "To": to,
        "From": OUR_NUMBER,
        "ApiVersion": "2010-04-01",
    }
    if error_code:
        params["ErrorCode"] = error_code
    return params
