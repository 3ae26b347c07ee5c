"""``run gateway``, ``up``, ``send`` and ``trace`` as a user runs them: real processes."""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.testing.fake_twilio import FakeTwilio
from tests.server.conftest import ACCOUNT_SID

CLI = [sys.executable, "-m", "gateway.cli"]
ROOT = Path(__file__).resolve().parent.parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(tmp_path: Path, grpc_port: int, *, fake_url: str = "http://127.0.0.1:9") -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"""
http: {{host: 127.0.0.1, port: {_free_port()}}}
broker: {{url: "memory://"}}
telemetry: {{log_level: WARNING}}
gateway:
  host: 127.0.0.1
  port: {grpc_port}
  ledger_url: "sqlite+aiosqlite:///{tmp_path / "ledger.db"}"
  shutdown_grace: 2
connectors:
  sms.twilio:
    api_base_url: "{fake_url}"
    accounts:
      main:
        account_sid: {ACCOUNT_SID}
        auth_token: {{env: TEST_TWILIO_TOKEN}}
        numbers: ["+14155550100"]
"""
    )
    return path


def _wait_serving(proc: subprocess.Popen[str], port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited early: {proc.communicate()[1]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError("gateway did not start listening")


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def _cli(config: Path, *args: str) -> Result:
    """A client command (send, trace) run in this process against the real server process."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["--config", str(config), *args])
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture
def token() -> str:
    return secrets.token_hex(16)


def _start(config: Path, port: int, *command: str, token: str) -> Iterator[subprocess.Popen[str]]:
    env = {**os.environ, "TEST_TWILIO_TOKEN": token}
    proc = subprocess.Popen(
        [*CLI, "--config", str(config), *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    try:
        _wait_serving(proc, port)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_run_gateway_send_and_trace(tmp_path: Path, token: str) -> None:
    port = _free_port()
    config = _config(tmp_path, port)
    for proc in _start(config, port, "run", "gateway", token=token):
        sent = _cli(
            config, "send", "+44 7700 900123", "-m", "hello", "--idempotency-key", "k1", "--json"
        )
        assert sent.returncode == 0, sent.stderr
        reply = json.loads(sent.stdout)
        assert reply["created"] is True
        assert reply["state"] == "DELIVERY_STATE_ACCEPTED"
        again = _cli(config, "send", "+447700900123", "-m", "hello", "--idempotency-key", "k1")
        assert again.returncode == 0, again.stderr
        assert f"already accepted (same idempotency key): {reply['message_id']}" in again.stdout

        traced = _cli(config, "trace", reply["message_id"], "--json")
        assert traced.returncode == 0, traced.stderr
        message = json.loads(traced.stdout)
        assert message["state"] == "DELIVERY_STATE_ACCEPTED"
        assert message["recipient"] == "+447700900123"
        assert message["timeline"][0]["trace_id"] == reply["trace_id"]

        table = _cli(config, "trace", reply["message_id"])
        assert table.returncode == 0, table.stderr
        assert "\033[" not in table.stdout  # no colours when not a terminal
        assert "TRACE ID" in table.stdout
        assert "ACCEPTED" in table.stdout
        assert reply["trace_id"] in table.stdout

        bad = _cli(config, "send", "+447700900123", "-m", "x" * 2000)
        assert bad.returncode == 1
        assert "INVALID_ARGUMENT" in bad.stderr
        assert "message.text.body" in bad.stderr
        missing = _cli(config, "trace", "no-such-message")
        assert missing.returncode == 1
        assert "NOT_FOUND" in missing.stderr

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


async def test_up_runs_gateway_and_connectors_end_to_end(tmp_path: Path, token: str) -> None:
    """``up`` on the in-memory bus: send, fake Twilio's callbacks, trace shows DELIVERED."""
    import asyncio

    async with FakeTwilio(auth_token=token, callback_delay=0.05) as fake:
        port = _free_port()
        config = _config(tmp_path, port, fake_url=fake.url)
        env = {**os.environ, "TEST_TWILIO_TOKEN": token}

        async def cli(*args: str) -> tuple[int, str, str]:
            # Client commands in a worker thread (each runs its own event loop).
            result = await asyncio.to_thread(_cli, config, *args)
            return result.returncode, result.stdout, result.stderr

        up = await asyncio.create_subprocess_exec(
            *CLI,
            "--config",
            str(config),
            "up",
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            for _ in range(200):
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.1)
                    continue
                writer.close()
                break
            code, out, err = await cli("send", "+447700900123", "-m", "hi", "--json")
            assert code == 0, err
            message_id = json.loads(out)["message_id"]
            for _ in range(100):
                code, out, err = await cli("trace", message_id, "--json")
                assert code == 0, err
                if json.loads(out)["state"] == "DELIVERY_STATE_DELIVERED":
                    break
                await asyncio.sleep(0.1)
            states = [e["state"] for e in json.loads(out)["timeline"]]
            assert states == [
                "DELIVERY_STATE_ACCEPTED",
                "DELIVERY_STATE_QUEUED",
                "DELIVERY_STATE_SENT",
                "DELIVERY_STATE_DELIVERED",
            ]
            assert len(fake.calls) == 1
        finally:
            up.send_signal(signal.SIGTERM)
            await asyncio.wait_for(up.wait(), 20)
        assert up.returncode == 0
