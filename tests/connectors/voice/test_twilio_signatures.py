"""voice.twilio webhook authentication: Twilio's SDK signs, tampering is refused.

Every route checks ``X-Twilio-Signature`` (the SMS connector's verifier, checked
here against twilio's ``RequestValidator``); a refused request never answers a
flow and never touches the broker.
"""

from __future__ import annotations

import pytest

from tests.connectors.sms.twilio.support import sign
from tests.connectors.voice.conftest import Harness, call_params, call_sid

ROUTES = ["incoming", "gather", "record", "step", "hold", "status", "recording", "transcription"]


def route_url(harness: Harness, route: str, account: str = "main") -> str:
    return harness.url(route, account, flow="support", step="welcome")


@pytest.mark.parametrize("route", ROUTES)
async def test_sdk_signature_is_accepted_and_tampering_is_refused(
    harness: Harness, route: str
) -> None:
    url = route_url(harness, route)
    params = call_params(call_sid())
    good = sign(harness.token, url, list(params.items()))
    tampered = {
        "changed parameter": (url, {**params, "From": "+15005550006"}, good, harness.token),
        "added parameter": (url, {**params, "Digits": "1"}, good, harness.token),
        "other URL": (
            route_url(harness, "status" if route != "status" else "incoming"),
            params,
            good,
            harness.token,
        ),
        "wrong token": (url, params, None, "0" * 32),
        "empty signature": (url, params, "", harness.token),
        "garbage signature": (url, params, "not base64 at all!", harness.token),
    }
    for name, (target, sent, signature, token) in tampered.items():
        status, _, body = await harness.call(target, sent, signature=signature, token=token)
        assert status in (401, 403), f"{route}: {name} -> {status}"
        assert "<Response" not in body
    assert await harness.drain(settle=0.1) == []


async def test_unknown_account_and_foreign_account_sid_are_403(harness: Harness) -> None:
    url = route_url(harness, "incoming", account="nobody")
    status, _, _ = await harness.call(url, call_params(call_sid()))
    assert status == 403
    foreign = {**call_params(call_sid()), "AccountSid": "AC" + "d4" * 16}
    status, _, _ = await harness.call(route_url(harness, "incoming"), foreign)
    assert status == 403
    assert await harness.drain(settle=0.1) == []
