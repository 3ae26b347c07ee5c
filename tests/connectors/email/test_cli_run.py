"""``channel-gateway run email`` as a user runs it: a real process, real SMTP,
the event on the real RabbitMQ, a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import smtplib
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aio_pika

from gateway.api.v1.envelope_pb2 import Event
from gateway.runtime.topology import EVENTS_EXCHANGE
from tests.connectors.email import corpus

ROOT = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_for_port(
    port: int, proc: asyncio.subprocess.Process, timeout: float = 15.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            err = await proc.stderr.read() if proc.stderr else b""
            raise AssertionError(f"service exited: {err!r}")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 0.5)
            writer.close()
            return
        except (OSError, TimeoutError):
            await asyncio.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


async def test_run_email_hosts_the_smtp_listener(
    tmp_path: Path, rabbitmq_url: str, amqp_connection: Any, unique: str
) -> None:
    smtp_port, http_port = _free_port(), _free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
http: {{host: 127.0.0.1, port: {http_port}}}
broker: {{url: "{rabbitmq_url}"}}
telemetry: {{log_level: INFO}}
connectors:
  email.smtp:
    message_id_domain: mail.shop.example
    inbound:
      host: 127.0.0.1
      port: {smtp_port}
      addresses: [support@shop.example]
"""
    )
    channel = await amqp_connection.channel()
    exchange = await channel.declare_exchange(
        EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(f"test.email.cli.{unique}", exclusive=True)
    await queue.bind(exchange, "message.received.email.smtp")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "--config",
        str(config),
        "run",
        "email",
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        await _wait_for_port(smtp_port, proc)
        raw = re.sub(
            rb"\r?\n", b"\r\n", corpus.plain_utf8().replace(b"reply-1@", f"{unique}@".encode())
        )

        def send() -> dict[str, Any]:
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as client:
                return client.sendmail("a@example.de", ["support@shop.example"], raw)

        assert await asyncio.to_thread(send) == {}
        # The 250 came after the broker's confirm: the event is already queued.
        message = await queue.get(timeout=5, fail=False)
        assert message is not None
        event = Event()
        event.ParseFromString(message.body)
        await message.ack()
        assert event.message.email.message_id == f"<{unique}@mail.example.de>"
        assert event.provider == "smtp"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            raise
        await queue.delete(if_unused=False, if_empty=False)
    assert code == 0, await proc.stderr.read() if proc.stderr else b""
