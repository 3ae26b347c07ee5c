"""Async client for the Twilio Messages REST API (2010-04-01).

https://www.twilio.com/docs/messaging/api/message-resource#create-a-message-resource
"""

from __future__ import annotations

import json

import aiohttp

from gateway.contract import AmbiguousSendError, PermanentError
from gateway.contract.http import ProviderRejectedError, request

DEFAULT_API_BASE = "https://api.twilio.com"


class TwilioClient:
    """Creates messages with HTTP Basic auth (account SID, auth token)."""

    def __init__(
        self, session: aiohttp.ClientSession, *, api_base: str, account_sid: str, auth_token: str
    ) -> None:
        self._session = session
        self._url = f"{api_base.rstrip('/')}/2010-04-01/Accounts/{account_sid}/Messages.json"
        self._headers = {"Authorization": aiohttp.encode_basic_auth(account_sid, auth_token)}

    async def create_message(self, form: list[tuple[str, str]]) -> dict[str, object]:
        """POST a message; returns Twilio's message resource (``sid``, ``status`` ...)."""
        try:
            response = await request(
                self._session,
                "POST",
                self._url,
                provider="twilio",
                data=form,
                headers=self._headers,
            )
        except ProviderRejectedError as exc:
            # Twilio's error body: {"code": 21211, "message": "...", "status": 400}
            code = error_code(exc.body)
            raise PermanentError(
                f"twilio rejected the message: {exc.body}", code=code or f"http_{exc.status}"
            ) from exc
        resource = response.json()
        if not isinstance(resource, dict) or not resource.get("sid"):
            raise AmbiguousSendError("twilio answered 2xx without a message sid")
        return resource


def error_code(body: str) -> str | None:
    """Twilio's error code (e.g. ``"21211"``) from an error body, if it names one."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    code = parsed.get("code") if isinstance(parsed, dict) else None
    return str(code) if code is not None else None
