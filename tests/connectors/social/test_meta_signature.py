"""Meta webhook authentication: X-Hub-Signature-256 against pywa's validator as oracle,
the verification handshake, and the raw body (never re-serialized JSON)."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets

import pytest
from multidict import CIMultiDict, MultiDict
from pywa.utils import webhook_updates_validator

from connectors.social.meta import signature
from gateway.contract import AuthError, WebhookRequest

APP_SECRET = secrets.token_hex(16)
VERIFY_TOKEN = "verify-" + secrets.token_hex(8)


def request(
    body: bytes, headers: dict[str, str] | None = None, *, method: str = "POST", **query: str
) -> WebhookRequest:
    return WebhookRequest(
        method=method,
        url="https://example.test/webhooks/whatsapp/meta",
        path_params={},
        headers=CIMultiDict(headers or {}),
        query=MultiDict(query),
        body=body,
    )


def hub_header(body: bytes, secret: str = APP_SECRET) -> str:
    # Written out with the standard library, not with the code under test.
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def ours(body: bytes, header: str | None) -> bool:
    headers = {} if header is None else {signature.SIGNATURE_HEADER: header}
    try:
        signature.verify_signature(request(body, headers), APP_SECRET)
    except AuthError:
        return False
    return True


# A body as Meta sends it: non-ASCII escaped (\u00e9), and the same content
# re-serialized by a careless receiver (UTF-8, different bytes).
META_BODY = b'{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"value":{"messages":[{"text":{"body":"caf\\u00e9 \\ud83d\\ude00"}}]},"field":"messages"}]}]}'  # noqa: E501
RESERIALIZED = json.dumps(json.loads(META_BODY), ensure_ascii=False).encode()

VALID = hub_header(META_BODY)
CASES = [
    ("valid", META_BODY, VALID),
    ("valid, upper-case hex", META_BODY, "sha256=" + VALID.removeprefix("sha256=").upper()),
    ("re-serialized body (unicode unescaped)", RESERIALIZED, VALID),
    ("tampered body", META_BODY.replace(b"caf", b"cat"), VALID),
    ("trailing newline added", META_BODY + b"\n", VALID),
    ("wrong secret", META_BODY, hub_header(META_BODY, secrets.token_hex(16))),
    ("truncated", META_BODY, VALID[:-2]),
    ("bare hex without sha256=", META_BODY, VALID.removeprefix("sha256=")),
    ("sha1 prefix", META_BODY, "sha1=" + VALID.removeprefix("sha256=")),
    ("empty", META_BODY, ""),
    ("garbage", META_BODY, "sha256=zz" + "0" * 62),
    ("empty body signed by someone else", b"", hub_header(b"", "other")),
]


@pytest.mark.parametrize(("name", "body", "header"), CASES, ids=[c[0] for c in CASES])
def test_signature_check_agrees_with_pywa(name: str, body: bytes, header: str) -> None:
    oracle = webhook_updates_validator(APP_SECRET, body, header)
    # pywa accepts a bare hex digest (it strips an optional prefix); Meta always
    # sends the prefix, and we insist on it: stricter, never looser.
    if name == "bare hex without sha256=":
        assert oracle is True
        assert ours(body, header) is False
    elif name == "valid, upper-case hex":
        assert oracle is False  # pywa compares case-sensitively
        assert ours(body, header) is True  # hex is hex
    else:
        assert ours(body, header) is oracle, name


def test_the_raw_body_is_verified_not_reserialized_json() -> None:
    assert ours(META_BODY, VALID)
    assert RESERIALIZED != META_BODY
    assert not ours(RESERIALIZED, VALID)
    assert ours(RESERIALIZED, hub_header(RESERIALIZED))


def test_missing_and_legacy_only_headers_are_refused() -> None:
    with pytest.raises(AuthError, match="missing"):
        signature.verify_signature(request(META_BODY), APP_SECRET)
    sha1 = "sha1=" + hmac.new(APP_SECRET.encode(), META_BODY, hashlib.sha1).hexdigest()
    with pytest.raises(AuthError, match="legacy SHA-1"):
        signature.verify_signature(
            request(META_BODY, {signature.LEGACY_SIGNATURE_HEADER: sha1}), APP_SECRET
        )


def test_verification_handshake_echoes_the_challenge() -> None:
    reply = signature.verification_reply(
        request(
            b"",
            method="GET",
            **{
                "hub.mode": "subscribe",
                "hub.verify_token": VERIFY_TOKEN,
                "hub.challenge": "1158201444",
            },
        ),
        VERIFY_TOKEN,
    )
    assert (reply.status, reply.body, reply.content_type) == (200, b"1158201444", "text/plain")


@pytest.mark.parametrize(
    "query",
    [
        {"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "1"},
        {"hub.mode": "unsubscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1"},
        {"hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1"},
        {"hub.mode": "subscribe", "hub.challenge": "1"},
        {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN},
        {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "<script>"},
    ],
)
def test_bad_handshakes_are_403(query: dict[str, str]) -> None:
    with pytest.raises(AuthError) as info:
        signature.verification_reply(request(b"", method="GET", **query), VERIFY_TOKEN)
    assert info.value.status == 403
