"""Vonage webhook authentication, checked against Vonage's own SDK code.

Oracles: ``vonage_http_client.auth.Auth`` (the v4 SDK's ``sig`` signer and
checker, HMAC variants only), the v3 SDK's md5hash known answer from the
provider notes, and ``vonage_jwt.verify_jwt.verify_signature`` for Messages
API JWTs (which checks the HS256 signature but not ``payload_hash``). Every
rejection is a 401/403 over real HTTP, never a 500, and publishes nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
from multidict import CIMultiDict, MultiDict
from vonage_http_client.auth import Auth
from vonage_jwt.errors import VonageVerifyJwtError
from vonage_jwt.verify_jwt import verify_signature as vonage_verify_jwt

from connectors.sms.vonage import webhooks
from gateway.contract import AuthError, WebhookRequest
from gateway.testing.fake_vonage import signed_webhook_headers
from tests.connectors.sms.vonage.conftest import API_KEY, OTHER_API_KEY, Harness

HMAC_METHODS = ("md5", "sha1", "sha256", "sha512")
SECRET = "a-signature-secret-of-32-bytes-or-more-0123"


def sdk_sign(params: dict[str, str], secret: str, method: str) -> str:
    """The v4 SDK's signature (it mutates its input, so it gets a copy)."""
    auth = Auth(api_key=API_KEY, signature_secret=secret, signature_method=method)  # type: ignore[arg-type]
    return auth.sign_params(dict(params))


def sdk_check(params: dict[str, str], secret: str, method: str) -> bool:
    auth = Auth(api_key=API_KEY, signature_secret=secret, signature_method=method)  # type: ignore[arg-type]
    return auth.check_signature(dict(params))


def inbound_params(**overrides: str) -> dict[str, str]:
    """An SMS API inbound SMS as documented (what Vonage signs)."""
    params = {
        "msisdn": "447700900123",
        "to": "447700900000",
        "messageId": uuid.uuid4().hex[:16].upper(),
        "text": "Hello & welcome = yes",
        "type": "text",
        "keyword": "HELLO",
        "api-key": API_KEY,
        "message-timestamp": "2026-01-01 10:00:00",
        "timestamp": str(int(time.time())),
        "nonce": str(uuid.uuid4()),
    }
    params.update(overrides)
    return params


# -- the sig parameter, unit level ----------------------------------------------------


def test_md5hash_known_answer_from_the_v3_sdk() -> None:
    params = {"a": "1", "b": "2", "timestamp": "1461605396"}
    assert webhooks.compute_signature(params, "secret", "md5hash") == (
        "6af838ef94998832dbfc29020b564830"
    )


def test_hmac_md5_known_answer_from_the_v4_sdk() -> None:
    params = {"a": "1", "b": "2", "timestamp": "1461605396"}
    assert sdk_sign(params, "secret", "md5") == "c15c21ced558c93a226c305f58f902f2"
    assert webhooks.compute_signature(params, "secret", "md5") == (
        "c15c21ced558c93a226c305f58f902f2"
    )


@pytest.mark.parametrize("method", HMAC_METHODS)
def test_hmac_signatures_agree_with_the_sdk(method: str) -> None:
    params = inbound_params(text="a&b=c ünïcødé 📦")
    assert webhooks.compute_signature(params, SECRET, method) == sdk_sign(params, SECRET, method)  # type: ignore[arg-type]


def _mutations(params: dict[str, str]) -> dict[str, dict[str, str]]:
    changed = dict(params, text=params["text"] + "!")
    added = dict(params, extra="1")
    removed = {k: v for k, v in params.items() if k != "keyword"}
    return {"changed": changed, "added": added, "removed": removed}


