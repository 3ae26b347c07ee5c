"""Atomic claim/complete records: inbound dedup and the outbound send ledger.

A key is *claimed* (atomically: one caller wins) before the work, *completed*
with a value after it, or *released* when the work failed so a retry may claim
it again. The in-memory store serves one process; the Redis store
(``SET NX PX``) serves several replicas and survives restarts.
"""

from __future__ import annotations

import enum
import heapq
import time
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis

from gateway.contract.errors import ConfigError, TransientError

PENDING = "\x00pending"


class ClaimState(enum.Enum):
    """What :meth:`IdempotencyStore.claim` found."""

    #: The caller owns the key now and must complete or release it.
    NEW = "new"
    #: Someone claimed it and has not finished (or crashed while holding it).
    PENDING = "pending"
    #: The work was done; ``Claim.value`` holds its record.
    DONE = "done"


@dataclass(frozen=True, slots=True)
class Claim:
    """The result of a claim."""

    state: ClaimState
    value: str | None = None


class IdempotencyStore(Protocol):
    """Atomic claim / complete / release on string keys with TTLs."""

    async def claim(self, key: str, *, ttl: float) -> Claim:
        """Claim ``key`` for ``ttl`` seconds unless it exists."""

    async def complete(self, key: str, value: str, *, ttl: float) -> None:
        """Record ``key`` as done with ``value`` for ``ttl`` seconds."""

    async def release(self, key: str) -> None:
        """Drop a pending claim (no-op when the key is done)."""

    async def close(self) -> None:
        """Release connections."""


def _claim_from(value: str | None) -> Claim:
    if value is None:
        # Expired between our SET and GET: report pending, the caller retries.
        return Claim(ClaimState.PENDING)
    if value == PENDING:
        return Claim(ClaimState.PENDING)
    return Claim(ClaimState.DONE, value)


class MemoryIdempotencyStore:
    """One process's store; forgets on restart (use Redis for replicas)."""

    def __init__(self) -> None:
        self._data: dict[str, tuple[str, float]] = {}
        # Expiry times in a heap, so each operation drops what has expired in
        # O(log n) instead of a periodic scan of every key (a latency spike
        # that grows with the store). Entries rewritten since are skipped.
        self._expiry: list[tuple[float, str]] = []

    def _set(self, key: str, value: str, expires: float) -> None:
        self._data[key] = (value, expires)
        heapq.heappush(self._expiry, (expires, key))

    def _get(self, key: str, now: float) -> str | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[1] <= now:
            del self._data[key]
            return None
        return item[0]

    def _sweep(self, now: float) -> None:
        expiry, data = self._expiry, self._data
        while expiry and expiry[0][0] <= now:
            expires, key = heapq.heappop(expiry)
            item = data.get(key)
            if item is not None and item[1] == expires:
                del data[key]

    async def claim(self, key: str, *, ttl: float) -> Claim:
        now = time.monotonic()
        self._sweep(now)
        value = self._get(key, now)
        if value is None:
            self._set(key, PENDING, now + ttl)
            return Claim(ClaimState.NEW)
        return _claim_from(value)

    async def complete(self, key: str, value: str, *, ttl: float) -> None:
        self._set(key, value, time.monotonic() + ttl)

    async def release(self, key: str) -> None:
        if self._get(key, time.monotonic()) == PENDING:
            del self._data[key]

    async def close(self) -> None:
        self._data.clear()
        self._expiry.clear()

    def __len__(self) -> int:
        return len(self._data)


# Compare-and-delete: release only a still-pending claim.
_RELEASE = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)


class RedisIdempotencyStore:
    """Shared store on Redis; keys are prefixed to share a database safely."""

    def __init__(self, url: str, *, prefix: str = "cg:idem:") -> None:
        self._redis = aioredis.Redis.from_url(
            url, decode_responses=True, socket_timeout=2.0, socket_connect_timeout=2.0
        )
        self._prefix = prefix
        self._release = self._redis.register_script(_RELEASE)

    async def claim(self, key: str, *, ttl: float) -> Claim:
        full = self._prefix + key
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(full, PENDING, nx=True, px=int(ttl * 1000))
                pipe.get(full)
                created, value = await pipe.execute()
        except aioredis.RedisError as exc:
            raise TransientError(
                f"dedup store unavailable: {exc}", code="dedup_unavailable"
            ) from exc
        return Claim(ClaimState.NEW) if created else _claim_from(value)

    async def complete(self, key: str, value: str, *, ttl: float) -> None:
        try:
            await self._redis.set(self._prefix + key, value, px=int(ttl * 1000))
        except aioredis.RedisError as exc:
            raise TransientError(
                f"dedup store unavailable: {exc}", code="dedup_unavailable"
            ) from exc

    async def release(self, key: str) -> None:
        try:
            await self._release(keys=[self._prefix + key], args=[PENDING])
        except aioredis.RedisError as exc:
            raise TransientError(
                f"dedup store unavailable: {exc}", code="dedup_unavailable"
            ) from exc

    async def ping(self) -> bool:
        """True when Redis answers."""
        try:
            return bool(await self._redis.ping())
        except aioredis.RedisError:
            return False

    async def close(self) -> None:
        await self._redis.aclose()


def open_store(url: str) -> IdempotencyStore:
    """The store for ``memory://`` or ``redis://`` / ``rediss://`` URLs."""
    if url.startswith("memory://"):
        return MemoryIdempotencyStore()
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisIdempotencyStore(url)
    raise ConfigError(f"unsupported dedup store URL {url!r}: use memory:// or redis://")
