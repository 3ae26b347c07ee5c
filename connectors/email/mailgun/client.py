"""Async client for Mailgun's Messages API (``POST /v3/{domain}/messages``).

https://documentation.mailgun.com/docs/mailgun/api-reference/openapi-final/tag/Messages/
Basic auth ``api:<key>``, a multipart form (``from``, ``to``, ``subject``,
``text``, ``html``, ``h:<header>``, ``v:<user variable>``, ``attachment`` /
``inline`` files); success is ``200 {"id": "<...>", "message": "Queued. Thank you."}``.
Mailgun takes no idempotency key, so a lost answer is ambiguous.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import aiohttp

from gateway.contract import AmbiguousSendError, PermanentError
from gateway.contract.http import ProviderRejectedError, request

DEFAULT_API_BASE = "https://api.mailgun.net"


class MailgunClient:
    """Sends mail for one sending domain."""

    def __init__(
        self, session: aiohttp.ClientSession, *, api_base: str, api_key: str, domain: str
    ) -> None:
        self._session = session
        self._url = f"{api_base.rstrip('/')}/v3/{domain}/messages"
        self._headers = {"Authorization": aiohttp.encode_basic_auth("api", api_key)}

    async def send(
        self,
        fields: Sequence[tuple[str, str]],
        files: Sequence[tuple[str, bytes, str, str]] = (),
    ) -> str:
        """Send one mail; ``files`` are (field, data, filename, content type). Returns the id."""
        form = aiohttp.FormData()
        for name, value in fields:
            form.add_field(name, value)
        for name, data, filename, content_type in files:
            form.add_field(name, data, filename=filename, content_type=content_type)
        try:
            response = await request(
                self._session,
                "POST",
                self._url,
                provider="mailgun",
                data=form,
                headers=self._headers,
            )
        except ProviderRejectedError as exc:
            raise PermanentError(
                f"mailgun rejected the mail: {_message(exc.body)}", code=f"http_{exc.status}"
            ) from exc
        body = response.json()
        message_id = body.get("id") if isinstance(body, dict) else None
        if not isinstance(message_id, str) or not message_id:
            raise AmbiguousSendError("mailgun answered 200 without a message id")
        return message_id


def _message(body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body
    return str(data.get("message") or body) if isinstance(data, dict) else body
