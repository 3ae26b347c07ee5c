"""Vonage webhook authentication: SMS API ``sig`` parameters and Messages API JWTs.

SMS API (legacy inbound SMS and delivery receipts), when signing is enabled on
the account: every parameter except ``sig``, sorted by name, is written as
``&name=value`` with ``&`` and ``=`` in values replaced by ``_``. The dashboard
method decides the digest:

- ``md5hash``: ``md5(that string + signature_secret)`` (the dashboard default);
- ``md5`` / ``sha1`` / ``sha256`` / ``sha512``: ``HMAC(signature_secret, that string)``.

Signed requests carry a ``timestamp`` (Unix seconds) that we hold to a
freshness window, so a captured request cannot be replayed later.
https://developer.vonage.com/en/getting-started/concepts/signing-messages

Messages API webhooks carry ``Authorization: Bearer <JWT>``, HS256-signed with
the account's signature secret, with ``iat`` and ``payload_hash`` (hex SHA-256
of the raw body) among the claims. A signed token alone proves nothing about
the body it came with, so the hash is compared with the body here.
https://developer.vonage.com/en/messages/concepts/signed-webhooks
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import Any, Literal

import jwt

from gateway.api.v1.envelope_pb2 import RawPayload
from gateway.contract import AuthError, BadRequestError, WebhookRequest

SignatureMethod = Literal["md5hash", "md5", "sha1", "sha256", "sha512"]

SIGNATURE_PARAM = "sig"
TIMESTAMP_PARAM = "timestamp"
FORM = "application/x-www-form-urlencoded"
#: How far in the future a JWT ``iat`` may be (clock skew between Vonage and us).
CLOCK_SKEW_SECONDS = 60.0

_HMAC_DIGESTS = {
    "md5": hashlib.md5,
    "sha1": hashlib.sha1,
    "sha256": hashlib.sha256,
    "sha512": hashlib.sha512,
}
_HEX_LENGTH = {"md5hash": 32, "md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
_HEX = re.compile(r"^[0-9a-fA-F]+$")


# -- SMS API (legacy) ------------------------------------------------------------


def legacy_params(request: WebhookRequest) -> tuple[dict[str, str], RawPayload]:
    """The flat parameters of an SMS API webhook and its raw payload.

    Vonage calls with GET (query string) or POST (form or JSON, per the
    dashboard's "HTTP method" setting). A parameter given twice is rejected:
    which copy was signed would be anyone's guess.
    """
    content_type = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if request.method == "GET" or not request.body:
        pairs = list(request.query.items())
        raw = RawPayload(content_type="text/uri-list", data=request.url.encode())
    elif content_type == "application/json":
        body = request.json()
        if not isinstance(body, dict):
            raise BadRequestError("JSON webhook body must be an object")
        pairs = [(str(k), _scalar(k, v)) for k, v in body.items() if v is not None]
        raw = RawPayload(content_type="application/json", data=request.body)
    else:
        pairs = list(request.form.items())
        raw = RawPayload(content_type=FORM, data=request.body)
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in params:
            raise BadRequestError(f"parameter {name!r} given more than once")
        params[name] = value
    return params, raw


def _scalar(name: object, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise BadRequestError(f"parameter {name!r} is not a scalar")


def signing_string(params: Mapping[str, str]) -> str:
    """``&name=value`` for every parameter except ``sig``, sorted by name."""
    return "".join(
        f"&{name}={params[name].replace('&', '_').replace('=', '_')}"
        for name in sorted(params)
        if name != SIGNATURE_PARAM
    )


def compute_signature(params: Mapping[str, str], secret: str, method: SignatureMethod) -> str:
    """Vonage's ``sig`` (lower-case hex) of ``params`` with the dashboard ``method``."""
    data = signing_string(params).encode()
    if method == "md5hash":
        return hashlib.md5(data + secret.encode()).hexdigest()
    return hmac.new(secret.encode(), data, _HMAC_DIGESTS[method]).hexdigest()


def verify_signature(
    params: Mapping[str, str],
    secret: str,
    method: SignatureMethod,
    *,
    now: float,
    max_age: float,
) -> None:
    """Raise :class:`AuthError` unless ``params`` carry a fresh, valid ``sig``."""
    signature = params.get(SIGNATURE_PARAM, "")
    if not signature:
        raise AuthError("missing sig parameter")
    if len(signature) != _HEX_LENGTH[method] or not _HEX.match(signature):
        raise AuthError(f"malformed sig parameter for method {method}")
    timestamp = params.get(TIMESTAMP_PARAM, "")
    if not timestamp.isascii() or not timestamp.isdigit():
        # Without a timestamp a captured request could be replayed forever.
        raise AuthError("missing or malformed timestamp parameter")
    if abs(now - int(timestamp)) > max_age:
        raise AuthError("stale timestamp: outside the signature window")
    expected = compute_signature(params, secret, method)
    # Vonage documents lower-case hex but some senders upper-case it.
    if not hmac.compare_digest(expected.encode(), signature.lower().encode()):
        raise AuthError("invalid sig")


# -- Messages API ------------------------------------------------------------------


def verify_jwt(
    request: WebhookRequest, secret: str, *, now: float, max_age: float
) -> dict[str, Any]:
    """Verify a Messages API webhook's bearer JWT against its raw body; return its claims.

    Checks the HS256 signature, that ``iat`` is within ``max_age`` (and not in
    the future beyond clock skew), and that ``payload_hash`` is the SHA-256 of
    the body. Every failure, including a token PyJWT cannot parse, is an
    :class:`AuthError`, never a 500.
    """
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("missing bearer token")
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            # The age check below uses the injectable clock; PyJWT's uses the wall clock.
            options={"require": ["iat", "payload_hash"], "verify_iat": False},
        )
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        # PyJWT raises its own errors for malformed tokens; anything else it
        # lets through is still a bad token, never a 500.
        raise AuthError(f"invalid JWT: {type(exc).__name__}") from exc
    issued = claims["iat"]
    if isinstance(issued, bool) or not isinstance(issued, int | float):
        raise AuthError("invalid JWT: iat is not a number")
    if now - issued > max_age or issued - now > CLOCK_SKEW_SECONDS:
        raise AuthError("stale JWT: iat outside the signature window")
    claimed = claims["payload_hash"]
    if not isinstance(claimed, str):
        raise AuthError("invalid JWT: payload_hash is not a string")
    actual = hashlib.sha256(request.body).hexdigest()
    if not hmac.compare_digest(actual.encode(), claimed.lower().encode()):
        raise AuthError("body does not match the JWT payload_hash")
    return claims


def json_object(request: WebhookRequest) -> dict[str, Any]:
    """The body of a Messages API webhook: a JSON object (else a 400)."""
    body = request.json()
    if not isinstance(body, dict):
        raise BadRequestError("JSON webhook body must be an object")
    return body


def raw_json(request: WebhookRequest) -> RawPayload:
    """The raw payload of a JSON webhook."""
    return RawPayload(content_type="application/json", data=request.body)
