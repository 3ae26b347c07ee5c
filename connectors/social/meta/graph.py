"""Async client for Meta's Graph API (WhatsApp Cloud API, Messenger and Instagram send).

Errors come back as ``{"error": {"message", "type", "code", "error_subcode",
"fbtrace_id"}}``. Throttling is often a 400 with a rate-limit code rather than
a 429, so the code decides: rate-limit and temporary codes are transient,
everything else a 4xx says is permanent.
https://developers.facebook.com/docs/graph-api/guides/error-handling
https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from gateway.contract import AmbiguousSendError, PermanentError, TransientError
from gateway.contract.http import ProviderRejectedError, request

DEFAULT_GRAPH_BASE = "https://graph.facebook.com"
DEFAULT_GRAPH_VERSION = "v21.0"

#: Graph error codes that a later attempt may get past: throttling (4, 17, 32,
#: 613, 80007, 130429, 131048, 131056) and temporary failures (1, 2, 131000,
#: 131016 "service unavailable").
TRANSIENT_CODES = frozenset(
    {"1", "2", "4", "17", "32", "613", "80007", "130429", "131000", "131016", "131048", "131056"}
)


def graph_error(body: str) -> tuple[str, str]:
    """``(code, message)`` of a Graph error body (empty strings when it is not one)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return "", ""
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict):
        return "", ""
    code = error.get("code")
    message = error.get("error_user_msg") or error.get("message") or ""
    return (str(code) if isinstance(code, int | str) else ""), str(message)


class GraphClient:
    """Calls the Graph API with a bearer access token."""

    def __init__(self, session: aiohttp.ClientSession, *, base_url: str, version: str) -> None:
        self._session = session
        self._base = base_url.rstrip("/") + "/" + version.strip("/")

    def url(self, path: str) -> str:
        """Absolute URL of a Graph path (``/<phone-number-id>/messages``)."""
        return self._base + "/" + path.lstrip("/")

    async def call(
        self, method: str, path: str, *, token: str, payload: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """One Graph call; the JSON object answered, or an error carrying the retry decision."""
        try:
            response = await request(
                self._session,
                method,
                self.url(path),
                provider="meta",
                json=payload,
                headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            )
        except ProviderRejectedError as exc:
            code, message = graph_error(exc.body)
            if code in TRANSIENT_CODES:
                raise TransientError(
                    f"meta: throttled or temporarily failing ({code}): {message}",
                    code=code,
                ) from exc
            raise PermanentError(
                f"meta rejected the request ({exc.status}, code {code or '?'}): "
                f"{message or exc.body}",
                code=code or f"http_{exc.status}",
            ) from exc
        answer = response.json()
        if not isinstance(answer, dict):
            raise AmbiguousSendError("meta answered 2xx with a non-object body")
        return answer
