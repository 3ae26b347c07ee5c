"""The gateway send benchmark refuses what would make it unbounded or leave loopback."""

from __future__ import annotations

import pytest

from benchmarks import gateway_send


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--broker-url", "amqp://guest:guest@10.0.0.5:5672/"],
            "--broker-url must be on 127.0.0.1",
        ),
        (
            ["--postgres-url", "postgresql+asyncpg://postgres@db.example.com/test"],
            "--postgres-url must be on 127.0.0.1",
        ),
    ],
)
def test_refuses_hosts_other_than_loopback(args: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        gateway_send.main(args)


@pytest.mark.parametrize(
    "args", [["--duration", "0"], ["--duration", "301"], ["--concurrency", "0"]]
)
def test_refuses_unbounded_or_empty_runs(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        gateway_send.main(args)
    assert exc.value.code == 2
    assert "must be" in capsys.readouterr().err


def test_percentiles_in_milliseconds() -> None:
    samples = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert gateway_send._quantile(samples, 50) == pytest.approx(50.5)
    assert gateway_send._quantile(samples, 99) == pytest.approx(99.01)
    assert gateway_send._quantile([0.004], 99) == pytest.approx(4.0)
    assert gateway_send._quantile([], 50) == 0.0
