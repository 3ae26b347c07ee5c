"""Voice answer-webhook benchmark: incoming calls answered with TwiML, call events confirmed.

``python -m benchmarks.voice_answer`` runs ``channel-gateway run voice.twilio``
(the real service: ``X-Twilio-Signature`` check, the called number's call flow
rendered as TwiML, call events published on the standard quorum topology with
dedup, tracing and metrics) in a subprocess and drives it over loopback with
signed Twilio voice webhooks, every one a new call (its own ``CallSid``),
signed before the phase:

1. ``smoke``: one incoming call and one status callback through aiohttp; the
   answer must be TwiML holding the flow's menu, the callback a 204.
2. ``fixed rate``: incoming-call webhooks due at ``--rate`` per second (open
   loop: latency counts from when a request was due), the answer latency at a
   moderate, steady load.
3. ``load cN``: incoming-call webhooks in a closed loop at each
   ``--concurrency`` (each connection sends its next call as soon as the
   previous answer arrived): answers/s and the answer latency at load.
4. ``status cN``: call status callbacks (``/status``, ``completed``), which are
   answered only once their event is confirmed: events/s and latency.

An answer webhook waits at most ``answer_publish_wait`` (50 ms by default,
``--answer-publish-wait``) for its ``call.ringing`` event's confirm and answers
anyway, the publish going on in the background; so after every phase the
subscription queue (bound to ``call.#``) is counted once the broker holds what
was answered: accepted webhooks and events on the queue must be equal. The service's own
``gateway_publish_seconds`` histogram (scraped from ``/metrics`` around each
phase) tells how many confirms took longer than the answer budget.

The run uses a throw-away RabbitMQ vhost (created with ``rabbitmqctl``,
deleted at the end), talks to 127.0.0.1 only and takes about a minute.
Results go to ``benchmarks/results/voice_answer.json`` and a table on stdout.
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
from email.utils import format_datetime
from functools import partial
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.harness import (
    ROOT,
    Broker,
    Server,
    free_port,
    is_local,
    machine,
    running,
    signed_twilio_form,
    twilio_request_head,
    write_report,
)
from benchmarks.load import PhaseResult, RequestSource, closed_loop, open_loop
from connectors.sms.twilio.webhooks import SIGNATURE_HEADER, compute_signature

RESULTS = ROOT / "benchmarks" / "results" / "voice_answer.json"
TOKEN_ENV = "BENCH_TWILIO_VOICE_TOKEN"
OUR_NUMBER = "+14155550100"
CALLER = "+447700900123"
#: Answer budgets the bench takes: bucket bounds of gateway_publish_seconds (so it can count
#: the confirms slower than the budget).
BUDGET_BOUNDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
#: Seconds all phases together may take (start-up, smoke and queue counts come on top).
MAX_PHASES_SECONDS = 90.0
#: Target of the issue: the answer webhook's p99 at load.
TARGET_P99_MS = 100.0
#: The connector's default answer_publish_wait, in seconds.
ANSWER_BUDGET_S = 0.05
#: An IVR as an operator would write it: greeting, a menu, voicemail with transcription.
CALL_FLOWS = {
    "numbers": {OUR_NUMBER: "support"},
    "flows": {
        "support": {
            "start": "welcome",
            "steps": {
                "welcome": [
                    {"say": "Thank you for calling Acme support.", "language": "en-GB"},
                    {
                        "gather": {
                            "input": ["dtmf", "speech"],
                            "num_digits": 1,
                            "hints": ["sales", "voicemail"],
                            "prompt": [
                                {"say": "Press 1 or say sales. Press 2 to leave a message."}
                            ],
                            "routes": {"1": "sales", "sales": "sales", "2": "voicemail"},
                            "default": "goodbye",
                        }
                    },
                ],
                "sales": [{"forward": {"number": "+442079460000", "timeout": 20}}],
                "voicemail": [
                    {"say": "Leave a message after the beep."},
                    {"record": {"max_length": 60, "transcribe": True, "then": "goodbye"}},
                ],
                "goodbye": [{"say": "Goodbye."}, "hangup"],
            },
        }
    },
}


#: A load phase: drives a port with requests (see :mod:`benchmarks.load`).
Drive = Callable[[int, RequestSource], Awaitable[PhaseResult]]


@dataclass(frozen=True)
class CallWebhooks:
    """Builds signed Twilio voice webhooks (one new call per request) for one server."""

    token: str
    account_key: str
    account_sid: str
    run_id: str

    def url(self, port: int, route: str) -> str:
        """The URL Twilio calls for ``route`` (``incoming`` or ``status``)."""
        return f"http://127.0.0.1:{port}/webhooks/voice/twilio/{self.account_key}/{route}"

    def call_sid(self, tag: int, i: int) -> str:
        """Call ``i`` of phase ``tag``: "CA" + 32 hex digits, unique in the run."""
        return f"CA{self.run_id}{tag:02x}{i:022x}"

    def params(self, route: str, sid: str) -> dict[str, str]:
        """The parameters Twilio sends to the voice URL (a ringing inbound call) or, for
        ``status``, with a ``completed`` status callback, in its order."""
        params = {
            "Called": OUR_NUMBER,
            "ToState": "CA",
            "CallerCountry": "GB",
            "Direction": "inbound",
            "CallerState": "",
            "ToZip": "94105",
            "CallSid": sid,
            "To": OUR_NUMBER,
            "CallerZip": "",
            "ToCountry": "US",
            "CallToken": "%7B%22parentCallInfoToken%22%3A%22eyJhbGciOiJFUzI1NiJ9%22%7D",
            "CalledZip": "94105",
            "ApiVersion": "2010-04-01",
            "CalledCity": "SAN FRANCISCO",
            "CallStatus": "ringing",
            "From": CALLER,
            "AccountSid": self.account_sid,
            "CalledCountry": "US",
            "CallerCity": "",
            "ToCity": "SAN FRANCISCO",
            "FromCountry": "GB",
            "Caller": CALLER,
            "FromCity": "",
            "CalledState": "CA",
            "FromZip": "",
            "FromState": "",
        }
        if route == "status":
            params.update(
                {
                    "CallStatus": "completed",
                    "CallDuration": "42",
                    "Duration": "1",
                    "Timestamp": format_datetime(datetime.now(UTC), usegmt=True),
                    "CallbackSource": "call-progress-events",
                    "SequenceNumber": "3",
                }
            )
            del params["CallToken"]
        return params

    def factory(self, port: int, route: str, tag: int) -> Callable[[int], bytes]:
        """Request ``i`` of a phase: a new call's ``route`` webhook, signed for ``port``."""
        url = self.url(port, route)
        head = twilio_request_head(port, urlsplit(url).path)

        def make(i: int) -> bytes:
            sid = self.call_sid(tag, i)
            # Twilio's per-request header (the same across its retries of one request).
            idempotency = f"I-Twilio-Idempotency-Token: {sid}-{route}\r\n"
            return signed_twilio_form(head, url, self.token, self.params(route, sid), idempotency)

        return make


