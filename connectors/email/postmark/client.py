"""Async client for Postmark's email API (``POST /email``).

https://postmarkapp.com/developer/user-guide/send-email-with-api
Authenticated with ``X-Postmark-Server-Token``; success is ``200`` with
``{"ErrorCode": 0, "MessageID": ...}``, a refused mail ``422`` with Postmark's
``ErrorCode`` (e.g. 300 invalid request, 406 inactive recipient). Postmark
takes no idempotency key, so a lost answer is ambiguous (never retried).
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from gateway.contract import AmbiguousSendError, PermanentError
from gateway.contract.http import ProviderRejectedError, request

DEFAULT_API_BASE = "https://api.postmarkapp.com"


class PostmarkClient:
    """Sends mail with one server token."""

    def __init__(self, session: aiohttp.ClientSession, *, api_base: str, token: str) -> None:
        self._session = session
        self._url = f"{api_base.rstrip('/')}/email"
        self._headers = {"X-Postmark-Server-Token": token, "Accept": "application/json"}

    async def send(self, payload: dict[str, Any]) -> str:
        """Send one mail; returns Postmark's MessageID."""
        try:
            response = await request(
                self._session,
                "POST",
                self._url,
                provider="postmark",
                json=payload,
                headers=self._headers,
            )
        except ProviderRejectedError as exc:
            code, message = _error(exc.body)
            raise PermanentError(
                f"postmark rejected the mail: {message}", code=code or f"http_{exc.status}"
            ) from exc
        body = response.json()
        if not isinstance(body, dict) or body.get("ErrorCode", 0) != 0:
            raise PermanentError(
                f"postmark refused the mail: {body!r}"[:500], code="postmark_error"
            )
        message_id = body.get("MessageID")
        if not isinstance(message_id, str) or not message_id:
            raise AmbiguousSendError("postmark answered 200 without a MessageID")
        return message_id


def _error(body: str) -> tuple[str, str]:
    try:
        data = json.loads(body)
    except ValueError:
        return "", body
    if not isinstance(data, dict):
        return "", body
    return str(data.get("ErrorCode") or ""), str(data.get("Message") or body)
