"""SMS webhook benchmark: the real SMS service against the bare bound, over loopback.

``python -m benchmarks.sms_webhooks`` (or ``make bench``) runs, in one go:

1. ``loadgen ceiling``: the load generator against a trivial aiohttp handler,
   to show it is not what limits the other figures.
2. ``bare``: a minimal aiohttp handler that verifies ``X-Twilio-Signature``
   and does a confirmed, mandatory aio-pika publish to an exchange bound to a
   quorum queue (see :mod:`benchmarks.bare`).
3. ``service x1``: ``channel-gateway run sms.twilio`` (the real service, the
   standard quorum topology, dedup, tracing, metrics) in one process.
4. ``service x2``: the same with ``--workers 2`` (SO_REUSEPORT).

Each server runs in its own subprocess; the load generator runs here. The
bare bound and ``service x1`` run side by side and get ``--rounds`` closed-loop
saturation phases in alternating order (bare, service, service, bare, ...):
the share is the median of the per-round shares, so a drift of the machine's
speed between minutes does not decide it. Then each system gets an open-loop
phase at half of the throughput it saturated at (for latency under normal
load), and the service one more at the bare bound's half rate (the same
offered load for both); ``service x2`` gets one saturation phase and one
half-rate phase. Every phase records how many cores the server kept busy,
and the run starts by measuring how much slower this machine runs a
webhook's own work right after a 1 ms idle gap than back to back
(:func:`~benchmarks.harness.idle_slowdown`): a server at a moderate open-loop
rate pays that on every request, a saturated one never.
Every request is a distinct signed Twilio inbound-SMS webhook (unique
``MessageSid``), signed before the phase. After each phase the queue the
events land on is counted: what the server accepted must be exactly what
the broker holds.

Everything on the broker lives in a throw-away vhost (created with
``rabbitmqctl`` and deleted at the end), so the service's standard topology
(command queue included) never meets other users of the broker. Results go
to ``benchmarks/results/sms_webhooks.json`` and a table on stdout.
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from benchmarks.harness import (
    ROOT,
    Broker,
    Server,
    free_port,
    idle_slowdown,
    is_local,
    machine,
    running,
    signed_twilio_form,
    twilio_request_head,
    write_report,
)
from benchmarks.load import PhaseResult, RequestSource, closed_loop, open_loop

RESULTS = ROOT / "benchmarks" / "results" / "sms_webhooks.json"
TOKEN_ENV = "BENCH_TWILIO_TOKEN"
#: Target of the issue: the service reaches this share of the bare bound's throughput.
TARGET_SHARE = 0.85
#: ... and keeps p99 under this at half its saturation rate.
TARGET_P99_MS = 25.0


@dataclass(frozen=True)
class Webhooks:
    """Builds signed Twilio inbound-SMS webhooks for one server."""

    token: str
    account_key: str
    account_sid: str
    run_id: str

    def factory(self, port: int, tag: int) -> Callable[[int], bytes]:
        """Request ``i`` of a phase: its own MessageSid, signed for ``port``."""
        path = f"/webhooks/sms/twilio/{self.account_key}/inbound"
        url = f"http://127.0.0.1:{port}{path}"
        head = twilio_request_head(port, path)

        def make(i: int) -> bytes:
            sid = f"SM{self.run_id}{tag:02x}{i:022x}"
            # The parameters Twilio sends with an inbound SMS, in its order.
            params = {
                "ToCountry": "US",
                "ToState": "CA",
                "SmsMessageSid": sid,
                "NumMedia": "0",
                "ToCity": "SAN FRANCISCO",
                "FromZip": "",
                "SmsSid": sid,
                "FromState": "",
                "SmsStatus": "received",
                "FromCity": "",
                "Body": f"Hi! Where is my order #{i}? Thanks",
                "FromCountry": "GB",
                "To": "+14155550100",
                "ToZip": "94105",
                "NumSegments": "1",
                "ReferralNumMedia": "0",
                "MessageSid": sid,
                "AccountSid": self.account_sid,
                "From": "+447700900123",
                "ApiVersion": "2010-04-01",
            }
            return signed_twilio_form(head, url, self.token, params)

        return make


@dataclass
class Settings:
    """Command-line knobs."""

    duration: float
    warmup: float
    concurrency: int
    connections: int
    workers: list[int]
    dedup: str
    broker_url: str
    output: Path
    rounds: int = 3


async def _saturation(
    server: Server,
    port: int,
    webhooks: Webhooks,
    tag: int,
    cfg: Settings,
    count: Callable[[], Awaitable[int]],
    expected_rate: float,
) -> tuple[PhaseResult, dict[str, object]]:
    """A closed-loop saturation phase on a running server, checked against the queue."""
    budget = int(expected_rate * (cfg.warmup + cfg.duration) * 1.3) + cfg.concurrency
    source = RequestSource(webhooks.factory(port, tag), budget)
    cpu, wall = server.cpu_seconds(), time.monotonic()
    saturated = await closed_loop(
        port, source, concurrency=cfg.concurrency, duration=cfg.duration, warmup=cfg.warmup
    )
    cpu, wall = server.cpu_seconds() - cpu, time.monotonic() - wall
    return saturated, _with_check(saturated, await count(), source.made_late, cpu, wall)


async def _half_rate(
    server: Server,
    port: int,
    webhooks: Webhooks,
    tag: int,
    cfg: Settings,
    count: Callable[[], Awaitable[int]],
    rate: float,
) -> tuple[PhaseResult, dict[str, object]]:
    """An open-loop phase at ``rate`` (half a saturation rate: latency under normal load)."""
    source = RequestSource(
        webhooks.factory(port, tag), int(rate * (cfg.warmup + cfg.duration)) + 16
    )
    cpu, wall = server.cpu_seconds(), time.monotonic()
    paced = await open_loop(
        port,
        source,
        rate=rate,
        duration=cfg.duration,
        warmup=cfg.warmup,
        connections=cfg.connections,
    )
    cpu, wall = server.cpu_seconds() - cpu, time.monotonic() - wall
    return paced, _with_check(paced, await count(), source.made_late, cpu, wall)


async def _phase_pair(
    label: str,
    server: Server,
    port: int,
    webhooks: Webhooks,
    tag: int,
    cfg: Settings,
    count: Callable[[], Awaitable[int]],
    expected_rate: float,
) -> dict[str, object]:
    """Saturation then half-rate on one running server; each checked against the queue."""
    saturated, sat = await _saturation(server, port, webhooks, tag, cfg, count, expected_rate)
    paced, half = await _half_rate(
        server, port, webhooks, tag + 1, cfg, count, saturated.throughput / 2
    )
    _print_row(label, saturated, sat, paced, half)
    return {"label": label, "saturation": sat, "half_rate": half}


def _with_check(
    result: PhaseResult, on_queue: int, made_late: int, server_cpu: float, wall: float
) -> dict[str, object]:
    summary = result.summary()
    # CPU the server spent per request it answered: steadier than req/s on a busy machine.
    summary["server_cpu_ms_per_request"] = round(1000 * server_cpu / max(result.sent_total, 1), 3)
    # How busy the server's processes were over the phase, in cores: near 1 per
    # process means CPU-bound, and an open-loop phase there queues.
    summary["server_cores_busy"] = round(server_cpu / max(wall, 1e-9), 3)
    summary["on_queue"] = on_queue
    summary["queue_matches_accepted"] = on_queue == result.accepted_total
    summary["requests_signed_during_phase"] = made_late
    return summary


def _print_row(
    label: str,
    saturated: PhaseResult | None,
    sat: dict[str, object] | None,
    paced: PhaseResult,
    half: dict[str, object],
) -> None:
    if saturated is None or sat is None:
        left = f"{'':>9} {'':>8} {'':>8}"
        sat_cpu = "     -"
    else:
        left = (
            f"{saturated.throughput:>9.0f} {saturated.percentile(50) * 1e3:>8.2f} "
            f"{saturated.percentile(99) * 1e3:>8.2f}"
        )
        sat_cpu = f"{sat['server_cpu_ms_per_request']:>6.3f}"
    print(
        f"{label:<22} {left} | {paced.target_rate or 0:>7.0f} "
        f"{paced.throughput:>8.0f} {paced.percentile(50) * 1e3:>8.2f} "
        f"{paced.percentile(99) * 1e3:>8.2f} | {sat_cpu} {half['server_cpu_ms_per_request']:>6.3f}"
        f" | {half['server_cores_busy']:>5.2f}",
        flush=True,
    )


async def run(cfg: Settings) -> dict[str, object]:
    """The whole benchmark; returns the JSON document it also writes."""
    run_id = secrets.token_hex(4)
    webhooks = Webhooks(
        token=secrets.token_hex(16),
        account_key=f"bench{run_id}",
        account_sid="AC" + secrets.token_hex(16),
        run_id=run_id,
    )
    use_vhost = shutil.which("rabbitmqctl") is not None
    if not use_vhost:
        print(
            "warning: rabbitmqctl not found; using the broker's default vhost (the service "
            "will also consume the shared connector.sms.twilio.send queue while it runs)",
            file=sys.stderr,
        )
    broker = Broker(cfg.broker_url, f"bench-sms-{run_id}" if use_vhost else None)
    bare_name = f"bench.bare.{run_id}"
    events_queue = f"bench.sms.{run_id}"
    cleanup = [("queue", bare_name), ("exchange", bare_name), ("queue", events_queue)]
    env = {**os.environ, TOKEN_ENV: webhooks.token, "PYTHONUNBUFFERED": "1"}
    py = sys.executable
    report: dict[str, object] = {
        "command": "python -m benchmarks.sms_webhooks " + " ".join(sys.argv[1:]),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {
            "duration_s": cfg.duration,
            "warmup_s": cfg.warmup,
            "concurrency": cfg.concurrency,
            "open_loop_connections": cfg.connections,
            "saturation_rounds": cfg.rounds,
            "dedup": cfg.dedup,
            "broker": "RabbitMQ at " + (urlsplit(cfg.broker_url).hostname or "?"),
        },
    }
    # Before any server runs: how much an idle gap slows this machine's CPU down.
    slowdown = idle_slowdown()
    report["idle_slowdown"] = slowdown
    print(
        f"idle slowdown: a webhook's own work takes {slowdown['after_gap_us']:.0f} us after a "
        f"{slowdown['gap_ms']:.0f} ms idle gap, {slowdown['back_to_back_us']:.0f} us back to back"
        f" (x{slowdown['slowdown']:.2f})",
        flush=True,
    )
    systems: list[dict[str, object]] = []
    print(
        f"{'':<22} {'saturation (closed loop)':^27} | {'half rate (open loop)':^34} |"
        f" cpu ms/req  | cores\n"
        f"{'system':<22} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} | {'target':>7} "
        f"{'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} |    sat   half | half",
        flush=True,
    )
    await broker.open()
    try:
        await broker.declare_bare(bare_name)

        # 1. The load generator's own ceiling, against a handler that does nothing.
        port = free_port()
        trivial = Server(
            "trivial",
            [py, "-m", "benchmarks.bare", "--port", str(port), "--trivial"],
            env=env,
            ready=1,
        )
        async with running(trivial):
            fixed = webhooks.factory(port, 0)(0)
            source = RequestSource(lambda _: fixed, 0)
            ceiling = await closed_loop(
                port,
                source,
                concurrency=cfg.concurrency,
                duration=min(cfg.duration, 5.0),
                warmup=cfg.warmup,
            )
        report["loadgen_ceiling"] = ceiling.summary()
        print(
            f"{'trivial handler':<22} {ceiling.throughput:>9.0f} "
            f"{ceiling.percentile(50) * 1e3:>8.2f} {ceiling.percentile(99) * 1e3:>8.2f} |"
            f"  (load generator ceiling; its cpu {ceiling.loadgen_cpu:.2f})",
            flush=True,
        )

        # 2. The bare bound and one service process, both running, measured in
        # alternating saturation rounds (bare, service, service, bare, ...): this
        # VM's speed drifts by a third from one minute to the next, and a share
        # taken from phases minutes apart would measure that drift too.
        with tempfile.TemporaryDirectory(prefix="bench-sms-") as tmp:
            bare_port = free_port()
            bare = Server(
                "bare",
                [
                    *(py, "-m", "benchmarks.bare", "--port", str(bare_port)),
                    *("--amqp", broker.url, "--exchange", bare_name, "--token-env", TOKEN_ENV),
                ],
                env=env,
                ready=1,
            )

            def service_server(workers: int) -> tuple[Server, int]:
                port = free_port()
                config = Path(tmp) / f"config-{workers}.json"
                config.write_text(json.dumps(_service_config(port, broker.url, cfg, webhooks)))
                argv = [py, "-m", "gateway.cli", "--config", str(config), "run", "sms.twilio"]
                if workers > 1:
                    argv += ["--workers", str(workers)]
                return Server(f"service x{workers}", argv, env=env, ready=workers), port

            service, service_port = service_server(1)

            def count_bare() -> Awaitable[int]:
                return broker.count_and_purge(bare_name)

            def count_events() -> Awaitable[int]:
                return broker.count_and_purge(events_queue)

            async with running(bare), running(service):
                pair = await _interleaved(
                    cfg,
                    webhooks,
                    (bare, bare_port, count_bare),
                    (service, service_port, count_events),
                )
            systems += pair
            bare_rate = float(pair[0]["saturation"]["requests_per_s"])  # type: ignore[index]

            # 3. More service processes (SO_REUSEPORT), each on its own.
            for i, workers in enumerate(w for w in cfg.workers if w > 1):
                many, port = service_server(workers)
                async with running(many):
                    result = await _phase_pair(
                        f"service x{workers}",
                        many,
                        port,
                        webhooks,
                        0x20 + 2 * i,
                        cfg,
                        count_events,
                        expected_rate=bare_rate * workers,
                    )
                result["workers"] = workers
                result["dedup"] = cfg.dedup
                systems.append(result)
    finally:
        await broker.close(cleanup)
    report["systems"] = systems
    report["verdict"] = _verdict(systems, slowdown)
    report["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return report


Target = tuple[Server, int, Callable[[], Awaitable[int]]]


async def _interleaved(
    cfg: Settings, webhooks: Webhooks, bare: Target, service: Target
) -> list[dict[str, object]]:
    """Saturation rounds alternating bare and service, then each at half rate.

    Each round's share compares two phases seconds apart; the round with the
    median share stands for both systems (all rounds are kept in the report).
    """
    rounds: list[dict[str, object]] = []
    results: list[dict[str, tuple[PhaseResult, dict[str, object]]]] = []
    for r in range(cfg.rounds):
        # ABBA order: a drift within a round favours neither system.
        order = [("bare", bare), ("service", service)]
        if r % 2:
            order.reverse()
        got: dict[str, tuple[PhaseResult, dict[str, object]]] = {}
        for name, (server, port, count) in order:
            tag = 0x40 + 2 * r + (name == "service")
            got[name] = await _saturation(server, port, webhooks, tag, cfg, count, 6000)
        share = got["service"][0].throughput / max(got["bare"][0].throughput, 1e-9)
        results.append(got)
        rounds.append(
            {
                "round": r + 1,
                "order": [name for name, _ in order],
                "bare_requests_per_s": got["bare"][1]["requests_per_s"],
                "service_requests_per_s": got["service"][1]["requests_per_s"],
                "bare_cpu_ms_per_request": got["bare"][1]["server_cpu_ms_per_request"],
                "service_cpu_ms_per_request": got["service"][1]["server_cpu_ms_per_request"],
                "share": round(share, 3),
            }
        )
        print(
            f"  round {r + 1}: bare {got['bare'][0].throughput:.0f} req/s, service "
            f"{got['service'][0].throughput:.0f} req/s, share {share:.3f}",
            flush=True,
        )
    median = sorted(range(len(rounds)), key=lambda i: float(rounds[i]["share"]))[  # type: ignore[arg-type]
        len(rounds) // 2
    ]
    systems: list[dict[str, object]] = []
    for i, (name, (server, port, count)) in enumerate((("bare", bare), ("service", service))):
        saturated, sat = results[median][name]
        paced, half = await _half_rate(
            server, port, webhooks, 0x60 + i, cfg, count, saturated.throughput / 2
        )
        label = "bare bound" if name == "bare" else "service x1"
        _print_row(label, saturated, sat, paced, half)
        system: dict[str, object] = {"label": label, "saturation": sat, "half_rate": half}
        if name == "service":
            system.update(workers=1, dedup=cfg.dedup, rounds=rounds, median_round=median + 1)
        systems.append(system)
    # The service once more at the bare bound's half rate: the same offered
    # load for both, so their latencies compare directly. (Each system's own
    # half rate differs whenever their saturation rates do.)
    server, port, count = service
    bare_half_rate = results[median]["bare"][0].throughput / 2
    paced, same_load = await _half_rate(server, port, webhooks, 0x62, cfg, count, bare_half_rate)
    _print_row("service x1 @ bare rate", None, None, paced, same_load)
    systems[1]["at_bare_half_rate"] = same_load
    return systems


def _service_config(port: int, url: str, cfg: Settings, webhooks: Webhooks) -> dict[str, object]:
    return {
        "http": {"host": "127.0.0.1", "port": port},
        "broker": {"url": url},
        "dedup": {"url": cfg.dedup},
        "telemetry": {"log_level": "INFO", "log_format": "json"},
        "subscriptions": [
            {"queue": f"bench.sms.{webhooks.run_id}", "bindings": ["message.received.sms.twilio"]}
        ],
        "connectors": {
            "sms.twilio": {
                "accounts": {
                    webhooks.account_key: {
                        "account_sid": webhooks.account_sid,
                        "auth_token": {"env": TOKEN_ENV},
                        "numbers": ["+14155550100"],
                    }
                }
            }
        },
    }


def _verdict(systems: list[dict[str, object]], slowdown: dict[str, float]) -> dict[str, object]:
    by_label = {str(s["label"]): s for s in systems}
    bare = by_label.get("bare bound")
    one = by_label.get("service x1")
    if bare is None or one is None:
        return {}
    bare_sat = bare["saturation"]
    one_sat, one_half = one["saturation"], one["half_rate"]
    assert isinstance(bare_sat, dict)
    assert isinstance(one_sat, dict)
    assert isinstance(one_half, dict)
    share = float(one_sat["requests_per_s"]) / max(float(bare_sat["requests_per_s"]), 1e-9)
    verdict: dict[str, object] = {
        "service_share_of_bare": round(share, 3),
        "share_by_round": [r["share"] for r in one.get("rounds", [])],  # type: ignore[attr-defined]
        "throughput_target_met": share >= TARGET_SHARE,
        "service_p99_ms_at_half_rate": one_half["p99_ms"],
        "p99_target_met": float(one_half["p99_ms"]) < TARGET_P99_MS,
        # What stands behind a miss: how busy the service's core was at its half
        # rate, and how much slower this machine runs code after an idle gap.
        "service_cores_busy_at_half_rate": one_half["server_cores_busy"],
        "idle_slowdown": slowdown["slowdown"],
        "bare_p99_ms_at_half_rate": bare["half_rate"]["p99_ms"],  # type: ignore[index]
        "service_p99_ms_at_bare_half_rate": one.get("at_bare_half_rate", {}).get("p99_ms"),  # type: ignore[attr-defined]
        "all_accepted_on_queue": all(
            bool(s[phase]["queue_matches_accepted"])  # type: ignore[index]
            for s in systems
            for phase in ("saturation", "half_rate")
        ),
    }
    one_rate = max(float(one_sat["requests_per_s"]), 1e-9)
    for s in systems:
        if s.get("workers", 1) != 1 and isinstance(s["saturation"], dict):
            rate = float(s["saturation"]["requests_per_s"])
            verdict[f"scaling_x{s['workers']}"] = round(rate / one_rate, 3)
    return verdict


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m benchmarks.sms_webhooks``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds first")
    parser.add_argument(
        "--concurrency", type=int, default=64, help="connections in the saturation phase"
    )
    parser.add_argument(
        "--connections", type=int, default=64, help="connection pool of the open-loop phase"
    )
    parser.add_argument(
        "--workers", default="1,2", help="service process counts to run (default 1,2)"
    )
    parser.add_argument(
        "--dedup", default="memory://", help="service dedup store (memory:// or redis://...)"
    )
    parser.add_argument("--broker-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternating bare/service saturation rounds; the median share is reported",
    )
    args = parser.parse_args(argv)
    if not is_local(args.broker_url):
        parser.error("the benchmark only talks to a local broker (127.0.0.1)")
    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        parser.error(f"--workers takes a comma-separated list of numbers, got {args.workers!r}")
    if not workers or min(workers) < 1:
        parser.error("--workers needs at least one count >= 1")
    if args.duration <= 0 or args.warmup < 0 or args.concurrency < 1 or args.connections < 1:
        parser.error("--duration, --concurrency and --connections must be positive")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    cfg = Settings(
        duration=args.duration,
        warmup=args.warmup,
        concurrency=args.concurrency,
        connections=args.connections,
        workers=workers,
        dedup=args.dedup,
        broker_url=args.broker_url,
        output=args.output,
        rounds=args.rounds,
    )
    started = time.monotonic()
    report = asyncio.run(run(cfg))
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    write_report(cfg.output, report)
    verdict = report.get("verdict", {})
    print(f"\n{json.dumps(verdict, indent=2)}\nwritten to {cfg.output}")
    return 0 if isinstance(verdict, dict) and verdict.get("all_accepted_on_queue") else 1


if __name__ == "__main__":
    sys.exit(main())
