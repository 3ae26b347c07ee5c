"""Two gateway processes on one PostgreSQL ledger and one RabbitMQ: the same
idempotency key gives one message id and one command, whichever replica answers."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.server.replicas import gateway_replicas, queue_depth
from tests.server.test_send import text_request

KEYS = 10


async def test_two_gateway_processes_share_idempotency(
    tmp_path: Path, vhost_url: str, pg_schema: tuple[str, str]
) -> None:
    async with gateway_replicas(
        tmp_path, broker_url=vhost_url, ledger=pg_schema, connector="sms.twilio"
    ) as stubs:
        # Every key is sent to both replicas at once, twice.
        calls = [
            stubs[n % 2].SendMessage(text_request(f"rep-{k}"), timeout=15)
            for k in range(KEYS)
            for n in range(4)
        ]
        replies = await asyncio.gather(*calls)
    by_key: dict[str, set[str]] = {}
    for reply, k in zip(replies, [k for k in range(KEYS) for _ in range(4)], strict=True):
        by_key.setdefault(f"rep-{k}", set()).add(reply.message_id)
    assert all(len(ids) == 1 for ids in by_key.values()), by_key
    assert sum(r.created for r in replies) == KEYS
    # No connector consumes the command queue: it holds exactly one command per key.
    assert await queue_depth(vhost_url, "connector.sms.twilio.send") == KEYS