@dataclass
class Settings:
    """Command-line knobs."""

    duration: float
    warmup: float
    rate: float
    concurrency: list[int]
    status_concurrency: int
    connections: int
    dedup: str
    answer_wait: float
    broker_url: str
    output: Path


async def _confirms(http: aiohttp.ClientSession, port: int, budget: float) -> tuple[float, float]:
    """(confirms so far, of which within ``budget`` seconds) from the service's
    ``gateway_publish_seconds`` histogram (``budget`` is one of its bucket bounds)."""
    async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    total = within = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "gateway_publish_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count"):
                total += sample.value
            elif sample.name.endswith("_bucket") and float(sample.labels["le"]) == budget:
                within += sample.value
    return total, within


async def _smoke(http: aiohttp.ClientSession, port: int, calls: CallWebhooks) -> dict[str, object]:
    """One call answered and one status callback, checked for content (the load phases
    only read status codes)."""
    out: dict[str, object] = {}
    for route, tag in (("incoming", 0x01), ("status", 0x01)):
        url = calls.url(port, route)
        params = calls.params(route, calls.call_sid(tag, 0))
        signature = compute_signature(calls.token, url, {k: [v] for k, v in params.items()})
        headers = {
            SIGNATURE_HEADER: signature,
            "Content-Type": "application/x-www-form-urlencoded",
        }
        async with http.post(url, data=urlencode(params), headers=headers) as resp:
            body = await resp.text()
            out[route] = {"status": resp.status, "content_type": resp.content_type}
            if route == "incoming":
                if resp.status != 200 or resp.content_type != "text/xml" or "<Gather" not in body:
                    raise SystemExit(f"benchmark: the answer is not the flow's TwiML: {body!r}")
                out[route]["twiml_bytes"] = len(body.encode())  # type: ignore[index]
            elif resp.status != 204:
                raise SystemExit(f"benchmark: status callback answered {resp.status}: {body!r}")
    return out


def _summary(
    label: str,
    result: PhaseResult,
    *,
    source: RequestSource,
    on_queue: int,
    cpu: float,
    confirms: tuple[float, float],
) -> dict[str, object]:
    summary = result.summary()
    summary["label"] = label
    # One call event per webhook, in both routes.
    summary["events_per_s"] = summary["requests_per_s"]
    summary["server_cpu_ms_per_request"] = round(1000 * cpu / max(result.sent_total, 1), 3)
    summary["on_queue"] = on_queue
    summary["queue_matches_accepted"] = on_queue == result.accepted_total
    summary["requests_signed_during_phase"] = source.made_late
    total, within = confirms
    summary["confirms"] = int(total)
    summary["confirms_over_answer_budget"] = int(total - within)
    return summary


