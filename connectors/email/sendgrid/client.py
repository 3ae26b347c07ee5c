"""Async client for SendGrid's v3 Mail Send API.

https://www.twilio.com/docs/sendgrid/api-reference/mail-send/mail-send
``POST /v3/mail/send`` with a Bearer API key answers ``202 Accepted`` and the
message's id in ``X-Message-Id``; errors come as ``{"errors": [{"message",
"field"}]}``. SendGrid takes no idempotency key, so a send whose answer was
lost is ambiguous (never retried).
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from gateway.contract import AmbiguousSendError, PermanentError
from gateway.contract.http import ProviderRejectedError, request

DEFAULT_API_BASE = "https://api.sendgrid.com"


class SendGridClient:
    """Sends mail with one account's API key."""

    def __init__(self, session: aiohttp.ClientSession, *, api_base: str, api_key: str) -> None:
        self._session = session
        self._url = f"{api_base.rstrip('/')}/v3/mail/send"
        self._headers = {"Authorization": f"Bearer {api_key}"}

    async def send(self, payload: dict[str, Any]) -> str:
        """Send one mail; returns SendGrid's message id (``X-Message-Id``)."""
        try:
            response = await request(
                self._session,
                "POST",
                self._url,
                provider="sendgrid",
                json=payload,
                headers=self._headers,
            )
        except ProviderRejectedError as exc:
            raise PermanentError(
                f"sendgrid rejected the mail: {_errors(exc.body)}", code=f"http_{exc.status}"
            ) from exc
        message_id = response.headers.get("X-Message-Id", "")
        if not message_id:
            raise AmbiguousSendError("sendgrid answered 2xx without X-Message-Id")
        return message_id


def _errors(body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body
    errors = data.get("errors") if isinstance(data, dict) else None
    if isinstance(errors, list):
        return "; ".join(
            f"{e.get('field') or '-'}: {e.get('message')}" for e in errors if isinstance(e, dict)
        )
    return body
