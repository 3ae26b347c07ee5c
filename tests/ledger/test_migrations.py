"""Migrations: the alembic history creates exactly the tables the code uses, on both
backends, and migrating is idempotent and safe to run from several replicas at once."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect

import gateway.ledger.migrations as migrations
from gateway.ledger import open_ledger
from gateway.ledger.schema import metadata
from tests.ledger.conftest import Backend


def _diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"version_table": "ledger_alembic_version"}
    )
    return list(compare_metadata(context, metadata))


async def test_migrations_match_the_schema(backend: Backend) -> None:
    ledger, replica = backend.open(), backend.open()
    try:
        # Two replicas starting at once, then a restart.
        await asyncio.gather(ledger.migrate(), replica.migrate())
        await ledger.migrate()
        async with ledger.engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
            version = (
                await conn.exec_driver_sql("SELECT version_num FROM ledger_alembic_version")
            ).scalar_one()
    finally:
        await ledger.close()
        await replica.close()
    assert {t.name for t in metadata.sorted_tables} <= tables
    assert version == "0003"


_MIGRATE = (
    "import asyncio, sys\n"
    "from gateway.ledger import open_ledger\n"
    "async def main():\n"
    "    ledger = open_ledger(sys.argv[1])\n"
    "    await ledger.migrate()\n"
    "    await ledger.close()\n"
    "asyncio.run(main())\n"
)


def test_replica_processes_create_a_new_sqlite_ledger_together(tmp_path: Path) -> None:
    # Separate processes racing on a file that does not exist yet: the switch
    # to WAL meets the other's write lock, which SQLite reports at once.
    for attempt in range(4):
        url = f"sqlite+aiosqlite:///{tmp_path}/ledger-{attempt}.db"
        replicas = [
            subprocess.Popen(
                [sys.executable, "-c", _MIGRATE, url],
                stderr=subprocess.PIPE,
                text=True,
                cwd=Path(__file__).resolve().parents[2],
            )
            for _ in range(3)
        ]
        for replica in replicas:
            _, err = replica.communicate(timeout=60)
            assert replica.returncode == 0, err


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite:///x.db", "async driver"),
        ("sqlite+aiosqlite:///:memory:", "SQLite file"),
        ("postgresql://localhost/x", "async driver"),
        ("mysql+aiomysql://localhost/x", "unsupported ledger URL"),
    ],
)
def test_bad_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_ledger(url)


def test_offline_sql_for_a_dba(capsys: pytest.CaptureFixture[str]) -> None:
    ini = Path(migrations.__file__).parent / "alembic.ini"
    config = Config(str(ini), cmd_opts=None)
    config.set_main_option("sqlalchemy.url", "postgresql://")
    command.upgrade(config, "head", sql=True)
    sql = capsys.readouterr().out
    assert "CREATE TABLE ledger_messages" in sql
    assert "CREATE INDEX ix_ledger_attempts_undispatched" in sql
    assert "WHERE NOT dispatched" in sql
    assert "ledger_alembic_version" in sql
