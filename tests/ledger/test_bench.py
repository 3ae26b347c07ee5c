"""The ledger benchmark runs end to end (tiny sizes) and leaves a consistent ledger."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.ledger import Ledger
from gateway.ledger.bench import main, run


async def test_bench_measures_and_applies_everything(ledger: Ledger) -> None:
    figures = await run(ledger, messages=20, workers=3, batch=7)
    assert figures["accept"]["per_s_concurrent"] > 0
    assert figures["status"]["per_s_group_commit"] > 0
    assert figures["get"]["p50_ms"] <= figures["get"]["p99_ms"]
    page = await ledger.list(page_size=100)
    states = {r.message_id: r.state for r in page.messages}
    assert len(states) == 40
    assert {states[f"con-{i}"] for i in range(20)} == {DeliveryState.DELIVERY_STATE_READ}
    assert {states[f"seq-{i}"] for i in range(20)} == {DeliveryState.DELIVERY_STATE_SENT}


def test_bench_command_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert main(["--url", "sqlite", "--messages", "10", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["backend"] == "sqlite"
    assert figures["messages"] == 10