def _row(summary: dict[str, object]) -> None:
    mode = "open" if summary["mode"] == "open" else "closed"
    print(
        f"{summary['label']:<16} {mode:<6} {summary['requests_per_s']:>9} "
        f"{summary['p50_ms']:>8} {summary['p99_ms']:>8} {summary['max_ms']:>8} "
        f"{summary['on_queue']:>8} {summary['queue_matches_accepted']!s:>6} "
        f"{summary['confirms_over_answer_budget']:>6} {summary['server_cpu_ms_per_request']:>7}",
        flush=True,
    )


def _service_config(port: int, broker_url: str, cfg: Settings, calls: CallWebhooks) -> object:
    return {
        "http": {"host": "127.0.0.1", "port": port},
        "broker": {"url": broker_url},
        "dedup": {"url": cfg.dedup},
        "telemetry": {"log_level": "INFO", "log_format": "json"},
        # Call events must be routable: mandatory publishes to an unbound key fail.
        "subscriptions": [{"queue": f"bench.voice.{calls.run_id}", "bindings": ["call.#"]}],
        "connectors": {
            "voice.twilio": {
                "accounts": {
                    calls.account_key: {
                        "account_sid": calls.account_sid,
                        "auth_token": {"env": TOKEN_ENV},
                    }
                },
                "call_flows": CALL_FLOWS,
                "answer_publish_wait": cfg.answer_wait,
            }
        },
    }


