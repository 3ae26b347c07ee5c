"""Ledger fixtures: every storage test runs on SQLite (a temp file) and on the
real PostgreSQL (a schema of its own, dropped afterwards)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.ledger import Ledger, open_ledger


class FakeClock:
    """A settable clock for the ledger and the fallback engine."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


@dataclass(frozen=True)
class Backend:
    """Where a test's ledgers live: open as many ledgers (engines) on it as needed."""

    name: str
    url: str
    schema: str | None

    def open(self, clock: Callable[[], datetime] | None = None) -> Ledger:
        kwargs = {"clock": clock} if clock is not None else {}
        return open_ledger(self.url, schema_name=self.schema, **kwargs)


def asyncpg_url(postgres_url: str) -> str:
    """The conftest's plain PostgreSQL URL with the asyncpg driver."""
    return "postgresql+asyncpg://" + postgres_url.split("://", 1)[1]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["sqlite", "postgresql"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """Each storage test runs once per backend: a SQLite file, or a fresh
    PostgreSQL schema that is dropped afterwards."""
    if request.param == "sqlite":
        yield Backend("sqlite", f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}", None)
        return
    url = asyncpg_url(request.getfixturevalue("postgres_url"))
    schema = f"ledger_test_{os.urandom(5).hex()}"
    admin = create_async_engine(url)
    try:
        async with admin.begin() as conn:
            await conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        yield Backend("postgresql", url, schema)
    finally:
        async with admin.begin() as conn:
            await conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.dispose()


@pytest.fixture
async def ledger(backend: Backend, clock: FakeClock) -> AsyncIterator[Ledger]:
    """A migrated ledger on the backend with the fake clock."""
    led = backend.open(clock)
    await led.migrate()
    try:
        yield led
    finally:
        await led.close()
