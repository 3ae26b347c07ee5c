"""Mailgun webhook signatures: HMAC-SHA256 of ``timestamp + token``.

Every Mailgun webhook (route forwards and event webhooks) carries
``timestamp``, ``token`` and ``signature`` (top-level form fields for routes,
a ``signature`` object in event JSON), with
``signature = hex(HMAC-SHA256(webhook signing key, timestamp + token))``.
https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/securing-webhooks

The signature does not cover the body, so on top of a freshness window a
token is bound to the first body it came with: Mailgun's retry of the same
webhook (same token, same body) passes, a captured token reused with another
body is refused. The cache is per process; across replicas the events' ids
still dedupe a plain replay.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections import OrderedDict

from gateway.contract import AuthError

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
#: How far in the future a timestamp may be (clock skew).
CLOCK_SKEW_SECONDS = 60.0


def compute_signature(signing_key: str, timestamp: str, token: str) -> str:
    """Mailgun's signature (lower-case hex)."""
    return hmac.new(signing_key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()


class TokenCache:
    """Tokens seen within the signature window, each bound to its body's hash."""

    def __init__(self, ttl: float, *, max_entries: int = 100_000) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._seen: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def check_and_remember(self, token: str, body: bytes, *, now: float) -> None:
        """Raise :class:`AuthError` when ``token`` came before with another body."""
        while self._seen:
            oldest, (seen_at, _) = next(iter(self._seen.items()))
            if now - seen_at <= self._ttl and len(self._seen) < self._max:
                break
            del self._seen[oldest]
        digest = hashlib.sha256(body).hexdigest()
        previous = self._seen.get(token)
        if previous is not None and not hmac.compare_digest(previous[1], digest):
            raise AuthError("Mailgun token replayed with another body")
        self._seen[token] = (previous[0] if previous else now, digest)


def verify(
    signing_key: str,
    *,
    timestamp: str,
    token: str,
    signature: str,
    body: bytes,
    now: float,
    max_age: float,
    tokens: TokenCache,
) -> None:
    """Raise :class:`AuthError` unless the fields are a fresh, valid Mailgun signature."""
    if not timestamp or not token or not signature:
        raise AuthError("missing Mailgun timestamp, token or signature")
    if not timestamp.isascii() or not timestamp.isdigit():
        raise AuthError("malformed Mailgun timestamp")
    if not _HEX64.match(signature):
        raise AuthError("malformed Mailgun signature")
    age = now - int(timestamp)
    if age > max_age or -age > CLOCK_SKEW_SECONDS:
        raise AuthError("stale Mailgun timestamp: outside the signature window")
    expected = compute_signature(signing_key, timestamp, token)
    if not hmac.compare_digest(expected.encode(), signature.lower().encode()):
        raise AuthError("invalid Mailgun signature")
    tokens.check_and_remember(token, body, now=now)
