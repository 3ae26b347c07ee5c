"""Inbound SMTP benchmark: mails/s through ``channel-gateway run email.smtp``
with confirmed publishes to RabbitMQ.

``python -m benchmarks.email_smtp [--mails 2000] [--connections 8]`` starts the
real service in a subprocess (its own config, the real broker), binds a
private queue to ``message.received.email.smtp``, and sends distinct mails
over ``--connections`` concurrent SMTP sessions (aiosmtplib). A mail counts
when the server answered 250, which it only does after the broker confirmed
the event; afterwards the private queue is counted, and must hold exactly
the accepted mails. Two mail shapes are measured: a small text mail and a
multipart mail with HTML and a 100 KiB attachment. Figures go to
``--output`` (JSON) and stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import aio_pika
import aiosmtplib

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "email_smtp.json"
RCPT = "support@shop.example"


def small(n: int, run: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"customer{n}@example.org"
    msg["To"] = RCPT
    msg["Subject"] = f"Question {n}"
    msg["Message-ID"] = f"<bench-{run}-{n}@example.org>"
    msg.set_content(f"Hello, where is order {n}?\n\nOn Mon, Support wrote:\n> shipped\n")
    return msg.as_bytes()


ATTACHMENT = os.urandom(100 * 1024)


def multipart(n: int, run: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Customer {n} <customer{n}@example.org>"
    msg["To"] = RCPT
    msg["Subject"] = f"Invoice {n}"
    msg["Message-ID"] = f"<bench-{run}-{n}@example.org>"
    msg.set_content("Invoice attached.\n")
    msg.add_alternative("<p>Invoice <b>attached</b>.</p>", subtype="html")
    msg.add_attachment(ATTACHMENT, "application", "pdf", filename=f"invoice-{n}.pdf")
    return msg.as_bytes()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_port(port: int, proc: asyncio.subprocess.Process) -> None:
    for _ in range(300):
        if proc.returncode is not None:
            raise RuntimeError("service exited during start-up")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"service does not listen on {port}")


async def _phase(
    port: int, build: Callable[[int, str], bytes], mails: int, connections: int
) -> dict[str, float]:
    run = secrets.token_hex(4)
    payloads = [build(n, run) for n in range(mails)]
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for payload in payloads:
        queue.put_nowait(payload)
    accepted = 0
    latencies: list[float] = []

    async def session() -> None:
        nonlocal accepted
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30, start_tls=False)
        await client.connect()
        try:
            while True:
                try:
                    payload = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                started = time.perf_counter()
                await client.sendmail("bench@example.org", [RCPT], payload)
                latencies.append(time.perf_counter() - started)
                accepted += 1
        finally:
            await client.quit()

    started = time.perf_counter()
    await asyncio.gather(*(session() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "mails": mails,
        "accepted": accepted,
        "bytes_per_mail": round(sum(map(len, payloads)) / len(payloads)),
        "seconds": round(elapsed, 3),
        "mails_per_second": round(accepted / elapsed, 1),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
    }


async def run(broker_url: str, mails: int, connections: int) -> dict[str, object]:
    """Run both phases; return the figures."""
    smtp_port, http_port = _free_port(), _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="cg-email-bench-"))
    config = workdir / "config.yaml"
    config.write_text(
        f"""
http: {{host: 127.0.0.1, port: {http_port}}}
broker: {{url: "{broker_url}"}}
telemetry: {{log_level: WARNING}}
connectors:
  email.smtp:
    message_id_domain: mail.shop.example
    inbound: {{host: 127.0.0.1, port: {smtp_port}, addresses: [{RCPT}]}}
"""
    )
    connection = await aio_pika.connect(broker_url)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(
        "channels.events", aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(
        f"bench.email.{secrets.token_hex(4)}", arguments={"x-queue-type": "quorum"}, durable=True
    )
    await queue.bind(exchange, "message.received.email.smtp")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "--config",
        str(config),
        "run",
        "email.smtp",
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
    )
    phases: dict[str, dict[str, float]] = {}
    try:
        await _wait_port(smtp_port, proc)
        await _phase(smtp_port, small, min(100, mails), connections)  # warm-up
        await queue.purge()
        for name, build, count in (
            ("small_text", small, mails),
            ("multipart_100k_attachment", multipart, max(1, mails // 4)),
        ):
            phases[name] = await _phase(smtp_port, build, count, connections)
            declared = await channel.declare_queue(queue.name, passive=True)
            held = declared.declaration_result.message_count
            phases[name]["queued_on_broker"] = held = int(held or 0)
            if held != phases[name]["accepted"]:
                raise RuntimeError(f"{name}: accepted {phases[name]['accepted']} but {held} queued")
            await queue.purge()
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
        await queue.delete(if_unused=False, if_empty=False)
        await connection.close()
    result: dict[str, object] = {
        "benchmark": "inbound SMTP -> normalized event, confirmed publish (email.smtp)",
        "command": f"python -m benchmarks.email_smtp --mails {mails} --connections {connections}",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "connections": connections,
        "phases": phases,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--broker-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--mails", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.broker_url, args.mails, args.connections))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    phases = result["phases"]
    assert isinstance(phases, dict)
    for name, figures in phases.items():
        print(f"{name:28} {figures}")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
