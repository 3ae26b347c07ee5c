"""Meta webhook authentication: the verification handshake and ``X-Hub-Signature-256``.

Every POST carries ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256(app secret,
raw body)>``. The raw bytes are what is signed: Meta escapes non-ASCII
characters (``\\u00e9``) in its JSON, so a re-serialized body would not match.
The legacy ``X-Hub-Signature`` (SHA-1) header alone is refused.
https://developers.facebook.com/docs/graph-api/webhooks/getting-started#event-notifications

Subscribing a callback URL, Meta sends ``GET ?hub.mode=subscribe&
hub.verify_token=<ours>&hub.challenge=<n>`` and expects the challenge back.
https://developers.facebook.com/docs/graph-api/webhooks/getting-started#verification-requests
"""

from __future__ import annotations

import hashlib
import hmac
import re

from gateway.contract import AuthError, WebhookReply, WebhookRequest

SIGNATURE_HEADER = "X-Hub-Signature-256"
LEGACY_SIGNATURE_HEADER = "X-Hub-Signature"
_SIGNATURE = re.compile(r"^sha256=([0-9a-fA-F]{64})$")
#: Meta's challenges are short integers; anything long or odd is not Meta.
_CHALLENGE = re.compile(r"^[A-Za-z0-9_\-.]{1,128}$")


def compute_signature(body: bytes, app_secret: str) -> str:
    """``sha256=<hex>`` as Meta writes it for ``body``."""
    return "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(request: WebhookRequest, app_secret: str) -> None:
    """Raise :class:`AuthError` unless the raw body carries a valid ``X-Hub-Signature-256``."""
    header = request.headers.get(SIGNATURE_HEADER, "").strip()
    if not header:
        if request.headers.get(LEGACY_SIGNATURE_HEADER):
            raise AuthError("only the legacy SHA-1 X-Hub-Signature was sent; SHA-256 is required")
        raise AuthError("missing X-Hub-Signature-256")
    match = _SIGNATURE.match(header)
    if match is None:
        raise AuthError("malformed X-Hub-Signature-256")
    expected = hmac.new(app_secret.encode(), request.body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), match.group(1).lower().encode()):
        raise AuthError("invalid X-Hub-Signature-256")


def verification_reply(request: WebhookRequest, verify_token: str) -> WebhookReply:
    """Answer Meta's subscription handshake; :class:`AuthError` (403) unless it is ours."""
    mode = request.query.get("hub.mode", "")
    token = request.query.get("hub.verify_token", "")
    challenge = request.query.get("hub.challenge", "")
    if mode != "subscribe":
        raise AuthError("verification request without hub.mode=subscribe", status=403)
    if not token or not hmac.compare_digest(token.encode(), verify_token.encode()):
        raise AuthError("wrong hub.verify_token", status=403)
    if not _CHALLENGE.match(challenge):
        raise AuthError("missing or malformed hub.challenge", status=403)
    return WebhookReply(status=200, body=challenge.encode(), content_type="text/plain")
