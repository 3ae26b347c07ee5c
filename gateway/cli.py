"""``channel-gateway``: run services, the end-to-end demo, and ``tail``.

channel-gateway run sms            host every enabled SMS connector
channel-gateway run sms --workers 2   the same in 2 processes sharing the port
channel-gateway up                 the gateway and every enabled connector in one process
channel-gateway demo               real traffic end to end (see gateway/demo.py)
channel-gateway tail 'message.#'   print events live
channel-gateway connectors         list installed connectors and their manifests
channel-gateway run gateway        the gRPC gateway (ledger, status ingestor, fallback engine)
channel-gateway send +4477... -m hi   send through the gateway's gRPC API
channel-gateway trace <message-id>    a message's status timeline with trace ids
channel-gateway call place +1415... --say hi --provider twilio   place or control a voice call
channel-gateway telegram set-webhook <bot>   register a bot's webhook (and secret token)
channel-gateway spool drain --path F   republish a spool file no service drains, then exit
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import wait
from pathlib import Path
from types import FrameType

from google.protobuf.json_format import MessageToDict

from gateway.api.v1.call_pb2 import (
    CallCommand,
    CallCommandOutcome,
    EnqueueCall,
    HangUpCall,
    PlaceCall,
    SpeakToCall,
    TransferCall,
)
from gateway.api.v1.envelope_pb2 import Event
from gateway.contract import ConfigError, ConnectorNotFoundError, registry
from gateway.contract.connector import ConnectorSpec
from gateway.contract.ids import new_id
from gateway.display import render
from gateway.runtime.bus import BrokerUnavailableError, Delivery, PublishError, UnroutableError
from gateway.runtime.codec import decode_event, encode_call_command
from gateway.runtime.config import RuntimeSettings, load_config
from gateway.runtime.outbound import CALL_COMMAND_EVENT_TYPE
from gateway.runtime.service import Service, enabled_connectors, open_bus
from gateway.runtime.telemetry import configure_logging
from gateway.runtime.topology import COMMANDS_EXCHANGE, EVENTS_EXCHANGE, base_topology


def _run(args: argparse.Namespace, selectors: Sequence[str]) -> int:
    settings = load_config(args.config)
    configure_logging(settings.telemetry.log_level, settings.telemetry.log_format)
    names = enabled_connectors(settings, selectors)
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    if args.workers == 1:
        asyncio.run(Service(settings, names).run())
        return 0
    if settings.http.port == 0:
        # Each process would get its own random port: nothing to share.
        raise ConfigError("--workers > 1 needs a fixed http.port (the workers share it)")
    return _supervise(settings, names, args.workers)


def _worker(settings: RuntimeSettings, names: list[str]) -> None:
    """One worker process of ``run --workers N`` (started with multiprocessing spawn)."""
    configure_logging(settings.telemetry.log_level, settings.telemetry.log_format)
    try:
        asyncio.run(Service(settings, names, reuse_port=True).run())
    except (ConfigError, BrokerUnavailableError) as exc:
        print(f"channel-gateway worker: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # SIGINT before the service installed its handler
        sys.exit(130)


def _supervise(settings: RuntimeSettings, names: list[str], workers: int) -> int:
    """Run ``workers`` service processes on one port (SO_REUSEPORT) until SIGTERM/SIGINT.

    SIGTERM/SIGINT are passed on and each worker drains like a single process.
    A worker that dies takes the others down, so a supervisor above (systemd,
    Kubernetes) sees the failure and restarts the whole set.
    """
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(settings, names), name=f"worker-{i}", daemon=False)
        for i in range(workers)
    ]
    stopping = False

    def forward(signum: int, _: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                proc.terminate()  # SIGTERM: a graceful drain in the worker

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for proc in procs:
            proc.start()
        running = list(procs)
        while running:
            ended = wait([p.sentinel for p in running])
            running = [p for p in running if p.sentinel not in ended]
            for proc in procs:
                if proc.exitcode not in (None, 0) and not stopping:
                    print(
                        f"channel-gateway: {proc.name} exited with {proc.exitcode}; "
                        "stopping the other workers",
                        file=sys.stderr,
                    )
                    forward(signal.SIGTERM, None)
        for proc in procs:
            proc.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [abs(p.exitcode or 0) for p in procs]
    return max(codes) if any(codes) else 0


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


def _gateway_address(args: argparse.Namespace) -> str:
    if args.gateway:
        return str(args.gateway)
    from gateway.server.settings import gateway_settings

    section = gateway_settings(load_config(args.config))
    return f"{section.host}:{section.port}"


def _run_gateway(args: argparse.Namespace, selectors: Sequence[str]) -> int:
    """``run gateway [channel ...]`` and ``up``: the gateway, with connectors in-process."""
    from gateway.server.runner import run_gateway

    settings = load_config(args.config)
    configure_logging(settings.telemetry.log_level, settings.telemetry.log_format)
    if getattr(args, "workers", 1) != 1:
        raise ConfigError("the gateway runs in one process: run more replicas instead of --workers")
    others = [s for s in selectors if s != "gateway"]
    names = enabled_connectors(settings, others) if others or args.command == "up" else []
    asyncio.run(run_gateway(settings, names))
    return 0


def _metadata(items: Sequence[str]) -> dict[str, str]:
    """``--meta key=value`` options as a mapping."""
    metadata = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--meta takes key=value, got {item!r}")
        metadata[key] = value
    return metadata


def _send(args: argparse.Namespace) -> int:
    from gateway.server import client

    metadata = _metadata(args.meta)
    request = client.build_send_request(
        to=args.to,
        channel=args.channel,
        provider=args.provider,
        account=args.account,
        text=args.text,
        media=args.media,
        idempotency_key=args.idempotency_key,
        correlation_id=args.correlation_id,
        conversation_id=args.conversation_id,
        metadata=metadata,
    )
    try:
        reply = asyncio.run(client.send(_gateway_address(args), request, timeout=args.timeout))
    except client.ClientError as exc:
        print(f"channel-gateway send: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2))
    else:
        verb = "accepted" if reply.created else "already accepted (same idempotency key)"
        print(
            f"{verb}: {reply.message_id} via {reply.channel}.{reply.provider}, "
            f"state {client.state_name(reply.state)}, trace {reply.trace_id}"
        )
    return 0


def _trace(args: argparse.Namespace) -> int:
    import os

    from gateway.server import client

    try:
        message = asyncio.run(
            client.get_message(_gateway_address(args), args.message_id, timeout=args.timeout)
        )
    except client.ClientError as exc:
        print(f"channel-gateway trace: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(client.trace_json(message))
    else:
        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        print(client.trace_table(message, color=color))
    return 0


def _add_gateway_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gateway_help = "gateway host:port (default: gateway.host/port of the config)"
    send = sub.add_parser("send", help="send a message through the gateway's gRPC API")
    send.add_argument(
        "to",
        nargs="+",
        help="recipient address, or channel:address; several are fallback identities in order",
    )
    send.add_argument("--text", "-m", default="", help="text to send")
    send.add_argument("--media", action="append", default=[], help="media URL (repeatable)")
    send.add_argument("--channel", default="sms", help="channel of bare addresses (default sms)")
    send.add_argument("--provider", default="", help="provider (default: the channel's)")
    send.add_argument("--account", default="", help="our account on the provider")
    send.add_argument(
        "--idempotency-key", default="", help="same key never sends twice (default: random)"
    )
    send.add_argument("--correlation-id", default="")
    send.add_argument("--conversation-id", default="")
    send.add_argument("--meta", action="append", default=[], help="metadata key=value")
    send.add_argument("--gateway", default=None, help=gateway_help)
    send.add_argument("--timeout", type=float, default=10.0, help="RPC deadline in seconds")
    send.add_argument("--json", action="store_true", help="print the reply as JSON")
    trace = sub.add_parser("trace", help="a message's status timeline with trace ids")
    trace.add_argument("message_id")
    trace.add_argument("--gateway", default=None, help=gateway_help)
    trace.add_argument("--timeout", type=float, default=10.0, help="RPC deadline in seconds")
    trace.add_argument("--json", action="store_true", help="JSON instead of a table")


#: ``call`` exit status when no outcome came back (unroutable, unconfirmed or timed out).
EXIT_NO_OUTCOME = 3


def build_call_command(args: argparse.Namespace) -> CallCommand:
    """The CallCommand the ``call <action>`` options describe."""
    now = datetime.now(UTC)
    command = CallCommand(
        command_id=args.command_id or new_id(),
        channel="voice",
        provider=args.provider,
        account=args.account,
        correlation_id=args.correlation_id,
        conversation_id=args.conversation_id,
    )
    command.metadata.update(_metadata(args.meta))
    command.created_at.FromDatetime(now)
    # By default a command the CLI stopped waiting for is not executed later.
    expires_in = args.timeout if args.expires_in is None else args.expires_in
    if expires_in < 0:
        raise ConfigError(f"--expires-in must be 0 (never) or more, got {expires_in}")
    if expires_in:
        command.expires_at.FromDatetime(now + timedelta(seconds=expires_in))
    action = args.call_action.replace("-", "_")  # "hang-up" is the hang_up action
    if action == "place":
        command.place.CopyFrom(
            PlaceCall(
                to=args.to,
                ring_timeout_seconds=args.ring_timeout,
                record=args.record,
                language=args.language,
                voice=args.voice,
            )
        )
        setattr(command.place, "from", args.from_number)  # "from" is a Python keyword
        if args.flow:
            command.place.flow = args.flow
        elif args.say:
            command.place.say = args.say
        else:
            command.place.play_url = args.play_url
    elif action == "transfer":
        command.transfer.CopyFrom(
            TransferCall(call_id=args.call_id, to=args.to, caller_id=args.caller_id)
        )
    elif action == "enqueue":
        command.enqueue.CopyFrom(EnqueueCall(call_id=args.call_id, queue=args.queue))
    elif action == "speak":
        command.speak.CopyFrom(
            SpeakToCall(
                call_id=args.call_id,
                language=args.language,
                voice=args.voice,
                then_step=args.then_step,
            )
        )
        if args.say:
            command.speak.say = args.say
        else:
            command.speak.play_url = args.play_url
    else:
        command.hang_up.CopyFrom(HangUpCall(call_id=args.call_id))
    return command


def _outcome_line(event: Event) -> str:
    result = event.call_command
    outcome = CallCommandOutcome.Name(result.outcome).removeprefix("CALL_COMMAND_OUTCOME_")
    parts = [outcome, result.action]
    if result.call_id:
        parts.append(f"call {result.call_id}")
    if result.provider_status:
        parts.append(f"({result.provider_status})")
    if result.reason_code:
        kind = "permanent" if result.permanent else "may succeed if retried"
        parts.append(f"reason {result.reason_code} [{kind}]: {result.reason}")
    parts.append(f"via {event.channel}.{event.provider}/{event.account or '-'}")
    parts.append(f"command {result.command_id}")
    return " ".join(parts)


async def _call(
    broker_url: str,
    command: CallCommand,
    *,
    timeout: float,
    publish_timeout: float,
    as_json: bool,
) -> int:
    """Publish ``command`` with confirms and print its ``call.command`` outcome.

    The outcome queue is bound before the publish, so a fast outcome is never
    missed. Exit status: 0 accepted, 1 failed or expired, 3 no outcome.
    """
    bus = open_bus(broker_url)
    await bus.connect()
    try:
        await bus.declare(base_topology())
        pattern = f"{CALL_COMMAND_EVENT_TYPE}.{command.channel}.{command.provider}"
        queue = await bus.declare_temporary_queue(EVENTS_EXCHANGE, [pattern])
        outcome: asyncio.Future[tuple[Event, str]] = asyncio.get_running_loop().create_future()

        async def on_event(delivery: Delivery) -> None:
            event = decode_event(delivery)
            # Other commands' outcomes share the binding: only this one's counts.
            if event.causation_id == command.command_id and not outcome.done():
                outcome.set_result((event, delivery.routing_key))

        subscription = await bus.consume(queue, on_event, prefetch=16)
        try:
            routing_key, message = encode_call_command(command)
            try:
                await bus.publish(COMMANDS_EXCHANGE, routing_key, message, timeout=publish_timeout)
            except UnroutableError:
                print(
                    f"channel-gateway call: nothing consumes {routing_key} on "
                    f"{COMMANDS_EXCHANGE}: is a {command.channel}.{command.provider} service "
                    "with call actions running?",
                    file=sys.stderr,
                )
                return EXIT_NO_OUTCOME
            except PublishError as exc:
                print(f"channel-gateway call: publish not confirmed: {exc}", file=sys.stderr)
                return EXIT_NO_OUTCOME
            print(
                f"published {command.WhichOneof('action')} command {command.command_id} "
                f"as {routing_key}; waiting up to {timeout:g}s for its outcome",
                file=sys.stderr,
            )
            try:
                event, event_key = await asyncio.wait_for(outcome, timeout)
            except TimeoutError:
                expiry = (
                    "it expires at " + command.expires_at.ToDatetime(tzinfo=UTC).isoformat()
                    if command.HasField("expires_at")
                    else "it may still be executed"
                )
                print(
                    f"channel-gateway call: no outcome for {command.command_id} within "
                    f"{timeout:g}s ({expiry})",
                    file=sys.stderr,
                )
                return EXIT_NO_OUTCOME
        finally:
            await subscription.cancel()
    finally:
        await bus.close()
    if as_json:
        as_dict = MessageToDict(event, preserving_proto_field_name=True)
        print(json.dumps({"routing_key": event_key, "event": as_dict}, indent=2))
    else:
        print(_outcome_line(event))
    accepted = event.call_command.outcome == CallCommandOutcome.CALL_COMMAND_OUTCOME_ACCEPTED
    return 0 if accepted else 1


def _call_command(args: argparse.Namespace) -> int:
    settings = load_config(args.config)
    if args.timeout <= 0:
        raise ConfigError(f"--timeout must be positive, got {args.timeout}")
    return asyncio.run(
        _call(
            args.broker_url or settings.broker.url,
            build_call_command(args),
            timeout=args.timeout,
            publish_timeout=settings.broker.publish_timeout,
            as_json=args.json,
        )
    )


def _add_call_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--provider", required=True, help="voice provider whose connector acts (twilio, vonage)"
    )
    common.add_argument("--account", default="", help="our account key (default: the connector's)")
    common.add_argument("--command-id", default="", help="command id (default: a new UUID)")
    common.add_argument("--correlation-id", default="")
    common.add_argument("--conversation-id", default="")
    common.add_argument("--meta", action="append", default=[], help="metadata key=value")
    common.add_argument(
        "--broker-url", default=None, help="RabbitMQ URL (default: broker.url of the config)"
    )
    common.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for the outcome (default 30)"
    )
    common.add_argument(
        "--expires-in",
        type=float,
        default=None,
        help="seconds after which the connector must not act (default: --timeout; 0: never)",
    )
    common.add_argument("--json", action="store_true", help="print the outcome event as JSON")
    call = sub.add_parser(
        "call",
        help="place or control a voice call through its connector",
        description="Publish a CallCommand on channels.commands and print its call.command "
        "outcome. Exit status: 0 accepted, 1 failed or expired, "
        f"{EXIT_NO_OUTCOME} no outcome (nothing consumes it, or --timeout passed).",
    )
    actions = call.add_subparsers(dest="call_action", required=True, metavar="ACTION")

    def say_or_play(parser: argparse.ArgumentParser, *, flow: bool = False) -> None:
        script = parser.add_mutually_exclusive_group(required=True)
        if flow:
            script.add_argument("--flow", help="configured call flow to run once answered")
        script.add_argument("--say", help="text to speak")
        script.add_argument("--play-url", help="audio URL to play")
        parser.add_argument("--language", default="", help="BCP-47 language of --say")
        parser.add_argument("--voice", default="", help="provider voice of --say")

    place = actions.add_parser("place", parents=[common], help="dial a number")
    place.add_argument("to", help="E.164 number or sip: URI to call")
    place.add_argument(
        "--from", dest="from_number", default="", help="our number (default: the account's)"
    )
    say_or_play(place, flow=True)
    place.add_argument(
        "--ring-timeout", type=int, default=0, help="seconds to ring (0: provider default)"
    )
    place.add_argument("--record", action="store_true", help="record the whole call")
    transfer = actions.add_parser(
        "transfer", parents=[common], help="move a live call to a number or SIP endpoint"
    )
    transfer.add_argument("call_id", help="the provider's call id")
    transfer.add_argument("to", help="E.164 number or sip: URI")
    transfer.add_argument("--caller-id", default="", help="caller id shown to the target")
    enqueue = actions.add_parser("enqueue", parents=[common], help="put a live call on hold")
    enqueue.add_argument("call_id", help="the provider's call id")
    enqueue.add_argument("queue", help="hold queue name")
    speak = actions.add_parser("speak", parents=[common], help="say or play on a live call")
    speak.add_argument("call_id", help="the provider's call id")
    say_or_play(speak)
    speak.add_argument(
        "--then-step",
        default="",
        help="flow step to continue with (<flow>/<step>); default hangs up",
    )
    hang_up = actions.add_parser("hang-up", parents=[common], help="end a live call")
    hang_up.add_argument("call_id", help="the provider's call id")


def _add_telegram_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    telegram = sub.add_parser("telegram", help="Telegram bot management")
    commands = telegram.add_subparsers(dest="telegram_command", required=True)
    hook = commands.add_parser(
        "set-webhook", help="register a bot's webhook URL and secret token with Telegram"
    )
    hook.add_argument("bot", help="bot key under connectors.telegram.bot.bots")
    hook.add_argument("--url", help="webhook URL (default: http.public_base_url + the bot's route)")
    hook.add_argument(
        "--drop-pending", action="store_true", help="drop updates Telegram has queued"
    )


async def _telegram_set_webhook(args: argparse.Namespace) -> int:
    """``telegram set-webhook``: setWebhook with the configured secret token."""
    import aiohttp

    from gateway.contract.errors import ConnectorError
    from gateway.runtime.service import RuntimeContext
    from gateway.runtime.telemetry import get_logger

    settings = load_config(args.config)
    spec = registry.load("telegram.bot")
    section = settings.connector_settings(spec)
    base = settings.http.public_base_url
    if not args.url and not base:
        raise ConfigError("set http.public_base_url (Telegram calls it over https) or pass --url")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        context = RuntimeContext(
            spec=spec, http=http, log=get_logger("cli.telegram"), base_url=base or ""
        )
        connector = spec.factory(context, section)
        context.routes = {r.name: r for r in connector.webhook_routes()}
        set_webhook = getattr(connector, "set_webhook", None)
        if not callable(set_webhook):
            raise ConfigError("the installed telegram.bot connector cannot set webhooks")
        url = args.url or context.webhook_url("update", account=args.bot)
        await connector.start()
        try:
            await set_webhook(args.bot, url, drop_pending=args.drop_pending)
        except ConnectorError as exc:
            print(f"channel-gateway: setWebhook failed: {exc}", file=sys.stderr)
            return 1
        finally:
            await connector.stop()
    print(f"webhook of bot {args.bot} set to {url}")
    return 0


def _add_spool_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    spool = sub.add_parser("spool", help="a service's durable spool (spool.state_dir)")
    commands = spool.add_subparsers(dest="spool_command", required=True)
    drain = commands.add_parser(
        "drain",
        help="republish every event of a spool file no service drains any more (the volume of "
        "a replica scaled away, a file moved aside), then exit: 0 when it is empty, 1 when "
        "events are left at --timeout",
    )
    drain.add_argument(
        "--path",
        required=True,
        help="the spool file, e.g. /var/lib/channel-gateway/spool/sms.sqlite",
    )
    drain.add_argument(
        "--broker-url", default=None, help="RabbitMQ URL (default: broker.url of the config)"
    )
    drain.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds to keep trying before giving up with events left (default 600)",
    )


def _spool_drain(args: argparse.Namespace) -> int:
    """``spool drain``: replay a spool file with the services' own drainer until it is empty."""
    settings = load_config(args.config)
    configure_logging(settings.telemetry.log_level, settings.telemetry.log_format)
    path = Path(args.path)
    if not path.is_file():
        # Opening creates a spool: a mistyped path must not pass for a drained file.
        raise ConfigError(f"no spool file at {path}")
    return asyncio.run(
        _drain_spool_file(path, settings, args.broker_url or settings.broker.url, args.timeout)
    )


