"""Generate deploy/rabbitmq/definitions.json from the runtime's topology.

Run: python scripts/gen_definitions.py [--check] [--vhost /] [--delivery-limit N]
     [--without-gateway] [--output PATH]

The broker definitions hold exactly what the services declare at start-up
(``gateway.runtime.topology``): the base exchanges and dead-letter queue, the
quorum send-command queue of every installed connector (entry-point group
``gateway.connectors``), the quorum call-command queue of every connector whose
manifest lists ``call_actions`` (voice) and, unless ``--without-gateway``, the gateway
service's ledger status queue (bound to ``message.status.#`` and ``call.command.#``, so
statuses and call command outcomes are
kept from the first one even before the gateway first starts; leave it out
when no gateway consumes it, or it fills up). A broker that loads them (``load_definitions`` in
rabbitmq.conf, or ``rabbitmqctl import_definitions``) is ready before any
service starts, and the services' own idempotent declarations then match it
argument for argument.

--check regenerates in memory and fails when the committed file differs, so a
topology change or a new connector without regenerated definitions fails CI.

The file holds no users or permissions: credentials do not belong in the
repository. Note that a blank node importing definitions at boot does not
create the default ``guest`` user: see docs/topology.md ("Provisioning
the broker") and deploy/compose.yaml.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from gateway.contract import registry  # noqa: E402
from gateway.ledger.ingest import DEFAULT_QUEUE, LEDGER_PATTERNS  # noqa: E402
from gateway.runtime.config import BrokerSettings  # noqa: E402
from gateway.runtime.outbound import command_topology  # noqa: E402
from gateway.runtime.topology import Topology, base_topology, subscription_queue  # noqa: E402

DEFAULT_OUTPUT = ROOT / "deploy" / "rabbitmq" / "definitions.json"


def runtime_topology(
    connectors: Sequence[str], delivery_limit: int, *, gateway: bool = True
) -> Topology:
    """Base topology plus the command queues of each named connector (send, and
    call when its manifest lists call actions), and the gateway's ledger status
    queue (statuses and call command outcomes) when ``gateway``.

    The same composition as :meth:`gateway.runtime.service.Service.topology`
    and the gateway's ``StatusIngestor.topology`` (without a config's
    subscription queues, which belong to consumers).
    """
    topology = base_topology()
    if gateway:
        topology = topology.merge(
            Topology(queues=(subscription_queue(DEFAULT_QUEUE, LEDGER_PATTERNS, delivery_limit),))
        )
    for name in connectors:
        spec = registry.load(name)  # a connector that fails to load fails generation
        topology = topology.merge(command_topology(spec, delivery_limit))
    return topology


def definitions(topology: Topology, *, vhost: str = "/") -> dict[str, Any]:
    """RabbitMQ definitions (the ``import_definitions`` JSON format) of ``topology``."""
    exchanges = [
        {
            "name": exchange.name,
            "vhost": vhost,
            "type": exchange.type,
            "durable": True,
            "auto_delete": False,
            "internal": False,
            "arguments": {},
        }
        for exchange in sorted(topology.exchanges, key=lambda e: e.name)
    ]
    queues = [
        {
            "name": queue.name,
            "vhost": vhost,
            "durable": True,
            "auto_delete": False,
            "arguments": dict(sorted(queue.arguments().items())),
        }
        for queue in sorted(topology.queues, key=lambda q: q.name)
    ]
    bindings = [
        {
            "source": binding.exchange,
            "vhost": vhost,
            "destination": queue.name,
            "destination_type": "queue",
            "routing_key": binding.routing_key,
            "arguments": {},
        }
        for queue in sorted(topology.queues, key=lambda q: q.name)
        for binding in sorted(queue.bindings, key=lambda b: (b.exchange, b.routing_key))
    ]
    return {
        # A blank node importing at boot creates no default vhost: declare it.
        "vhosts": [{"name": vhost}],
        "exchanges": exchanges,
        "queues": queues,
        "bindings": bindings,
    }


def render(
    *,
    vhost: str = "/",
    delivery_limit: int | None = None,
    connectors: Sequence[str] | None = None,
    gateway: bool = True,
) -> str:
    """The definitions file's text for the installed connectors (or ``connectors``)."""
    limit = BrokerSettings().delivery_limit if delivery_limit is None else delivery_limit
    names = registry.available() if connectors is None else list(connectors)
    topology = runtime_topology(names, limit, gateway=gateway)
    return json.dumps(definitions(topology, vhost=vhost), indent=2) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the file is out of date")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="file to write")
    parser.add_argument("--vhost", default="/", help="virtual host of every resource")
    parser.add_argument(
        "--delivery-limit",
        type=int,
        default=None,
        help="x-delivery-limit of command queues (default: broker.delivery_limit's default); "
        "must equal broker.delivery_limit of the services",
    )
    parser.add_argument(
        "--without-gateway",
        action="store_true",
        help="leave out the gateway service's ledger status queue (no gateway consumes it)",
    )
    args = parser.parse_args(argv)
    if args.delivery_limit is not None and args.delivery_limit < 1:
        parser.error("--delivery-limit must be at least 1")
    text = render(
        vhost=args.vhost, delivery_limit=args.delivery_limit, gateway=not args.without_gateway
    )
    if args.check:
        try:
            current = args.output.read_text()
        except OSError as exc:
            print(f"{args.output}: cannot read ({exc.strerror}); run scripts/gen_definitions.py")
            return 1
        if current != text:
            diff = difflib.unified_diff(
                current.splitlines(keepends=True),
                text.splitlines(keepends=True),
                fromfile=f"{args.output} (committed)",
                tofile=f"{args.output} (from the topology)",
            )
            sys.stdout.writelines(diff)
            print(f"{args.output} is out of date: run python scripts/gen_definitions.py")
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
