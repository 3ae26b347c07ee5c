"""Integration fixtures: a throw-away vhost on the real RabbitMQ per test.

Each test gets its own virtual host (created and deleted with ``rabbitmqctl``),
so the standard topology it declares, what it binds and what it dead-letters
never mix with other tests or with services using the shared broker.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import pytest

RABBITMQCTL = os.environ.get("TEST_RABBITMQCTL", "rabbitmqctl")


def rabbitmqctl(*args: str, timeout: float = 30) -> str:
    """Run rabbitmqctl against the shared broker (fails the test when it cannot)."""
    if shutil.which(RABBITMQCTL) is None:
        pytest.fail(f"{RABBITMQCTL} is not installed; integration tests inspect the broker with it")
    out = subprocess.run(
        [RABBITMQCTL, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if out.returncode != 0:
        pytest.fail(f"rabbitmqctl {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


@dataclass(frozen=True)
class Vhost:
    """A private vhost on the shared broker."""

    name: str
    url: str

    def queue_arguments(self) -> dict[str, dict[str, Any]]:
        """Queue name -> declared arguments, as the broker reports them."""
        out = rabbitmqctl(
            "list_queues", "-p", self.name, "name", "arguments", "--formatter", "json", "-q"
        )
        return {row["name"]: dict(_pairs(row["arguments"])) for row in json.loads(out)}


def _pairs(arguments: Any) -> list[tuple[str, Any]]:
    # rabbitmqctl's JSON renders x-arguments as [name, AMQP type, value]
    # triples (3.10) or as an object, depending on the version.
    if isinstance(arguments, dict):
        return list(arguments.items())
    return [(str(item[0]), item[-1]) for item in arguments]


@pytest.fixture
def vhost(rabbitmq_url: str, unique: str) -> Iterator[Vhost]:
    """A fresh vhost with full permissions for the test user; deleted afterwards."""
    name = f"cgtest-{unique}"
    parts = urlsplit(rabbitmq_url)
    user = parts.username or "guest"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
        url = urlunsplit(parts._replace(path="/" + quote(name, safe="")))
        yield Vhost(name=name, url=url)
    finally:
        rabbitmqctl("delete_vhost", name)


@pytest.fixture
async def vhost_connection(vhost: Vhost) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    """A plain aio-pika connection into the test's vhost, to inspect queues."""
    connection = await aio_pika.connect(vhost.url, timeout=5)
    try:
        yield connection
    finally:
        await connection.close()