async def _drain_spool_file(
    path: Path, settings: RuntimeSettings, broker_url: str, timeout: float
) -> int:
    """Same replay as a running service (oldest first, publisher confirms, a row
    deleted only after its confirm, rows leased so a service sharing the file
    does not publish them at the same time); this only adds the exit once the
    file holds no event, or at ``timeout``."""
    from gateway.runtime.spool import configured_drainer, open_spool

    spool, found = await open_spool(path, settings.spool)
    replayed = 0
    try:
        if found.events:
            bus = open_bus(broker_url, connect_timeout=settings.broker.connect_timeout)
            await bus.connect()
            drainer = configured_drainer(spool, bus, settings)
            try:
                # The exchanges the spooled events name (a service declares them at start).
                await bus.declare(base_topology())
                drainer.start()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        # The drainer deletes confirmed rows and refreshes these counts; the
                        # spool signals no change of them, so they are read a few times a second.
                        while spool.stats.events:  # noqa: ASYNC110
                            await asyncio.sleep(0.2)
            finally:
                await drainer.stop()
                replayed = drainer.replayed
                await bus.close()
    finally:
        await spool.close()
    left = spool.stats.events
    print(f"{path}: {replayed} of {found.events} events republished, {left} left")
    if left:
        print(
            f"channel-gateway: {left} events are still in {path} after {timeout:g} s; "
            "see the log ('spool replay paused: broker unavailable', 'spooled event refused by "
            "the broker') and run it again",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point."""
    parser = argparse.ArgumentParser(prog="channel-gateway", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", "-c", help="YAML config file (default: $CHANNEL_GATEWAY_CONFIG)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="host the connectors of one or more channels or names")
    run.add_argument("selectors", nargs="+", help="channel (sms) or connector name (sms.twilio)")
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        help="service processes sharing http.port with SO_REUSEPORT (default 1; more than "
        "one needs a fixed port, and a shared dedup store (redis://) to dedupe across them)",
    )
    up = sub.add_parser(
        "up", help="host the gateway and every enabled connector in one process (development)"
    )
    up.set_defaults(workers=1)
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
    _add_gateway_commands(sub)
    _add_call_commands(sub)
    _add_telegram_commands(sub)
    _add_spool_commands(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "run" and "gateway" in args.selectors:
            return _run_gateway(args, args.selectors)
        if args.command == "run":
            return _run(args, args.selectors)
        if args.command == "up":
            return _run_gateway(args, [])
        if args.command == "send":
            return _send(args)
        if args.command == "trace":
            return _trace(args)
        if args.command == "call":
            return _call_command(args)
        if args.command == "telegram":
            return asyncio.run(_telegram_set_webhook(args))
        if args.command == "spool":
            return _spool_drain(args)
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