async def run(cfg: Settings) -> dict[str, object]:
    """The whole benchmark; returns the JSON document it also writes."""
    run_id = secrets.token_hex(4)
    calls = CallWebhooks(
        token=secrets.token_hex(16),
        account_key=f"bench{run_id}",
        account_sid="AC" + secrets.token_hex(16),
        run_id=run_id,
    )
    use_vhost = shutil.which("rabbitmqctl") is not None
    if not use_vhost:
        print(
            "warning: rabbitmqctl not found; using the broker's default vhost (the service "
            "will also consume the shared connector.voice.twilio.send queue while it runs)",
            file=sys.stderr,
        )
    broker = Broker(cfg.broker_url, f"bench-voice-{run_id}" if use_vhost else None)
    queue = f"bench.voice.{run_id}"
    env = {**os.environ, TOKEN_ENV: calls.token, "PYTHONUNBUFFERED": "1"}
    report: dict[str, object] = {
        "command": "python -m benchmarks.voice_answer " + " ".join(sys.argv[1:]),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {
            "duration_s": cfg.duration,
            "warmup_s": cfg.warmup,
            "fixed_rate": cfg.rate,
            "concurrency": cfg.concurrency,
            "status_concurrency": cfg.status_concurrency,
            "open_loop_connections": cfg.connections,
            "dedup": cfg.dedup,
            "answer_publish_wait_s": cfg.answer_wait,
            "broker": "RabbitMQ at " + (urlsplit(cfg.broker_url).hostname or "?"),
        },
    }
    phases: list[dict[str, object]] = []
    await broker.open()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-voice-") as tmp:
            port = free_port()
            config = Path(tmp) / "config.json"
            config.write_text(json.dumps(_service_config(port, broker.url, cfg, calls)))
            argv = [sys.executable, "-m", "gateway.cli", "--config", str(config)]
            service = Server("voice.twilio", [*argv, "run", "voice.twilio"], env=env, ready=1)
            async with running(service), aiohttp.ClientSession() as http:
                report["smoke"] = await _smoke(http, port, calls)
                report["smoke_events_on_queue"] = await broker.settled_count_and_purge(queue, 2)
                print(
                    f"{'phase':<16} {'loop':<6} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
                    f"{'max ms':>8} {'on queue':>8} {'=ok':>6} {'>wait':>6} {'cpu ms':>7}",
                    flush=True,
                )
                # Requests pre-built for a phase: enough for the fastest rate seen so far.
                expected_rate = max(cfg.rate, 1500.0)

                async def phase(
                    label: str, route: str, tag: int, drive: Drive, prebuilt: int
                ) -> dict[str, object]:
                    nonlocal expected_rate
                    source = RequestSource(calls.factory(port, route, tag), prebuilt)
                    confirms_before = await _confirms(http, port, cfg.answer_wait)
                    cpu = service.cpu_seconds()
                    result = await drive(port, source)
                    cpu = service.cpu_seconds() - cpu
                    on_queue = await broker.settled_count_and_purge(queue, result.accepted_total)
                    after = await _confirms(http, port, cfg.answer_wait)
                    confirms = (after[0] - confirms_before[0], after[1] - confirms_before[1])
                    summary = _summary(
                        label, result, source=source, on_queue=on_queue, cpu=cpu, confirms=confirms
                    )
                    summary["route"] = route
                    expected_rate = max(expected_rate, result.throughput)
                    _row(summary)
                    return summary

                span = cfg.warmup + cfg.duration
                d, w = cfg.duration, cfg.warmup
                paced = partial(
                    open_loop, rate=cfg.rate, connections=cfg.connections, duration=d, warmup=w
                )
                phases.append(
                    await phase("fixed rate", "incoming", 0x10, paced, int(cfg.rate * span) + 16)
                )
                for n, concurrency in enumerate(cfg.concurrency):
                    saturate = partial(closed_loop, concurrency=concurrency, duration=d, warmup=w)
                    budget = int(expected_rate * span * 1.3) + concurrency
                    label = f"load c{concurrency}"
                    phases.append(await phase(label, "incoming", 0x20 + n, saturate, budget))
                saturate = partial(
                    closed_loop, concurrency=cfg.status_concurrency, duration=d, warmup=w
                )
                budget = int(expected_rate * span * 1.3) + cfg.status_concurrency
                label = f"status c{cfg.status_concurrency}"
                phases.append(await phase(label, "status", 0x40, saturate, budget))
    finally:
        await broker.close([("queue", queue)])
    report["phases"] = phases
    report["verdict"] = _verdict(phases, cfg)
    report["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return report


def _verdict(phases: list[dict[str, object]], cfg: Settings) -> dict[str, object]:
    by_label = {str(p["label"]): p for p in phases}
    at_load = by_label[f"load c{max(cfg.concurrency)}"]
    fixed = by_label["fixed rate"]
    status = by_label[f"status c{cfg.status_concurrency}"]
    return {
        "answer_p99_ms_at_fixed_rate": fixed["p99_ms"],
        f"answer_p99_ms_at_load_c{max(cfg.concurrency)}": at_load["p99_ms"],
        "answers_per_s_at_load": at_load["requests_per_s"],
        "p99_target_ms": TARGET_P99_MS,
        "p99_target_met_at_load": float(str(at_load["p99_ms"])) < TARGET_P99_MS,
        "status_events_per_s": status["events_per_s"],
        "status_p99_ms": status["p99_ms"],
        "all_accepted_on_queue": all(bool(p["queue_matches_accepted"]) for p in phases),
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m benchmarks.voice_answer``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument(
        "--rate", type=float, default=200.0, help="calls/s of the fixed-rate (open-loop) phase"
    )
    parser.add_argument(
        "--concurrency", default="1,16,64", help="connections of the closed-loop answer phases"
    )
    parser.add_argument(
        "--status-concurrency", type=int, default=64, help="connections of the status phase"
    )
    parser.add_argument(
        "--connections", type=int, default=32, help="connection pool of the fixed-rate phase"
    )
    parser.add_argument("--dedup", default="memory://", help="memory:// or redis://...")
    parser.add_argument(
        "--answer-publish-wait",
        type=float,
        default=ANSWER_BUDGET_S,
        choices=BUDGET_BOUNDS,
        help="the connector's answer budget in seconds (default: the connector's default)",
    )
    parser.add_argument("--broker-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not is_local(args.broker_url):
        parser.error("the benchmark only talks to a local broker (127.0.0.1)")
    try:
        concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--concurrency takes comma-separated numbers, got {args.concurrency!r}")
    if not concurrency or min(concurrency) < 1 or args.status_concurrency < 1:
        parser.error("concurrencies must be >= 1")
    if args.duration <= 0 or args.warmup < 0 or args.rate <= 0 or args.connections < 1:
        parser.error("--duration, --rate and --connections must be positive")
    # Fixed rate, each closed loop and the status phase, one after the other.
    phases = len(concurrency) + 2
    if (args.warmup + args.duration) * phases > MAX_PHASES_SECONDS:
        parser.error(
            f"{phases} phases of --warmup + --duration must be at most {MAX_PHASES_SECONDS:.0f} s "
            "in all (the run stays under two minutes)"
        )
    cfg = Settings(
        duration=args.duration,
        warmup=args.warmup,
        rate=args.rate,
        concurrency=concurrency,
        status_concurrency=args.status_concurrency,
        connections=args.connections,
        dedup=args.dedup,
        answer_wait=args.answer_publish_wait,
        broker_url=args.broker_url,
        output=args.output,
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
