"""Async client for the Vonage Messages API (v1), SMS channel.

``POST {base}/v1/messages`` with Basic auth (API key and secret) or a Bearer
application JWT (RS256, signed with the application's private key). A 202
answer carries the ``message_uuid``; errors are RFC 7807 problem documents
whose ``type`` URL fragment is Vonage's code (``...#1150``, ``...#low-balance``).

https://developer.vonage.com/en/api/messages#SendMessage
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import aiohttp
import jwt

from gateway.contract import AmbiguousSendError, ConfigError, PermanentError
from gateway.contract.http import ProviderRejectedError, request

DEFAULT_API_BASE = "https://api.nexmo.com"
MESSAGES_PATH = "/v1/messages"
#: Lifetime of the application JWTs we mint (Vonage's SDKs use 15 minutes).
JWT_TTL_SECONDS = 900


class ApplicationJwt:
    """Mints Vonage application JWTs (RS256) as Vonage's SDK does.

    Claims: ``application_id``, ``iat``, ``jti`` (fresh per token), ``exp``.
    """

    def __init__(self, application_id: str, private_key: str) -> None:
        self._application_id = application_id
        self._private_key = private_key

    def token(self, now: float | None = None) -> str:
        """A fresh token."""
        issued = int(time.time() if now is None else now)
        claims = {
            "application_id": self._application_id,
            "iat": issued,
            "jti": str(uuid.uuid4()),
            "exp": issued + JWT_TTL_SECONDS,
        }
        try:
            return jwt.encode(claims, self._private_key, algorithm="RS256")
        except (jwt.PyJWTError, ValueError, TypeError, NotImplementedError) as exc:
            # NotImplementedError: PyJWT without the ``cryptography`` package.
            raise ConfigError(
                f"cannot sign a Vonage application JWT with the configured private key: {exc}"
            ) from exc


class VonageClient:
    """Sends messages through the Messages API for one account."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        api_base: str,
        api_key: str,
        api_secret: str | None = None,
        application_jwt: ApplicationJwt | None = None,
    ) -> None:
        if application_jwt is None and not api_secret:
            raise ConfigError("Vonage needs an API secret or an application id and private key")
        self._session = session
        self._url = api_base.rstrip("/") + MESSAGES_PATH
        self._jwt = application_jwt
        self._basic = aiohttp.encode_basic_auth(api_key, api_secret) if api_secret else None

    def _authorization(self) -> dict[str, str]:
        # An application JWT wins when both are configured: it is what Vonage
        # recommends and what ACL-restricted applications accept.
        if self._jwt is not None:
            return {"Authorization": f"Bearer {self._jwt.token()}"}
        assert self._basic is not None
        return {"Authorization": self._basic}

    async def send_message(self, payload: dict[str, Any]) -> str:
        """POST one message; returns its ``message_uuid``."""
        try:
            response = await request(
                self._session,
                "POST",
                self._url,
                provider="vonage",
                json=payload,
                headers={**self._authorization(), "Accept": "application/json"},
            )
        except ProviderRejectedError as exc:
            code = error_code(exc.body)
            raise PermanentError(
                f"vonage rejected the message ({exc.status}): {exc.body}",
                code=code or f"http_{exc.status}",
            ) from exc
        answer = response.json()
        message_uuid = answer.get("message_uuid") if isinstance(answer, dict) else None
        if not isinstance(message_uuid, str) or not message_uuid:
            raise AmbiguousSendError("vonage answered 2xx without a message_uuid")
        return message_uuid


def error_code(body: str) -> str | None:
    """Vonage's code from a problem document: the fragment of its ``type`` URL."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    kind = parsed.get("type") if isinstance(parsed, dict) else None
    if isinstance(kind, str) and "#" in kind:
        return kind.rsplit("#", 1)[1] or None
    return None
