"""Meta (WhatsApp) webhook benchmark: batches/s and messages/s with confirmed publishes.

``python -m benchmarks.meta_webhooks`` runs ``channel-gateway run whatsapp.meta``
(the real service: signature check over the raw body, batch mapping, dedup,
publisher confirms on the standard quorum topology) in a subprocess and drives
it, over loopback, with signed WhatsApp notifications of several batch shapes
(``entries x changes x messages``). Every message of every request is new
(unique ``wamid``), signed before the phase. After each phase the queue the
events land on is counted: it must hold exactly accepted requests x messages
per request.

The run uses a throw-away RabbitMQ vhost (created with ``rabbitmqctl``).
Results go to ``benchmarks/results/meta_webhooks.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from benchmarks.harness import Broker, Server, free_port, machine, running
from benchmarks.load import RequestSource, closed_loop
from connectors.social.meta.signature import SIGNATURE_HEADER, compute_signature

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "meta_webhooks.json"
PHONE_NUMBER_ID = "106540352242922"
SHAPES = ((1, 1, 1), (1, 1, 10), (3, 2, 5))


def factory(
    port: int, secret: str, shape: tuple[int, int, int], tag: str
) -> Callable[[int], bytes]:
    """Request ``i``: a signed notification of ``entries x changes x messages`` new messages."""
    entries, changes, messages = shape
    path = "/webhooks/whatsapp/meta"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "User-Agent: facebookexternalua\r\nContent-Type: application/json\r\n"
    )
    now = str(int(time.time()))

    def make(i: int) -> bytes:
        payload = {
            "object": "whatsapp_business_account",
            "entry": [
                {
                    "id": "102290129340398",
                    "changes": [
                        {
                            "field": "messages",
                            "value": {
                                "messaging_product": "whatsapp",
                                "metadata": {
                                    "display_phone_number": "15550783881",
                                    "phone_number_id": PHONE_NUMBER_ID,
                                },
                                "contacts": [
                                    {
                                        "profile": {"name": "Caf\u00e9 Client"},
                                        "wa_id": "16505551234",
                                    }
                                ],
                                "messages": [
                                    {
                                        "from": "16505551234",
                                        "id": f"wamid.{tag}.{i}.{e}.{c}.{m}",
                                        "timestamp": now,
                                        "type": "text",
                                        "text": {"body": f"message {m} \u00e9"},
                                    }
                                    for m in range(messages)
                                ],
                            },
                        }
                        for c in range(changes)
                    ],
                }
                for e in range(entries)
            ],
        }
        body = json.dumps(payload, separators=(",", ":")).encode()  # escapes non-ASCII, as Meta
        signature = compute_signature(body, secret)
        return (
            f"{head}{SIGNATURE_HEADER}: {signature}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    return make


def _config(port: int, url: str, dedup: str, queue: str) -> dict[str, object]:
    return {
        "http": {"host": "127.0.0.1", "port": port},
        "broker": {"url": url},
        "dedup": {"url": dedup},
        "telemetry": {"log_level": "INFO", "log_format": "json"},
        "subscriptions": [{"queue": queue, "bindings": ["message.received.whatsapp.meta"]}],
        "connectors": {
            "whatsapp.meta": {
                "app_secret": {"env": "BENCH_META_APP_SECRET"},
                "verify_token": {"env": "BENCH_META_VERIFY_TOKEN"},
                "accounts": {
                    "main": {
                        "phone_number_id": PHONE_NUMBER_ID,
                        "access_token": {"env": "BENCH_META_ACCESS_TOKEN"},
                    }
                },
            }
        },
    }


async def run(args: argparse.Namespace) -> dict[str, object]:
    """The whole benchmark; returns the JSON document it also writes."""
    run_id = secrets.token_hex(4)
    secret = secrets.token_hex(16)
    use_vhost = shutil.which("rabbitmqctl") is not None
    broker = Broker(args.broker_url, f"bench-meta-{run_id}" if use_vhost else None)
    queue = f"bench.meta.{run_id}"
    env = {
        **os.environ,
        "BENCH_META_APP_SECRET": secret,
        "BENCH_META_VERIFY_TOKEN": secrets.token_hex(8),
        "BENCH_META_ACCESS_TOKEN": secrets.token_hex(16),
        "PYTHONUNBUFFERED": "1",
    }
    report: dict[str, object] = {
        "command": "python -m benchmarks.meta_webhooks " + " ".join(sys.argv[1:]),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": args.concurrency,
            "dedup": args.dedup,
        },
    }
    results: list[dict[str, object]] = []
    print(
        f"{'shape':<14} {'batches/s':>10} {'messages/s':>11} {'p50 ms':>8} {'p99 ms':>8} queue ok"
    )
    await broker.open()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-meta-") as tmp:
            port = free_port()
            config = Path(tmp) / "config.json"
            config.write_text(json.dumps(_config(port, broker.url, args.dedup, queue)))
            argv = [
                sys.executable,
                "-m",
                "gateway.cli",
                "--config",
                str(config),
                "run",
                "whatsapp.meta",
            ]
            async with running(Server("service", argv, env=env, ready=1)):
                for n, shape in enumerate(SHAPES):
                    per_request = shape[0] * shape[1] * shape[2]
                    budget = int(6000 / per_request * (args.warmup + args.duration)) + 64
                    source = RequestSource(factory(port, secret, shape, f"{run_id}{n}"), budget)
                    phase = await closed_loop(
                        port,
                        source,
                        concurrency=args.concurrency,
                        duration=args.duration,
                        warmup=args.warmup,
                    )
                    on_queue = await broker.count_and_purge(queue)
                    summary = phase.summary()
                    summary.update(
                        {
                            "shape": "x".join(map(str, shape)),
                            "messages_per_request": per_request,
                            "batches_per_s": summary.pop("requests_per_s"),
                            "messages_per_s": round(phase.throughput * per_request, 1),
                            "on_queue": on_queue,
                            "queue_matches_accepted": on_queue
                            == phase.accepted_total * per_request,
                            "requests_signed_during_phase": source.made_late,
                        }
                    )
                    results.append(summary)
                    print(
                        f"{summary['shape']:<14} {summary['batches_per_s']:>10} "
                        f"{summary['messages_per_s']:>11} {summary['p50_ms']:>8} "
                        f"{summary['p99_ms']:>8} {summary['queue_matches_accepted']}",
                        flush=True,
                    )
    finally:
        await broker.close([("queue", queue)])
    report["results"] = results
    report["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m benchmarks.meta_webhooks``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--dedup", default="memory://")
    parser.add_argument("--broker-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if urlsplit(args.broker_url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the benchmark only talks to a local broker (127.0.0.1)")
    report = asyncio.run(run(args))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
