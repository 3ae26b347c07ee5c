"""``channel-gateway spool drain``: a spool file no service drains any more, on the real RabbitMQ.

The case it exists for: a Kubernetes replica scaled away during a broker outage leaves its
PersistentVolumeClaim with spooled events (accepted webhooks). A one-off process on that volume
republishes them with the services' own drainer and exits once the file is empty, or with status 1
and the rows kept when the broker keeps refusing them. Each test has its own vhost.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aio_pika
import pytest

from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.message_pb2 import Message
from gateway.runtime.amqp_bus import AmqpBus
from gateway.runtime.codec import encode_event
from gateway.runtime.spool import Spool
from gateway.runtime.topology import EVENTS_EXCHANGE, base_topology
from tests.integration.conftest import Vhost

pytestmark = pytest.mark.rabbitmq

ROUTING_KEY = "message.received.sms.twilio"


def _event(n: int) -> Event:
    return Event(
        id=f"ev-drain-{n}",
        type="message.received",
        channel="sms",
        provider="twilio",
        account="main",
        message=Message(provider_message_id=f"SM{n}"),
    )


async def _spool_file(path: Path, count: int) -> list[str]:
    """A spool file holding ``count`` events, as a service left it; their ids in order."""
    spool = Spool(path, max_events=1000, max_bytes=10**7)
    await spool.open()
    try:
        for n in range(count):
            await spool.put("sms.twilio", EVENTS_EXCHANGE, ROUTING_KEY, encode_event(_event(n)))
    finally:
        await spool.close()
    return [f"ev-drain-{n}" for n in range(count)]


async def _events_left(path: Path) -> int:
    spool = Spool(path, max_events=1000, max_bytes=10**7)
    stats = await spool.open()
    await spool.close()
    return stats.events


async def _drain(path: Path, broker_url: str, *extra: str) -> tuple[int, str, str]:
    """Run the command as an operator would (no config file: defaults plus environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHANNEL_GATEWAY")}
    env["CHANNEL_GATEWAY__BROKER__URL"] = broker_url
    env["CHANNEL_GATEWAY__SPOOL__INITIAL_BACKOFF"] = "0.1"
    env["CHANNEL_GATEWAY__SPOOL__MAX_BACKOFF"] = "0.5"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "spool",
        "drain",
        "--path",
        str(path),
        *extra,
        env=env,
        cwd=path.parent,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _bound_queue(vhost: Vhost, connection: aio_pika.abc.AbstractConnection) -> str:
    """The exchanges as the services declare them, and a queue bound to the spooled key."""
    bus = AmqpBus(vhost.url)
    await bus.connect()
    try:
        await bus.declare(base_topology())
    finally:
        await bus.close()
    channel = await connection.channel()
    queue = await channel.declare_queue("crm.drained", durable=True)
    await queue.bind(EVENTS_EXCHANGE, "message.received.#")
    await channel.close()
    return queue.name


async def test_drain_republishes_a_left_behind_spool_in_order_and_empties_it(
    tmp_path: Path, vhost: Vhost, vhost_connection: aio_pika.abc.AbstractConnection
) -> None:
    path = tmp_path / "sms.sqlite"
    ids = await _spool_file(path, 250)  # more than one replay batch (spool.replay_batch 100)
    queue_name = await _bound_queue(vhost, vhost_connection)

    code, out, err = await _drain(path, vhost.url)

    assert code == 0, err
    assert f"{path}: 250 of 250 events republished, 0 left" in out
    channel = await vhost_connection.channel()
    queue = await channel.get_queue(queue_name, ensure=True)
    received: list[aio_pika.abc.AbstractIncomingMessage] = []
    while (message := await queue.get(no_ack=True, fail=False, timeout=5)) is not None:
        received.append(message)
    # Exactly what was spooled, oldest first, as the codec encoded it.
    assert [m.message_id for m in received] == ids
    assert all(m.routing_key == ROUTING_KEY for m in received)
    assert all(m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT for m in received)
    first = Event.FromString(received[0].body)
    assert received[0].type == Event.DESCRIPTOR.full_name
    assert (first.id, first.message.provider_message_id) == ("ev-drain-0", "SM0")
    assert await _events_left(path) == 0

    # Running it again on the drained file publishes nothing and succeeds.
    code, out, err = await _drain(path, vhost.url)
    assert code == 0, err
    assert f"{path}: 0 of 0 events republished, 0 left" in out
    assert await queue.get(no_ack=True, fail=False, timeout=5) is None


async def test_drain_keeps_events_the_broker_refuses_and_exits_1(
    tmp_path: Path, vhost: Vhost
) -> None:
    """No queue bound to the spooled key: every replay is unroutable (mandatory), so nothing is
    deleted; at --timeout the command says how many are left and exits 1."""
    path = tmp_path / "sms.sqlite"
    await _spool_file(path, 3)

    code, out, err = await _drain(path, vhost.url, "--timeout", "2")

    assert code == 1, out + err
    assert f"{path}: 0 of 3 events republished, 3 left" in out
    assert f"3 events are still in {path}" in err
    assert "spooled event refused by the broker" in err  # the drainer's log line, per row
    assert await _events_left(path) == 3


async def test_drain_refuses_a_missing_file_without_creating_it(tmp_path: Path) -> None:
    path = tmp_path / "typo.sqlite"

    code, _, err = await _drain(path, "amqp://guest:guest@127.0.0.1:1/")

    assert code == 2
    assert f"no spool file at {path}" in err
    assert not path.exists()
