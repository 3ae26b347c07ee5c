"""Ledger benchmark: ``python -m gateway.ledger.bench --url URL [--out FILE]``.

Measures, on a fresh database (a temporary SQLite file, or a temporary schema
on PostgreSQL that is dropped afterwards):

- ``accept``: latency of one accept (sequential) and accepts/s with concurrent callers;
- ``status``: latency of one status applied alone, and statuses/s with group
  commit (what the StatusIngestor does with its prefetch window);
- ``get``: latency of reading a message with its timeline.

Figures are printed and, with ``--out``, written as JSON. They depend on the
machine and its load: compare runs on the same host only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import create_async_engine

from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.ledger.models import NewMessage, StatusUpdate
from gateway.ledger.store import Ledger, open_ledger

S = DeliveryState


def _ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
    }


async def _timed(calls: list[Callable[[], Awaitable[object]]]) -> list[float]:
    samples = []
    for call in calls:
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


async def _concurrently(calls: list[Callable[[], Awaitable[object]]], workers: int) -> float:
    queue = list(reversed(calls))

    async def worker() -> None:
        while queue:
            await queue.pop()()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return len(calls) / (time.perf_counter() - started)


def _new(prefix: str, i: int) -> NewMessage:
    return NewMessage(
        idempotency_key=f"{prefix}-key-{i}",
        message_id=f"{prefix}-{i}",
        channel="sms",
        provider="twilio",
        address="+15550001111",
    )


async def run(ledger: Ledger, messages: int, workers: int, batch: int) -> dict[str, Any]:
    """Run the measurements on a migrated, empty ledger."""
    n = messages
    accept_lat = await _timed([partial(ledger.accept, _new("seq", i)) for i in range(n)])
    accept_rate = await _concurrently(
        [partial(ledger.accept, _new("con", i)) for i in range(n)], workers
    )
    status_lat = await _timed(
        [
            partial(
                ledger.record_status,
                StatusUpdate(
                    state=S.DELIVERY_STATE_SENT,
                    message_id=f"seq-{i}",
                    provider_message_id=f"SMseq{i}",
                ),
            )
            for i in range(n)
        ]
    )
    updates = [
        StatusUpdate(state=state, message_id=f"con-{i}", provider_message_id=f"SMcon{i}")
        for state in (S.DELIVERY_STATE_SENT, S.DELIVERY_STATE_DELIVERED, S.DELIVERY_STATE_READ)
        for i in range(n)
    ]
    started = time.perf_counter()
    for k in range(0, len(updates), batch):
        await ledger.record_statuses(updates[k : k + batch])
    grouped_rate = len(updates) / (time.perf_counter() - started)
    get_lat = await _timed([partial(ledger.get, f"con-{i}") for i in range(n)])
    return {
        "messages": n,
        "accept": {**_ms(accept_lat), "per_s_concurrent": round(accept_rate, 1)},
        "status": {**_ms(status_lat), "per_s_group_commit": round(grouped_rate, 1)},
        "get": _ms(get_lat),
        "workers": workers,
        "batch": batch,
    }


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    url: str = args.url
    schema: str | None = None
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if url == "sqlite":
        tmp = tempfile.TemporaryDirectory()
        url = f"sqlite+aiosqlite:///{Path(tmp.name) / 'bench.db'}"
    elif url.startswith("postgresql+asyncpg://"):
        schema = f"ledger_bench_{os.urandom(4).hex()}"
        admin = create_async_engine(url)
        async with admin.begin() as conn:
            await conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        await admin.dispose()
    ledger = open_ledger(url, schema_name=schema)
    try:
        await ledger.migrate()
        figures = await run(ledger, args.messages, args.workers, args.batch)
    finally:
        await ledger.close()
        if schema is not None:
            admin = create_async_engine(url)
            async with admin.begin() as conn:
                await conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
            await admin.dispose()
        if tmp is not None:
            tmp.cleanup()
    return {
        "backend": ledger.dialect,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        **figures,
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--url",
        default="sqlite",
        help="'sqlite' (a temporary file) or postgresql+asyncpg://... (a temporary schema)",
    )
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", type=Path, help="write the figures as JSON to this file")
    args = parser.parse_args(argv)
    if args.messages <= 0 or args.workers <= 0 or args.batch <= 0:
        parser.error("--messages, --workers and --batch must be positive")
    if not (args.url == "sqlite" or args.url.startswith("postgresql+asyncpg://")):
        parser.error("--url must be 'sqlite' or postgresql+asyncpg://...")
    figures = asyncio.run(_main(args))
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
