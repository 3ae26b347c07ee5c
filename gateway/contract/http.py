"""Calling a provider API: one place that turns HTTP outcomes into error types.

The distinction that matters for sends is whether the request may have reached
the provider. A refused or timed-out *connection* never did: retrying is safe.
A timeout or disconnect *after* the request went out is ambiguous: retrying
could send twice, so it is :class:`AmbiguousSendError`.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import aiohttp

from gateway.contract.errors import AmbiguousSendError, PermanentError, TransientError


@dataclass(frozen=True, slots=True)
class ProviderResponse:
    """A provider's answer: status, headers and body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON. Garbage in a 2xx answer is ambiguous: the provider
        may have acted on the request, so it must not be retried."""
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise AmbiguousSendError(f"provider answered non-JSON ({self.status})") from exc


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - time.time())


async def request(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    provider: str,
    **kwargs: Any,
) -> ProviderResponse:
    """Send one request; raise by outcome, return only 2xx answers.

    - connection refused / connect timeout: TransientError (nothing was sent)
    - timeout or disconnect after sending: AmbiguousSendError
    - 429: TransientError with the provider's Retry-After
    - 5xx: TransientError; other 4xx: PermanentError with the provider's code
    """
    try:
        async with session.request(method, url, **kwargs) as resp:
            body = await resp.read()
            headers = {k: v for k, v in resp.headers.items()}
            status = resp.status
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
        raise TransientError(f"{provider}: cannot connect: {exc}", code="connect_failed") from exc
    except (
        TimeoutError,
        aiohttp.ServerDisconnectedError,
        aiohttp.ClientPayloadError,
        aiohttp.ClientOSError,
    ) as exc:
        raise AmbiguousSendError(
            f"{provider}: request sent but no complete answer ({exc!r})"
        ) from exc
    except aiohttp.ClientError as exc:
        # Anything else from the client: we cannot tell whether it was sent.
        raise AmbiguousSendError(f"{provider}: request failed: {exc!r}") from exc
    answer = ProviderResponse(status=status, headers=headers, body=body)
    if 200 <= status < 300:
        return answer
    snippet = body[:300].decode("utf-8", "replace")
    if status == 429:
        raise TransientError(
            f"{provider}: rate limited: {snippet}",
            code="rate_limited",
            retry_after=parse_retry_after(headers.get("Retry-After")),
        )
    if status >= 500:
        raise TransientError(
            f"{provider}: server error {status}: {snippet}",
            code=f"http_{status}",
            retry_after=parse_retry_after(headers.get("Retry-After")),
        )
    raise ProviderRejectedError(status, snippet, provider=provider)


class ProviderRejectedError(PermanentError):
    """A 4xx (other than 429) answer: the request is wrong and will stay wrong."""

    def __init__(self, status: int, body: str, *, provider: str, code: str | None = None) -> None:
        super().__init__(f"{provider}: rejected ({status}): {body}", code=code or f"http_{status}")
        self.status = status
        self.body = body
