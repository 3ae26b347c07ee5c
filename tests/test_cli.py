"""The console script as a user runs it: real processes, real signals."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

CLI = [sys.executable, "-m", "gateway.cli"]
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(tmp_path: Path, port: int, broker: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"""
http: {{host: 127.0.0.1, port: {port}}}
broker: {{url: "{broker}"}}
telemetry: {{log_level: INFO}}
connectors:
  sms.twilio:
    accounts:
      main:
        account_sid: AC{"a" * 32}
        auth_token: {{env: TEST_TWILIO_TOKEN}}
        numbers: ["+14155550100"]
"""
    )
    return path


def test_connectors_lists_installed_manifests() -> None:
    out = subprocess.run([*CLI, "connectors"], capture_output=True, text=True, check=True, cwd=ROOT)
    listed = {item["name"]: item for item in json.loads(out.stdout)}
    assert "sms.twilio" in listed
    assert listed["sms.twilio"]["manifest"]["channel"] == "sms"
    assert "DELIVERY_STATE_DELIVERED" in listed["sms.twilio"]["manifest"]["deliveryStates"]


def test_run_refuses_a_missing_secret_with_a_clear_message(tmp_path: Path) -> None:
    config = _config(tmp_path, _free_port(), "memory://")
    env = {k: v for k, v in os.environ.items() if k != "TEST_TWILIO_TOKEN"}
    out = subprocess.run(
        [*CLI, "--config", str(config), "run", "sms"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert "TEST_TWILIO_TOKEN is not set" in out.stderr
    assert "connectors.sms.twilio" in out.stderr


def test_run_refuses_an_example_secret(tmp_path: Path) -> None:
    config = _config(tmp_path, _free_port(), "memory://")
    env = {**os.environ, "TEST_TWILIO_TOKEN": "changeme"}
    out = subprocess.run(
        [*CLI, "--config", str(config), "run", "sms"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert "example value" in out.stderr


def test_misspelled_connector_is_named(tmp_path: Path) -> None:
    config = _config(tmp_path, _free_port(), "memory://")
    out = subprocess.run(
        [*CLI, "--config", str(config), "run", "sms.twillio"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert "Did you mean 'sms.twilio'" in out.stderr


@pytest.mark.rabbitmq
def test_run_serves_health_and_stops_gracefully_on_sigterm(tmp_path: Path) -> None:
    port = _free_port()
    config = _config(tmp_path, port, "amqp://guest:guest@localhost:5672/")
    env = {**os.environ, "TEST_TWILIO_TOKEN": "a-real-looking-token-0123456789"}
    proc = subprocess.Popen(
        [*CLI, "--config", str(config), "run", "sms"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        import urllib.request

        deadline = time.monotonic() + 20
        body = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
                    body = json.loads(resp.read())
                    break
            except OSError:
                time.sleep(0.1)
        assert body == {"status": "ready", "checks": {"broker": True}}
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert "service stopped" in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _trace_rows(stdout: str, message_id: str) -> list[list[str]]:
    """The timeline rows the demo printed for ``message_id`` (as ``trace`` renders them)."""
    lines = stdout.splitlines()
    start = lines.index(
        next(line for line in lines if f"channel-gateway trace {message_id}" in line)
    )
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("==>"):
            break
        cells = line.split()
        # date, time, state, provider status, reason, attempt, channel, trace id
        if len(cells) == 8 and cells[0][:2] == "20":
            rows.append(cells)
    return rows


def _assert_whole_demo(stdout: str) -> None:
    """What every demo run shows, whichever bus it runs on."""
    lines = stdout.splitlines()

    def posted(label: str) -> str:
        return next(line for line in lines if line.startswith(f"==> POST {label}"))

    # Inbound: SMS (Twilio, Vonage), a WhatsApp batch, a Telegram update, forged ones refused.
    assert stdout.count("message.received.sms.twilio") == 2
    assert "HTTP 200" in posted("WhatsApp Cloud API batch: 2 messages + 1 status")
    assert "HTTP 401" in posted("forged WhatsApp webhook")
    assert "HTTP 200" in posted("Telegram update")
    assert "HTTP 403" in posted("forged Telegram update")
    whatsapp = [line for line in lines if "message.received.whatsapp.meta" in line]
    assert len(whatsapp) == 2
    assert all("+16505551234 -> +15550783881" in line for line in whatsapp)
    assert [line.split()[1] for line in lines if "message.status.whatsapp.meta" in line] == ["READ"]
    telegram = [line for line in lines if "message.received.telegram.bot" in line]
    assert len(telegram) == 1
    assert '"/start order 3456"' in telegram[0]
    # A phone call: answered with the demo flow's TwiML menu, the caller's key press posted
    # to the Gather action from that TwiML, the status callback; one CallEvent each.
    assert "HTTP 200" in posted("Twilio incoming call")
    assert "HTTP 200" in posted("the caller pressed 1")
    assert "HTTP 204" in posted("Twilio call status callback")
    assert '<Gather input="dtmf" action="http://127.0.0.1:' in stdout
    assert "<Enqueue>agents</Enqueue>" in stdout  # the step the menu routes "1" to
    calls = {line.split()[0]: line for line in lines if line.startswith("    call.")}
    assert set(calls) == {
        "call.ringing.voice.twilio",
        "call.input.voice.twilio",
        "call.completed.voice.twilio",
    }
    assert len({line.split("call_id=")[1].split()[0] for line in calls.values()}) == 1
    assert "+447700900123 -> +14155550100" in calls["call.ringing.voice.twilio"]
    assert "RINGING (ringing)" in calls["call.ringing.voice.twilio"]
    assert 'step=support/welcome input="1"' in calls["call.input.voice.twilio"]
    assert "COMPLETED (completed)" in calls["call.completed.voice.twilio"]
    assert "duration=42s" in calls["call.completed.voice.twilio"]
    # Outbound through the gateway's gRPC API, with an idempotent retry.
    sent = next(line for line in lines if "SendMessage via sms.twilio" in line)
    message_id = sent.split("accepted ")[1].split(",")[0]
    again = next(line for line in lines if "SendMessage again with the same key" in line)
    assert f"same message id {message_id}, created=False" in again
    assert "fake Twilio got 1 create-message call(s)" in stdout
    for state in ("QUEUED", "SENT", "DELIVERED"):
        assert f"{state} ({state.lower()}) provider_id=" in stdout
    # The ledger's timeline, as ``channel-gateway trace`` prints it.
    rows = _trace_rows(stdout, message_id)
    assert [(r[2], r[3]) for r in rows] == [
        ("ACCEPTED", "-"),
        ("QUEUED", "queued"),
        ("SENT", "sent"),
        ("DELIVERED", "delivered"),
    ]
    assert all(r[6] == "sms.twilio" for r in rows)
    assert len({r[7] for r in rows}) == 1  # every entry on the send's trace
    assert "state     DELIVERED" in stdout


def test_demo_runs_end_to_end_on_the_in_memory_bus() -> None:
    out = subprocess.run(
        [*CLI, "demo", "--broker-url", "memory://"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "IN-MEMORY bus" in out.stdout
    assert "HTTP 401" in out.stdout
    _assert_whole_demo(out.stdout)


def _rabbitmqctl(*args: str) -> None:
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    result = subprocess.run([ctl, "-q", *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"rabbitmqctl {' '.join(args)}: {result.stderr}"


@pytest.mark.rabbitmq
def test_demo_runs_end_to_end_on_rabbitmq(rabbitmq_url: str, unique: str) -> None:
    # A throw-away vhost: the demo's connectors and gateway consume the standard
    # command and status queues, which other services or tests on the shared
    # broker would otherwise compete for.
    vhost = f"cg-demo-{unique}"
    parts = urlsplit(rabbitmq_url)
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, parts.username or "guest", ".*", ".*", ".*")
        url = urlunsplit(parts._replace(path="/" + vhost))
        out = subprocess.run(
            [*CLI, "demo", "--broker-url", url],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    finally:
        _rabbitmqctl("delete_vhost", vhost)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "in-memory" not in out.stdout.lower()
    assert f"on RabbitMQ {parts.hostname}:{parts.port}/{vhost}:" in out.stdout
    _assert_whole_demo(out.stdout)


# -- call: CallCommands through the broker -------------------------------------------------------


@pytest.fixture
def call_vhost(rabbitmq_url: str, unique: str) -> Iterator[str]:
    """URL of a throw-away vhost (the standard command and event names inside)."""
    vhost = f"cg-call-{unique}"
    parts = urlsplit(rabbitmq_url)
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, parts.username or "guest", ".*", ".*", ".*")
        yield urlunsplit(parts._replace(path="/" + vhost))
    finally:
        _rabbitmqctl("delete_vhost", vhost)


async def _cli(*args: str) -> tuple[int, str, str]:
    """Run the console script without blocking the event loop the service runs on."""
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


@pytest.mark.rabbitmq
async def test_call_commands_print_their_outcome_and_exit_by_it(
    call_vhost: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.contract.errors import PermanentError
    from gateway.runtime.service import Service
    from tests.runtime import call_helpers as c

    connector = c.FakeVoice(
        [
            c.accepted("CA-cli", "queued"),
            PermanentError("the call has ended", code="call_not_in_progress"),
        ]
    )
    c.install(monkeypatch, [c.spec(connector)])
    svc = Service(c.runtime(call_vhost), [c.NAME])
    await svc.start()
    try:
        common = ("--provider", "fake", "--broker-url", call_vhost, "--timeout", "20")
        code, out, err = await _cli(
            "call", "place", "+14155550199", "--say", "Your order shipped", *common,
            "--from", "+14155550100", "--meta", "ticket=T-9", "--command-id", "cli-1",
        )  # fmt: skip
        assert code == 0, err
        assert (
            out.strip() == "ACCEPTED place call CA-cli (queued) via voice.fake/main command cli-1"
        )
        assert "published place command cli-1 as call.voice.fake" in err
        code, out, err = await _cli("call", "hang-up", "CA-cli", *common, "--json")
        assert code == 1, err
        printed = json.loads(out)
        assert printed["routing_key"] == "call.command.voice.fake"
        result = printed["event"]["call_command"]
        assert result["outcome"] == "CALL_COMMAND_OUTCOME_FAILED"
        assert result["reason_code"] == "call_not_in_progress"
        assert result["permanent"] is True
        assert result["call_id"] == "CA-cli"
    finally:
        await svc.stop()
    (_, placed), (_, hung_up) = connector.calls
    assert placed.command_id == "cli-1"
    assert getattr(placed.place, "from") == "+14155550100"
    assert placed.place.say == "Your order shipped"
    assert placed.metadata["ticket"] == "T-9"
    assert placed.HasField("expires_at")  # not executed after the CLI gave up waiting
    assert hung_up.hang_up.call_id == "CA-cli"


@pytest.mark.rabbitmq
async def test_call_without_an_outcome_exits_3(call_vhost: str) -> None:
    from gateway.runtime.amqp_bus import AmqpBus
    from gateway.runtime.outbound import command_topology
    from tests.runtime import call_helpers as c

    common = ("--provider", "fake", "--broker-url", call_vhost)
    # Nothing bound to call.voice.fake: the broker returns the command at once.
    code, _, err = await _cli("call", "hang-up", "CA-1", *common)
    assert code == 3
    assert "nothing consumes call.voice.fake on channels.commands" in err
    # The queue exists but no service consumes it: the CLI gives up after --timeout.
    bus = AmqpBus(call_vhost)
    await bus.connect()
    try:
        await bus.declare(command_topology(c.spec(), 5))
        code, _, err = await _cli("call", "hang-up", "CA-1", *common, "--timeout", "1")
    finally:
        await bus.close()
    assert code == 3
    assert "no outcome for" in err
    assert "within 1s (it expires at" in err


def test_call_speak_needs_say_or_play_url() -> None:
    out = subprocess.run(
        [*CLI, "call", "speak", "CA-1", "--provider", "twilio"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert "one of the arguments --say --play-url is required" in out.stderr
