"""``channel-gateway run --workers N``: N processes on one port, stopped together."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CLI = [sys.executable, "-m", "gateway.cli"]
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"""
http: {{host: 127.0.0.1, port: {port}}}
broker: {{url: "memory://"}}
telemetry: {{log_level: INFO}}
connectors:
  sms.twilio:
    accounts:
      main:
        account_sid: AC{"b" * 32}
        auth_token: {{env: TEST_TWILIO_TOKEN}}
"""
    )
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "TEST_TWILIO_TOKEN": "a-real-looking-token-0123456789"}


def test_two_workers_share_the_port_and_drain_on_sigterm(tmp_path: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [*CLI, "--config", str(_config(tmp_path, port)), "run", "sms", "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=ROOT,
    )
    try:
        assert proc.stderr is not None
        started = 0
        deadline = time.monotonic() + 30
        while started < 2 and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            started += '"service started"' in line
        assert started == 2, "both workers bind the same port"
        for _ in range(5):  # fresh connections, spread over the workers by the kernel
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                assert json.loads(resp.read())["status"] == "ok"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert stderr.count('"service stopped"') == 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_workers_need_a_fixed_port(tmp_path: Path) -> None:
    out = subprocess.run(
        [*CLI, "--config", str(_config(tmp_path, 0)), "run", "sms", "--workers", "2"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=30,
    )
    assert out.returncode == 2
    assert "--workers > 1 needs a fixed http.port" in out.stderr
