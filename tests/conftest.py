"""Shared fixtures: the real local services.

A test that needs one fails (never skips) if it is down; `make test` runs
scripts/ensure_services.sh first so CI always has them.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import NoReturn
from urllib.parse import urlsplit

import pytest

RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _require(url: str, default_port: int, what: str) -> str:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        with socket.create_connection((host, port), timeout=2):
            return url
    except OSError as exc:
        pytest.fail(
            f"{what} is not reachable at {host}:{port} ({exc}); run scripts/ensure_services.sh"
        )


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """URL of the real local RabbitMQ (guest/guest on 5672)."""
    return _require(RABBITMQ_URL, 5672, "RabbitMQ")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the real local Redis (database 15, kept for tests)."""
    return _require(REDIS_URL, 6379, "Redis")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """URL of the real local PostgreSQL (trust auth, database `test`)."""
    return _require(POSTGRES_URL, 5432, "PostgreSQL")


@pytest.fixture
def unique() -> str:
    """A short unique token to keep exchanges, queues and keys of parallel runs apart."""
    return os.urandom(4).hex()


@pytest.fixture
async def amqp_connection(rabbitmq_url: str) -> AsyncIterator[object]:
    """A raw aio-pika connection for tests that inspect the broker directly."""
    import aio_pika

    connection = await aio_pika.connect(rabbitmq_url)
    try:
        yield connection
    finally:
        await connection.close()


#: ``refuses(benchmark_module, args, message)``: see :func:`refuses`.
Refuses = Callable[[ModuleType, list[str], str], None]


@pytest.fixture
def refuses(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Refuses:
    """Check that a benchmark's ``main(args)`` exits with a usage error naming ``message``
    and never starts its run."""

    def check(benchmark: ModuleType, args: list[str], message: str) -> None:
        def must_not_run(cfg: object) -> NoReturn:
            raise AssertionError(f"the benchmark accepted {args} and started")

        monkeypatch.setattr(benchmark, "run", must_not_run)
        with pytest.raises(SystemExit) as exc:
            benchmark.main([*args, "--output", str(tmp_path / "out.json")])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err

    return check