@pytest.mark.parametrize("method", HMAC_METHODS)
def test_verifier_and_sdk_agree_on_valid_and_tampered_params(method: str) -> None:
    params = inbound_params()
    signed = dict(params, sig=sdk_sign(params, SECRET, method))
    now = time.time()
    assert sdk_check(signed, SECRET, method)
    webhooks.verify_signature(signed, SECRET, method, now=now, max_age=300)  # type: ignore[arg-type]
    for name, tampered in _mutations(params).items():
        tampered["sig"] = signed["sig"]
        assert not sdk_check(tampered, SECRET, method), name
        with pytest.raises(AuthError):
            webhooks.verify_signature(tampered, SECRET, method, now=now, max_age=300)  # type: ignore[arg-type]
    wrong = dict(params, sig=sdk_sign(params, SECRET + "x", method))
    assert not sdk_check(wrong, SECRET, method)
    with pytest.raises(AuthError):
        webhooks.verify_signature(wrong, SECRET, method, now=now, max_age=300)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("sig", "timestamp", "reason"),
    [
        (None, "now", "missing sig"),
        ("zz" * 16, "now", "malformed sig"),
        ("ab" * 15, "now", "malformed sig"),
        ("valid", None, "timestamp"),
        ("valid", "yesterday", "timestamp"),
        ("valid", "old", "stale"),
        ("valid", "future", "stale"),
    ],
)
def test_signature_shape_and_freshness(sig: str | None, timestamp: str | None, reason: str) -> None:
    now = time.time()
    stamps = {"now": str(int(now)), "old": str(int(now) - 301), "future": str(int(now) + 301)}
    params = inbound_params()
    params.pop("timestamp")
    if timestamp is not None:
        params["timestamp"] = stamps.get(timestamp, timestamp)
    if sig == "valid":
        params["sig"] = webhooks.compute_signature(params, SECRET, "md5hash")
    elif sig is not None:
        params["sig"] = sig
    with pytest.raises(AuthError, match=reason):
        webhooks.verify_signature(params, SECRET, "md5hash", now=now, max_age=300)


def test_upper_case_hex_signature_is_accepted() -> None:
    params = inbound_params()
    params["sig"] = webhooks.compute_signature(params, SECRET, "sha512").upper()
    webhooks.verify_signature(params, SECRET, "sha512", now=time.time(), max_age=300)


# -- Messages API JWT, unit level ------------------------------------------------------


def _request(body: bytes, headers: dict[str, str]) -> WebhookRequest:
    return WebhookRequest(
        method="POST",
        url="https://hooks.example.com/webhooks/sms/vonage/main/messages/inbound",
        path_params={"account": "main"},
        headers=CIMultiDict(headers),
        query=MultiDict(),
        body=body,
    )


BODY = json.dumps({"message_uuid": str(uuid.uuid4()), "channel": "sms", "text": "hi"}).encode()


def test_jwt_valid_agrees_with_vonage_jwt() -> None:
    headers = signed_webhook_headers(BODY, SECRET, api_key=API_KEY)
    token = headers["Authorization"].removeprefix("Bearer ")
    assert vonage_verify_jwt(token, SECRET) is True
    claims = webhooks.verify_jwt(_request(BODY, headers), SECRET, now=time.time(), max_age=300)
    assert claims["api_key"] == API_KEY


def test_jwt_wrong_secret_agrees_with_vonage_jwt() -> None:
    headers = signed_webhook_headers(BODY, SECRET + "-other", api_key=API_KEY)
    token = headers["Authorization"].removeprefix("Bearer ")
    assert vonage_verify_jwt(token, SECRET) is False
    with pytest.raises(AuthError, match="invalid JWT"):
        webhooks.verify_jwt(_request(BODY, headers), SECRET, now=time.time(), max_age=300)


def test_tampered_body_is_rejected_although_the_sdk_accepts_the_token() -> None:
    headers = signed_webhook_headers(BODY, SECRET, api_key=API_KEY)
    token = headers["Authorization"].removeprefix("Bearer ")
    tampered = BODY.replace(b'"hi"', b'"pay me"')
    # The SDK helper checks only the signature: the token is "valid" for any body.
    assert vonage_verify_jwt(token, SECRET) is True
    with pytest.raises(AuthError, match="payload_hash"):
        webhooks.verify_jwt(_request(tampered, headers), SECRET, now=time.time(), max_age=300)


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "", "e30.e30.", "Zm9v.YmFy.YmF6"])
def test_malformed_jwt_raises_auth_error_where_the_sdk_raises(token: str) -> None:
    if token:
        with pytest.raises(VonageVerifyJwtError):
            vonage_verify_jwt(token, SECRET)
    with pytest.raises(AuthError):
        webhooks.verify_jwt(
            _request(BODY, {"Authorization": f"Bearer {token}"}),
            SECRET,
            now=time.time(),
            max_age=300,
        )


