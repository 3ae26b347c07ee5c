"""Async client for the Twilio Calls REST API (2010-04-01): create and update calls.

https://www.twilio.com/docs/voice/api/call-resource#create-a-call-resource
https://www.twilio.com/docs/voice/api/call-resource#update-a-call-resource

HTTP outcomes become error types in :func:`gateway.contract.http.request`
(shared with every connector); Twilio's error body is read by the SMS client's
:func:`~connectors.sms.twilio.client.error_code`. What differs per operation is
whether a lost answer may be retried:

- creating a call is not idempotent (Twilio takes no idempotency key): a
  timeout or disconnect after the request went out is
  :class:`~gateway.contract.AmbiguousSendError`, so a call is never placed twice;
- ending a live call (``Status=completed``) does nothing twice, so a lost
  answer is a :class:`~gateway.contract.TransientError` and the runtime
  repeats it;
- giving a live call new TwiML (transfer, enqueue, speak) restarts that TwiML
  when repeated: a transfer target would ring again, a caller would hear the
  message twice. A lost answer is ambiguous, as for a new call (the Vonage
  connector decides the same).
"""

from __future__ import annotations

import re
from typing import Any

import aiohttp

from connectors.sms.twilio.client import error_code
from gateway.contract import AmbiguousSendError, PermanentError, TransientError
from gateway.contract.http import ProviderRejectedError, request

#: Twilio's call SID: "CA" and 32 hex digits.
CALL_SID = re.compile(r"^CA[0-9a-fA-F]{32}$")
#: "Call is not in-progress. Cannot redirect." (an update of a call that ended).
NOT_IN_PROGRESS = "21220"


class TwilioCallsClient:
    """Creates and updates calls of one account with HTTP Basic auth."""

    def __init__(
        self, session: aiohttp.ClientSession, *, api_base: str, account_sid: str, auth_token: str
    ) -> None:
        self._session = session
        self._calls = f"{api_base.rstrip('/')}/2010-04-01/Accounts/{account_sid}/Calls"
        self._headers = {"Authorization": aiohttp.encode_basic_auth(account_sid, auth_token)}

    async def create_call(self, form: list[tuple[str, str]]) -> dict[str, Any]:
        """POST a new call; returns Twilio's call resource (``sid``, ``status`` ...)."""
        try:
            response = await request(
                self._session,
                "POST",
                f"{self._calls}.json",
                provider="twilio",
                data=form,
                headers=self._headers,
            )
        except ProviderRejectedError as exc:
            raise _rejected(exc, "the call") from exc
        return _resource(response.json())

    async def update_call(
        self, call_sid: str, form: list[tuple[str, str]], *, repeatable: bool
    ) -> dict[str, Any]:
        """POST an update of a live call; returns Twilio's call resource.

        ``repeatable``: the update does nothing twice when repeated (ending
        the call), so an answer lost after sending is transient, not ambiguous.
        """
        if not CALL_SID.match(call_sid):
            # Also keeps anything but a SID out of the request path.
            raise PermanentError(f"not a Twilio call SID: {call_sid!r}", code="invalid_call_id")
        try:
            response = await request(
                self._session,
                "POST",
                f"{self._calls}/{call_sid}.json",
                provider="twilio",
                data=form,
                headers=self._headers,
            )
            return _resource(response.json())
        except ProviderRejectedError as exc:
            if exc.status == 404:
                raise PermanentError(
                    f"twilio has no call {call_sid}: {exc.body}", code="call_not_found"
                ) from exc
            if error_code(exc.body) == NOT_IN_PROGRESS:
                raise PermanentError(
                    f"call {call_sid} is not in progress: {exc.body}", code="call_not_in_progress"
                ) from exc
            raise _rejected(exc, "the call update") from exc
        except AmbiguousSendError as exc:
            if not repeatable:
                raise
            raise TransientError(
                f"twilio: update of {call_sid} unconfirmed, safe to repeat: {exc}",
                code="update_unconfirmed",
            ) from exc


def _rejected(exc: ProviderRejectedError, what: str) -> PermanentError:
    # Twilio's error body: {"code": 21211, "message": "...", "more_info": "...", "status": 400}
    code = error_code(exc.body)
    return PermanentError(f"twilio rejected {what}: {exc.body}", code=code or f"http_{exc.status}")


def _resource(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict) or not body.get("sid"):
        raise AmbiguousSendError("twilio answered 2xx without a call sid")
    return body
