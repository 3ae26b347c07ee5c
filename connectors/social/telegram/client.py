"""Async client for the Telegram Bot API.

``POST {base}/bot<token>/<method>`` with a JSON body; answers are
``{"ok": true, "result": ...}`` or ``{"ok": false, "error_code",
"description", "parameters": {"retry_after"}}``. A 429 carries
``parameters.retry_after`` (seconds), honoured as the retry delay.
https://core.telegram.org/bots/api#making-requests

The token is part of the URL: it never appears in an error message.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from gateway.contract import AmbiguousSendError, PermanentError, TransientError
from gateway.contract.http import parse_retry_after

DEFAULT_API_BASE = "https://api.telegram.org"


def _error(body: str) -> tuple[str, str, float | None]:
    """``(error_code, description, retry_after)`` of an error answer."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return "", "", None
    if not isinstance(parsed, dict):
        return "", "", None
    params = parsed.get("parameters")
    retry_after = params.get("retry_after") if isinstance(params, dict) else None
    return (
        str(parsed.get("error_code", "")),
        str(parsed.get("description", "")),
        float(retry_after) if isinstance(retry_after, int | float) else None,
    )


class TelegramClient:
    """Calls Bot API methods for one bot."""

    def __init__(self, session: aiohttp.ClientSession, *, api_base: str, token: str) -> None:
        self._session = session
        self._base = f"{api_base.rstrip('/')}/bot{token}/"

    async def call(self, method: str, payload: dict[str, Any]) -> Any:
        """Call ``method``; its ``result``, or an error carrying the retry decision.

        Connection failures before the request went out are transient; a
        timeout or disconnect after it went out is ambiguous (never resent).
        """
        try:
            async with self._session.post(self._base + method, json=payload) as resp:
                status, body = resp.status, await resp.read()
                header_retry = parse_retry_after(resp.headers.get("Retry-After"))
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise TransientError(f"telegram: cannot connect ({type(exc).__name__})") from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise AmbiguousSendError(
                f"telegram {method}: request sent but no complete answer ({type(exc).__name__})"
            ) from exc
        text = body[:500].decode("utf-8", "replace")
        if status == 429 or status >= 500:
            _, description, retry_after = _error(text)
            raise TransientError(
                f"telegram {method}: {status} {description or text}",
                code="rate_limited" if status == 429 else f"http_{status}",
                retry_after=retry_after if retry_after is not None else header_retry,
            )
        if status >= 400:
            code, description, _ = _error(text)
            raise PermanentError(
                f"telegram {method} rejected ({status}): {description or text}",
                code=code or f"http_{status}",
            )
        try:
            answer = json.loads(body)
        except ValueError as exc:
            raise AmbiguousSendError(f"telegram {method}: 2xx with a non-JSON body") from exc
        if not isinstance(answer, dict) or answer.get("ok") is not True or "result" not in answer:
            raise AmbiguousSendError(f"telegram {method}: 2xx without ok/result")
        return answer["result"]