def _token(claims: dict[str, Any], secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"iat": "now-301", "payload_hash": "body"}, "stale"),
        ({"iat": "now+120", "payload_hash": "body"}, "stale"),
        ({"payload_hash": "body"}, "invalid JWT"),
        ({"iat": "now"}, "invalid JWT"),
        ({"iat": "now", "payload_hash": 12}, "payload_hash"),
        ({"iat": "now", "payload_hash": "body", "exp": "now-1"}, "invalid JWT"),
    ],
)
def test_jwt_claims_are_enforced(claims: dict[str, Any], reason: str) -> None:
    now = time.time()
    values = {
        "now": int(now),
        "now-301": int(now) - 301,
        "now+120": int(now) + 120,
        "now-1": int(now) - 1,
        "body": hashlib.sha256(BODY).hexdigest(),
    }
    resolved = {k: values.get(v, v) if isinstance(v, str) else v for k, v in claims.items()}
    headers = {"Authorization": f"Bearer {_token(resolved)}"}
    with pytest.raises(AuthError, match=reason):
        webhooks.verify_jwt(_request(BODY, headers), SECRET, now=now, max_age=300)


def test_unsigned_alg_none_token_is_rejected() -> None:
    claims = {"iat": int(time.time()), "payload_hash": hashlib.sha256(BODY).hexdigest()}
    token = jwt.encode(claims, None, algorithm="none")
    with pytest.raises(AuthError):
        webhooks.verify_jwt(
            _request(BODY, {"Authorization": f"Bearer {token}"}),
            SECRET,
            now=time.time(),
            max_age=300,
        )


# -- over real HTTP through the service ------------------------------------------------


def _form(params: dict[str, str]) -> bytes:
    return urlencode(params).encode()


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


async def test_sdk_signed_hmac_webhook_is_published_once(harness: Harness) -> None:
    secret = harness.secrets["VONAGE_OTHER_SIGNATURE_SECRET"]
    params = inbound_params(**{"api-key": OTHER_API_KEY, "to": "14155550100"})
    params["sig"] = sdk_sign(params, secret, "sha256")
    status, _ = await harness.post(harness.url("hmac", "inbound"), data=_form(params), headers=FORM)
    assert status == 204
    event, key = await harness.next_event()
    assert key == "message.received.sms.vonage"
    assert event.account == "hmac"
    assert event.message.text.body == "Hello & welcome = yes"
    await harness.assert_nothing_published()


async def test_md5hash_signed_get_webhook_is_published(harness: Harness) -> None:
    secret = harness.secrets["VONAGE_SIGNATURE_SECRET"]
    params = inbound_params()
    params["sig"] = webhooks.compute_signature(params, secret, "md5hash")
    status, _ = await harness.get(harness.url("main", "inbound"), params=params)
    assert status == 204
    event, _ = await harness.next_event()
    assert event.message.sender.address == "+447700900123"


def _legacy_cases(secret: str) -> list[tuple[str, dict[str, str], int]]:
    def signed(params: dict[str, str], with_secret: str = secret) -> dict[str, str]:
        return dict(params, sig=webhooks.compute_signature(params, with_secret, "md5hash"))

    base = inbound_params()
    good = signed(base)
    return [
        ("changed param", dict(good, text="Hello & welcome = no"), 401),
        ("added param", dict(good, extra="1"), 401),
        ("removed param", {k: v for k, v in good.items() if k != "keyword"}, 401),
        ("wrong secret", signed(base, secret + "x"), 401),
        ("missing sig", base, 401),
        ("malformed sig", dict(base, sig="not-hex-at-all-not-hex-at-all-00"), 401),
        ("stale timestamp", signed(dict(base, timestamp=str(int(time.time()) - 3600))), 401),
        ("missing timestamp", signed({k: v for k, v in base.items() if k != "timestamp"}), 401),
        ("api-key of another account", signed(dict(base, **{"api-key": OTHER_API_KEY})), 403),
    ]


