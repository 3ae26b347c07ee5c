"""``channel-gateway``: run services, the end-to-end demo, and ``tail``.

channel-gateway run sms            host every enabled SMS connector
channel-gateway up                 host every enabled connector in one process
channel-gateway demo               real traffic end to end (see gateway/demo.py)
channel-gateway tail 'message.#'   print events live
channel-gateway connectors         list installed connectors and their manifests
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from google.protobuf.json_format import MessageToDict

from gateway.contract import ConfigError, ConnectorNotFoundError, registry
from gateway.contract.connector import ConnectorSpec
from gateway.display import render
from gateway.runtime.bus import BrokerUnavailableError, Delivery
from gateway.runtime.codec import decode_event
from gateway.runtime.config import load_config
from gateway.runtime.service import Service, enabled_connectors, open_bus
from gateway.runtime.telemetry import configure_logging
from gateway.runtime.topology import EVENTS_EXCHANGE, base_topology


def _run(args: argparse.Namespace, selectors: Sequence[str]) -> int:
    settings = load_config(args.config)
    configure_logging(settings.telemetry.log_level, settings.telemetry.log_format)
    service = Service(settings, enabled_connectors(settings, selectors))
    asyncio.run(service.run())
    return 0


async def _tail(broker_url: str, patterns: Sequence[str], count: int, as_json: bool) -> int:
    bus = open_bus(broker_url)
    await bus.connect()
    await bus.declare(base_topology())
    queue = await bus.declare_temporary_queue(EVENTS_EXCHANGE, patterns)
    seen = 0
    done = asyncio.Event()

    async def show(delivery: Delivery) -> None:
        nonlocal seen
        event = decode_event(delivery)
        if as_json:
            print(
                json.dumps({"routing_key": delivery.routing_key, "event": MessageToDict(event)}),
                flush=True,
            )
        else:
            print(render(event, delivery.routing_key), flush=True)
        seen += 1
        if count and seen >= count:
            done.set()

    subscription = await bus.consume(queue, show, prefetch=64)
    print(f"tailing {', '.join(patterns)} on {EVENTS_EXCHANGE} (Ctrl-C to stop)", file=sys.stderr)
    try:
        await done.wait()
    finally:
        await subscription.cancel()
        await bus.close()
    return 0


def _describe(spec: ConnectorSpec) -> dict[str, object]:
    return {
        "name": spec.name,
        "dedup_ttl_seconds": spec.dedup_ttl_seconds,
        "manifest": MessageToDict(spec.manifest),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point."""
    parser = argparse.ArgumentParser(prog="channel-gateway", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", "-c", help="YAML config file (default: $CHANNEL_GATEWAY_CONFIG)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="host the connectors of one or more channels or names")
    run.add_argument("selectors", nargs="+", help="channel (sms) or connector name (sms.twilio)")
    sub.add_parser("up", help="host every enabled connector in one process (development)")
    demo = sub.add_parser(
        "demo", help="run real traffic end to end and print the normalized events"
    )
    demo.add_argument(
        "--broker-url",
        help="RabbitMQ URL (default: amqp://guest:guest@localhost:5672/, "
        "else the in-memory bus when none answers)",
    )
    tail = sub.add_parser("tail", help="print normalized events live")
    tail.add_argument(
        "patterns", nargs="*", default=["#"], help="binding keys, e.g. 'message.received.#'"
    )
    tail.add_argument(
        "--broker-url", default=None, help="RabbitMQ URL (default: broker.url of the config)"
    )
    tail.add_argument("--count", type=int, default=0, help="stop after this many events")
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    sub.add_parser("connectors", help="list installed connectors and their manifests")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _run(args, args.selectors)
        if args.command == "up":
            return _run(args, [])
        if args.command == "demo":
            from gateway.demo import run_demo

            return asyncio.run(run_demo(args.broker_url))
        if args.command == "tail":
            url = args.broker_url or load_config(args.config).broker.url
            return asyncio.run(_tail(url, args.patterns, args.count, args.json))
        if args.command == "connectors":
            listing: list[dict[str, object]] = []
            for name in registry.available():
                try:
                    listing.append(_describe(registry.load(name)))
                except ConnectorNotFoundError as exc:
                    listing.append({"name": name, "error": str(exc)})
            print(json.dumps(listing, indent=2))
            return 0
    except (ConfigError, ConnectorNotFoundError, BrokerUnavailableError) as exc:
        print(f"channel-gateway: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
