"""``channel-gateway demo`` shows Vonage traffic next to Twilio's, in and out (via the gateway)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.test_cli import _trace_rows

ROOT = Path(__file__).resolve().parents[4]


def test_demo_shows_signed_vonage_webhooks_as_normalized_events() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "--broker-url", "memory://"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    received = [line for line in lines if "message.received.sms.vonage" in line]
    assert len(received) == 2
    # Vonage sends numbers without "+": the events carry E.164.
    assert all("+447700900456 -> +447700900000" in line for line in received)
    assert any("Vonage SMS API inbound SMS" in line and "HTTP 204" in line for line in lines)
    assert any("Vonage Messages API inbound SMS" in line and "HTTP 200" in line for line in lines)
    assert any("forged Vonage webhook" in line and "HTTP 401" in line for line in lines)
    statuses = [line for line in lines if "message.status.sms.vonage" in line]
    assert sorted(s.split()[1] for s in statuses) == ["ACCEPTED", "DELIVERED", "SENT"]
    # The send went through the gateway: its ledger timeline has Vonage's statuses.
    sent = next(line for line in lines if "SendMessage via sms.vonage" in line)
    message_id = sent.split("accepted ")[1].split(",")[0]
    assert all(message_id in s for s in statuses)
    rows = _trace_rows(out.stdout, message_id)
    assert [(r[2], r[3], r[6]) for r in rows] == [
        ("ACCEPTED", "-", "sms.vonage"),
        ("SENT", "submitted", "sms.vonage"),
        ("DELIVERED", "delivered", "sms.vonage"),
    ]
    assert "fake Vonage got 1 send call(s)" in out.stdout
