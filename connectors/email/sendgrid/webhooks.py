"""SendGrid signed webhooks: ECDSA P-256 over ``timestamp + raw body``.

The Event Webhook (and an Inbound Parse webhook with a signature security
policy) carries ``X-Twilio-Email-Event-Webhook-Signature`` (base64 DER ECDSA
signature) and ``X-Twilio-Email-Event-Webhook-Timestamp``; the signed bytes
are the timestamp followed by the raw body, verified with the account's
verification key (base64 SubjectPublicKeyInfo, as the SendGrid UI shows it).
SendGrid's own helper does not check the timestamp's age, so we hold it to a
freshness window (a captured request cannot be replayed later).
https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/getting-started-event-webhook-security-features
https://www.twilio.com/docs/sendgrid/for-developers/parsing-email/securing-your-parse-webhooks
"""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

from gateway.contract import AuthError, ConfigError, WebhookRequest

SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
#: How far in the future a timestamp may be (clock skew).
CLOCK_SKEW_SECONDS = 60.0


def load_verification_key(text: str) -> ec.EllipticCurvePublicKey:
    """The account's verification key (base64 SPKI, PEM armour optional)."""
    body = "".join(
        line for line in text.strip().splitlines() if not line.startswith("-----")
    ).strip()
    try:
        key = load_der_public_key(base64.b64decode(body, validate=True))
    except (binascii.Error, ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"unreadable SendGrid verification key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ConfigError("SendGrid verification key is not an ECDSA P-256 public key")
    return key


def verify(
    request: WebhookRequest, key: ec.EllipticCurvePublicKey, *, now: float, max_age: float
) -> None:
    """Raise :class:`AuthError` unless the request carries a fresh, valid signature."""
    signature = request.headers.get(SIGNATURE_HEADER, "").strip()
    timestamp = request.headers.get(TIMESTAMP_HEADER, "").strip()
    if not signature or not timestamp:
        raise AuthError("missing SendGrid signature or timestamp header")
    if not timestamp.isascii() or not timestamp.isdigit():
        raise AuthError("malformed SendGrid timestamp")
    age = now - int(timestamp)
    if age > max_age or -age > CLOCK_SKEW_SECONDS:
        raise AuthError("stale SendGrid timestamp: outside the signature window")
    try:
        der = base64.b64decode(signature, validate=True)
        key.verify(der, timestamp.encode() + request.body, ec.ECDSA(hashes.SHA256()))
    except (binascii.Error, ValueError, InvalidSignature) as exc:
        raise AuthError("invalid SendGrid signature") from exc
