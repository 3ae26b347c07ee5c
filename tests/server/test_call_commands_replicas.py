"""Two gateway processes on one PostgreSQL ledger and one RabbitMQ: SendCallCommand with
the same idempotency key gives one command id and one published command, whichever
replica answers."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.server.replicas import gateway_replicas, queue_depth
from tests.server.test_call_commands import place_request

KEYS = 8


async def test_two_gateway_processes_send_each_call_command_once(
    tmp_path: Path, vhost_url: str, pg_schema: tuple[str, str]
) -> None:
    async with gateway_replicas(
        tmp_path, broker_url=vhost_url, ledger=pg_schema, connector="voice.twilio"
    ) as stubs:
        # Every key goes to both replicas at once, twice.
        keys = [f"call-{k}" for k in range(KEYS) for _ in range(4)]
        replies = await asyncio.gather(
            *(
                stubs[n % 2].SendCallCommand(place_request(key), timeout=15)
                for n, key in enumerate(keys)
            )
        )
    by_key: dict[str, set[str]] = {}
    for reply, key in zip(replies, keys, strict=True):
        by_key.setdefault(key, set()).add(reply.command_id)
    assert all(len(ids) == 1 for ids in by_key.values()), by_key
    assert sum(r.created for r in replies) == KEYS
    # No voice service consumes the call queue (the gateways declared it): one command per key.
    assert await queue_depth(vhost_url, "connector.voice.twilio.call") == KEYS