async def test_bad_sig_webhooks_are_rejected_and_never_published(harness: Harness) -> None:
    secret = harness.secrets["VONAGE_SIGNATURE_SECRET"]
    for name, params, expected in _legacy_cases(secret):
        status, _ = await harness.post(
            harness.url("main", "inbound"), data=_form(params), headers=FORM
        )
        assert status == expected, name
        status, _ = await harness.get(harness.url("main", "dlr"), params=params)
        assert status == expected, f"{name} (dlr)"
    good = inbound_params()
    good["sig"] = webhooks.compute_signature(good, secret, "md5hash")
    status, _ = await harness.post(harness.url("nobody", "inbound"), data=_form(good), headers=FORM)
    assert status == 403
    await harness.assert_nothing_published()


async def test_tampered_raw_body_is_rejected(harness: Harness) -> None:
    secret = harness.secrets["VONAGE_SIGNATURE_SECRET"]
    params = inbound_params(text="pay 10")
    params["sig"] = webhooks.compute_signature(params, secret, "md5hash")
    body = _form(params).replace(b"pay+10", b"pay+99")
    status, _ = await harness.post(harness.url("main", "inbound"), data=body, headers=FORM)
    assert status == 401
    await harness.assert_nothing_published()


async def test_unsigned_account_takes_unsigned_webhooks_only_when_configured(
    harness: Harness,
) -> None:
    params = inbound_params(**{"api-key": "0a0b0c0d"})
    status, _ = await harness.post(
        harness.url("unsigned", "inbound"), data=_form(params), headers=FORM
    )
    assert status == 204
    event, _ = await harness.next_event()
    assert event.account == "unsigned"
    status, _ = await harness.post(harness.url("main", "inbound"), data=_form(params), headers=FORM)
    assert status == 401


def _messages_body() -> bytes:
    return json.dumps(
        {
            "channel": "sms",
            "message_uuid": str(uuid.uuid4()),
            "to": "447700900000",
            "from": "447700900123",
            "timestamp": "2026-01-01T10:00:00.000Z",
            "text": "Hi there",
            "message_type": "text",
            "sms": {"num_messages": "1"},
        }
    ).encode()


async def test_signed_messages_api_webhook_is_published(harness: Harness) -> None:
    body = _messages_body()
    headers = signed_webhook_headers(
        body, harness.secrets["VONAGE_SIGNATURE_SECRET"], api_key=API_KEY
    )
    status, _ = await harness.post(
        harness.url("main", "messages/inbound"), data=body, headers=headers
    )
    assert status == 200
    event, key = await harness.next_event()
    assert key == "message.received.sms.vonage"
    assert event.message.text.body == "Hi there"


async def test_bad_messages_api_webhooks_are_rejected_and_never_published(
    harness: Harness,
) -> None:
    secret = harness.secrets["VONAGE_SIGNATURE_SECRET"]
    body = _messages_body()
    good = signed_webhook_headers(body, secret, api_key=API_KEY)
    json_type = {"Content-Type": "application/json"}
    other_body = _messages_body()
    cases: list[tuple[str, bytes, dict[str, str], int]] = [
        ("tampered body", body.replace(b"Hi there", b"Hi thera"), good, 401),
        ("token of another body", other_body, good, 401),
        ("wrong secret", body, signed_webhook_headers(body, secret + "x", api_key=API_KEY), 401),
        ("missing header", body, json_type, 401),
        ("not bearer", body, {**json_type, "Authorization": "Basic YWJjOmRlZg=="}, 401),
        ("malformed token", body, {**json_type, "Authorization": "Bearer abc.def"}, 401),
        ("empty bearer", body, {**json_type, "Authorization": "Bearer "}, 401),
        (
            "stale iat",
            body,
            signed_webhook_headers(body, secret, api_key=API_KEY, issued_at=time.time() - 600),
            401,
        ),
        (
            "api_key of another account",
            body,
            signed_webhook_headers(body, secret, api_key=OTHER_API_KEY),
            403,
        ),
    ]
    for name, sent, headers, expected in cases:
        for route in ("messages/inbound", "messages/status"):
            status, _ = await harness.post(harness.url("main", route), data=sent, headers=headers)
            assert status == expected, f"{name} on {route}"
    await harness.assert_nothing_published()
