"""Async client for the Vonage Voice API (v1): create calls, modify live ones.

Every request carries ``Authorization: Bearer <application JWT>`` (RS256 with
the application's private key, minted by the SMS connector's
:class:`~connectors.sms.vonage.client.ApplicationJwt`, as Vonage's SDKs do).

- ``POST /v1/calls`` (201: ``uuid``, ``status``, ``direction``, ``conversation_uuid``)
- ``PUT /v1/calls/{uuid}`` (204): ``transfer`` to an NCCO, ``hangup``

Errors, as Vonage documents and answers them (an RFC 7807-style document with
``type``/``title``/``detail``, older answers ``type``/``error_title`` or
``invalid_parameters``):

======================  =====================================================
answer                  error
======================  =====================================================
404                     PermanentError ``call_not_found``
401, 403                PermanentError ``auth`` (the application's key or ACL)
400, 422, other 4xx     PermanentError with Vonage's type (``#fragment`` of a
                        type URL, else the type or title), reason = its text
429, 5xx                TransientError, with the answer's Retry-After
connection refused      TransientError ``connect_failed`` (nothing was sent)
timeout after sending   AmbiguousSendError: never retried, so a call is never
                        placed twice (Vonage takes no idempotency key)
======================  =====================================================

https://developer.vonage.com/en/api/voice
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from connectors.sms.vonage.client import ApplicationJwt
from gateway.contract import AmbiguousSendError, PermanentError, TransientError
from gateway.contract.http import ProviderRejectedError, request

DEFAULT_API_BASE = "https://api.nexmo.com"
CALLS_PATH = "/v1/calls"


@dataclass(frozen=True, kw_only=True)
class CreatedCall:
    """Vonage's answer to a create call request."""

    uuid: str
    status: str
    conversation_uuid: str
    direction: str


class VonageVoiceClient:
    """Voice API calls of one Vonage application."""

    def __init__(
        self, session: aiohttp.ClientSession, *, api_base: str, application_jwt: ApplicationJwt
    ) -> None:
        self._session = session
        self._calls = api_base.rstrip("/") + CALLS_PATH
        self._jwt = application_jwt

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._jwt.token()}", "Accept": "application/json"}

    async def create_call(self, body: dict[str, Any]) -> CreatedCall:
        """``POST /v1/calls``; a timeout once sent is ambiguous (never retried)."""
        try:
            response = await request(
                self._session,
                "POST",
                self._calls,
                provider="vonage",
                json=body,
                headers=self._headers(),
            )
        except ProviderRejectedError as exc:
            raise rejected(exc, "create call") from exc
        answer = response.json()
        uuid = answer.get("uuid") if isinstance(answer, dict) else None
        if not isinstance(uuid, str) or not uuid:
            # The call may exist: a retry could place a second one.
            raise AmbiguousSendError("vonage answered 2xx to create call without a uuid")
        return CreatedCall(
            uuid=uuid,
            status=_text(answer, "status"),
            conversation_uuid=_text(answer, "conversation_uuid"),
            direction=_text(answer, "direction"),
        )

    async def modify_call(self, uuid: str, body: dict[str, Any], *, idempotent: bool) -> None:
        """``PUT /v1/calls/{uuid}`` (transfer, hangup).

        ``idempotent`` (a hangup): a timeout after sending is retried as
        transient, because repeating it cannot do anything twice. A transfer
        is not: repeating it would restart the new NCCO (ring a transfer
        target again), so its timeout stays ambiguous.
        """
        url = f"{self._calls}/{quote(uuid, safe='')}"
        try:
            await request(
                self._session, "PUT", url, provider="vonage", json=body, headers=self._headers()
            )
        except ProviderRejectedError as exc:
            raise rejected(exc, f"{body.get('action', 'modify')} call") from exc
        except AmbiguousSendError as exc:
            if idempotent:
                raise TransientError(str(exc), code="timeout") from exc
            raise


def _text(answer: dict[str, Any], name: str) -> str:
    value = answer.get(name)
    return value if isinstance(value, str) else ""


def problem(body: str) -> tuple[str, str]:
    """(code, text) of a Vonage error document; empty strings when it is not one.

    The code is the fragment of a ``type`` URL (``...api-errors#not-found``),
    else ``type`` itself (``BAD_REQUEST``, or ``400`` in old answers) or the title.
    """
    try:
        parsed = json.loads(body)
    except ValueError:
        return "", ""
    if not isinstance(parsed, dict):
        return "", ""
    kind = parsed.get("type")
    title = parsed.get("title") or parsed.get("error_title") or ""
    code = ""
    if isinstance(kind, str) and kind:
        code = kind.rsplit("#", 1)[1] if "#" in kind else kind
    elif isinstance(title, str):
        code = title
    parts = [str(p) for p in (title, parsed.get("detail")) if p]
    for item in parsed.get("invalid_parameters") or ():
        if isinstance(item, dict):
            parts.append(f"{item.get('name', '?')}: {item.get('reason', '?')}")
    return code.strip().lower().replace(" ", "_"), "; ".join(parts)


def rejected(exc: ProviderRejectedError, what: str) -> PermanentError:
    """The permanent error of a 4xx (not 429) answer."""
    code, text = problem(exc.body)
    detail = text or exc.body
    if exc.status == 404:
        return PermanentError(
            f"vonage {what}: the call does not exist (404): {detail}", code="call_not_found"
        )
    if exc.status in (401, 403):
        return PermanentError(
            f"vonage {what}: the application's credentials were refused ({exc.status}): {detail}",
            code="auth",
        )
    return PermanentError(
        f"vonage {what} rejected ({exc.status}): {detail}", code=code or f"http_{exc.status}"
    )
