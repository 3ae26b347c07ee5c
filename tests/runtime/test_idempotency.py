"""Atomic claim / complete / release, on memory and on the real Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from gateway.contract.errors import ConfigError, TransientError
from gateway.runtime.idempotency import (
    ClaimState,
    IdempotencyStore,
    MemoryIdempotencyStore,
    RedisIdempotencyStore,
    open_store,
)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[IdempotencyStore]:
    if request.param == "memory":
        memory = MemoryIdempotencyStore()
        yield memory
        await memory.close()
        return
    url: str = request.getfixturevalue("redis_url")
    prefix = f"cgtest:{uuid.uuid4().hex[:8]}:"
    redis_store = RedisIdempotencyStore(url, prefix=prefix)
    try:
        yield redis_store
    finally:
        await redis_store.close()
        client = aioredis.Redis.from_url(url)
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_claim_complete_duplicate(store: IdempotencyStore) -> None:
    assert (await store.claim("k", ttl=10)).state is ClaimState.NEW
    assert (await store.claim("k", ttl=10)).state is ClaimState.PENDING
    await store.complete("k", "record-1", ttl=10)
    claim = await store.claim("k", ttl=10)
    assert claim.state is ClaimState.DONE
    assert claim.value == "record-1"


async def test_exactly_one_concurrent_claim_wins(store: IdempotencyStore) -> None:
    claims = await asyncio.gather(*(store.claim("race", ttl=10) for _ in range(50)))
    states = [c.state for c in claims]
    assert states.count(ClaimState.NEW) == 1
    assert states.count(ClaimState.PENDING) == 49


async def test_release_lets_a_retry_claim_again(store: IdempotencyStore) -> None:
    await store.claim("k", ttl=10)
    await store.release("k")
    assert (await store.claim("k", ttl=10)).state is ClaimState.NEW


async def test_release_never_drops_a_completed_record(store: IdempotencyStore) -> None:
    await store.claim("k", ttl=10)
    await store.complete("k", "done", ttl=10)
    await store.release("k")
    assert (await store.claim("k", ttl=10)).value == "done"
    await store.release("never-claimed")  # no-op, no error


async def test_ttl_expires_claims_and_records(store: IdempotencyStore) -> None:
    await store.claim("pending", ttl=0.2)
    await store.claim("done", ttl=10)
    await store.complete("done", "v", ttl=0.2)
    await asyncio.sleep(0.35)
    assert (await store.claim("pending", ttl=10)).state is ClaimState.NEW
    assert (await store.claim("done", ttl=10)).state is ClaimState.NEW


async def test_keys_are_independent(store: IdempotencyStore) -> None:
    assert (await store.claim("a", ttl=10)).state is ClaimState.NEW
    assert (await store.claim("b", ttl=10)).state is ClaimState.NEW


@pytest.mark.redis
async def test_redis_keys_are_prefixed_and_carry_a_ttl(redis_url: str) -> None:
    prefix = f"cgtest:{uuid.uuid4().hex[:8]}:"
    store = RedisIdempotencyStore(redis_url, prefix=prefix)
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await store.claim("k", ttl=30)
        assert 0 < await client.pttl(prefix + "k") <= 30_000
        await store.complete("k", "v", ttl=60)
        assert await client.get(prefix + "k") == "v"
        assert 30_000 < await client.pttl(prefix + "k") <= 60_000
        assert await store.ping()
    finally:
        await client.delete(prefix + "k")
        await client.aclose()
        await store.close()


async def test_redis_down_is_transient() -> None:
    from gateway.testing.rabbitmq_node import free_port

    store = RedisIdempotencyStore(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(TransientError) as info:
            await store.claim("k", ttl=1)
        assert info.value.code == "dedup_unavailable"
        assert not await store.ping()
    finally:
        await store.close()


def test_open_store() -> None:
    assert isinstance(open_store("memory://"), MemoryIdempotencyStore)
    assert isinstance(open_store("redis://127.0.0.1:6379/15"), RedisIdempotencyStore)
    with pytest.raises(ConfigError, match="unsupported dedup store URL 'mysql://x'"):
        open_store("mysql://x")


async def test_memory_store_forgets_expired_keys_without_scanning_them_all() -> None:
    store = MemoryIdempotencyStore()
    for n in range(100):
        await store.claim(f"short-{n}", ttl=0.01)
    await store.claim("long", ttl=60)
    await store.complete("short-0", "rewritten", ttl=60)  # a rewrite outlives its first expiry
    await asyncio.sleep(0.02)
    await store.claim("trigger", ttl=60)  # any operation drops what has expired
    assert len(store) == 3
    assert (await store.claim("short-0", ttl=1)).value == "rewritten"
    assert (await store.claim("short-1", ttl=1)).state is ClaimState.NEW
