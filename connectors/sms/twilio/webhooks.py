"""``X-Twilio-Signature`` verification, exactly as Twilio computes it.

Form requests: ``base64(HMAC-SHA1(auth_token, url + Σ sorted(name + value)))``
with parameter names sorted and each name's distinct values sorted. JSON
requests carry ``bodySHA256`` in the URL query: the signature covers the URL
alone and the body must hash to it. Like Twilio's own validator, the URL is
tried as called, without its port and with the scheme's default port, since
Twilio is not consistent about including a port. A Twilio SharedKey signature names its
algorithm (HMAC_SHA256) in ``X-Twilio-Webhooks-Signature-Settings``.

https://www.twilio.com/docs/usage/security#validating-requests
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit

from gateway.contract import AuthError, WebhookRequest

SIGNATURE_HEADER = "X-Twilio-Signature"
SETTINGS_HEADER = "X-Twilio-Webhooks-Signature-Settings"
_ALGORITHMS = {"HMAC_SHA1": hashlib.sha1, "HMAC_SHA256": hashlib.sha256}


def compute_signature(
    secret: str, url: str, params: Mapping[str, list[str]], algorithm: str = "HMAC_SHA1"
) -> str:
    """Twilio's signature of ``url`` and form ``params`` (name -> all values)."""
    return _signature(secret, url, [(name, v) for name, values in params.items() for v in values])


def _signature(
    secret: str, url: str, pairs: Iterable[tuple[str, str]], algorithm: str = "HMAC_SHA1"
) -> str:
    # Names sorted, each name's distinct values sorted: the order of the
    # sorted set of (name, value) pairs, built in one C-level sort and join.
    data = url + "".join([name + value for name, value in sorted(set(pairs))])
    mac = hmac.new(secret.encode(), data.encode(), _ALGORITHMS[algorithm])
    return base64.b64encode(mac.digest()).decode()


def _url_variants(url: str) -> list[str]:
    # Twilio has signed URLs with a port both with and without it (also for
    # non-default ports: twilio-python #402/#477, twilio-csharp #44), so, like
    # its SDK validators, try the URL as called, without its port, and with the
    # scheme's default port. Host text is kept as is (no case folding).
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    host, port = hostport, ""
    if hostport.startswith("["):  # IPv6 literal
        end = hostport.find("]") + 1
        host, port = hostport[:end], hostport[end + 1 :]
    elif ":" in hostport:
        host, _, port = hostport.rpartition(":")
    default = "443" if parts.scheme == "https" else "80"
    without_port = urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}"))
    with_port = urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}:{port or default}"))
    return list(dict.fromkeys((url, without_port, with_port)))


def _algorithm(settings_header: str | None) -> str:
    for part in (settings_header or "").split(","):
        name, sep, value = part.partition("=")
        if sep and name.strip() == "algorithm" and value.strip():
            return value.strip().upper()
    return "HMAC_SHA1"


def verify(request: WebhookRequest, secret: str) -> None:
    """Raise :class:`AuthError` unless ``request`` carries a valid Twilio signature."""
    signature = request.headers.get(SIGNATURE_HEADER)
    if not signature:
        raise AuthError(f"missing {SIGNATURE_HEADER}")
    algorithm = _algorithm(request.headers.get(SETTINGS_HEADER))
    if algorithm not in _ALGORITHMS:
        raise AuthError(f"unsupported Twilio signature algorithm {algorithm!r}")
    body_hash = request.query.get("bodySHA256")
    pairs: list[tuple[str, str]] = []
    if body_hash is not None:
        expected_hash = hashlib.sha256(request.body).hexdigest()
        if not hmac.compare_digest(expected_hash, body_hash):
            raise AuthError("body does not match bodySHA256")
    else:
        pairs = list(request.form.items())  # empty for GET: Twilio then signs the URL alone
    expected = signature.encode()
    # The URL as called matches almost always: build the port variants only
    # when it does not.
    if hmac.compare_digest(_signature(secret, request.url, pairs, algorithm).encode(), expected):
        return
    for url in _url_variants(request.url)[1:]:
        if hmac.compare_digest(_signature(secret, url, pairs, algorithm).encode(), expected):
            return
    raise AuthError("invalid X-Twilio-Signature")
