"""The SMS webhook benchmark: its webhooks are signed as Twilio signs them, its verdict reads
the figures it names, its idle probe measures real work, and it refuses runs off loopback."""

from __future__ import annotations

from urllib.parse import parse_qsl

import pytest
from twilio.request_validator import RequestValidator  # type: ignore[import-untyped]

from benchmarks import sms_webhooks
from benchmarks.harness import idle_slowdown
from tests.conftest import Refuses

WEBHOOKS = sms_webhooks.Webhooks(
    token="e" * 32, account_key="bench1", account_sid="AC" + "2" * 32, run_id="0badcafe"
)


def test_requests_carry_twilio_signatures_and_one_new_message_each() -> None:
    make = WEBHOOKS.factory(8123, tag=0x41)
    sids = set()
    for i in (0, 1, 65535):
        head, body = make(i).split(b"\r\n\r\n", 1)
        request_line, *lines = head.decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines)
        path = "/webhooks/sms/twilio/bench1/inbound"
        assert request_line == f"POST {path} HTTP/1.1"
        assert int(headers["Content-Length"]) == len(body)
        params = dict(parse_qsl(body.decode(), keep_blank_values=True))
        url = f"http://127.0.0.1:8123{path}"
        # Twilio's own validator is the oracle for the signature.
        assert RequestValidator(WEBHOOKS.token).validate(url, params, headers["X-Twilio-Signature"])
        assert not RequestValidator("0" * 32).validate(url, params, headers["X-Twilio-Signature"])
        assert params["MessageSid"] == params["SmsSid"]
        assert len(params["MessageSid"]) == 34
        sids.add(params["MessageSid"])
        assert params["Body"] == f"Hi! Where is my order #{i}? Thanks"
    assert len(sids) == 3


def test_idle_probe_times_both_kinds_of_run() -> None:
    result = idle_slowdown(gap=0.0005, per_block=20, blocks=1)
    assert result["gap_ms"] == 0.5
    assert result["back_to_back_us"] > 0
    assert result["after_gap_us"] > 0
    expected = result["after_gap_us"] / result["back_to_back_us"]
    assert result["slowdown"] == pytest.approx(expected, abs=0.02)


def _phase(rate: float, p99: float, cores: float, accepted: int = 10) -> dict[str, object]:
    return {
        "requests_per_s": rate,
        "p99_ms": p99,
        "server_cores_busy": cores,
        "accepted_total": accepted,
        "on_queue": accepted,
        "queue_matches_accepted": True,
    }


def _systems(service_p99: float) -> list[dict[str, object]]:
    return [
        {
            "label": "bare bound",
            "saturation": _phase(1000.0, 90.0, 0.97),
            "half_rate": _phase(500.0, 12.0, 0.8),
        },
        {
            "label": "service x1",
            "workers": 1,
            "rounds": [{"share": 1.1}, {"share": 0.9}, {"share": 1.2}],
            "saturation": _phase(1100.0, 80.0, 0.98),
            "half_rate": _phase(550.0, service_p99, 0.95),
            "at_bare_half_rate": _phase(500.0, 20.0, 0.9),
        },
        {
            "label": "service x2",
            "workers": 2,
            "saturation": _phase(1650.0, 70.0, 1.6),
            "half_rate": _phase(825.0, 30.0, 1.5),
        },
    ]


@pytest.mark.parametrize(("service_p99", "met"), [(24.9, True), (25.0, False), (70.2, False)])
def test_verdict_reads_the_median_share_the_p99_and_what_stands_behind_it(
    service_p99: float, met: bool
) -> None:
    verdict = sms_webhooks._verdict(_systems(service_p99), {"slowdown": 1.9})
    assert verdict["service_share_of_bare"] == 1.1
    assert verdict["throughput_target_met"] is True
    assert verdict["share_by_round"] == [1.1, 0.9, 1.2]
    assert verdict["service_p99_ms_at_half_rate"] == service_p99
    assert verdict["p99_target_met"] is met
    assert verdict["service_cores_busy_at_half_rate"] == 0.95
    assert verdict["idle_slowdown"] == 1.9
    assert verdict["bare_p99_ms_at_half_rate"] == 12.0
    assert verdict["service_p99_ms_at_bare_half_rate"] == 20.0
    assert verdict["scaling_x2"] == 1.5
    assert verdict["all_accepted_on_queue"] is True


def test_verdict_fails_when_a_phase_lost_a_webhook() -> None:
    systems = _systems(10.0)
    half = systems[2]["half_rate"]
    assert isinstance(half, dict)
    half["queue_matches_accepted"] = False
    assert sms_webhooks._verdict(systems, {"slowdown": 1.0})["all_accepted_on_queue"] is False


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--broker-url", "amqp://guest:guest@10.0.0.5:5672/"], "local broker"),
        (["--workers", "1,x"], "comma-separated"),
        (["--workers", "0"], "at least one count"),
        (["--duration", "0"], "must be positive"),
        (["--rounds", "0"], "at least 1"),
    ],
)
def test_refuses_runs_off_loopback_or_empty(
    args: list[str], message: str, refuses: Refuses
) -> None:
    refuses(sms_webhooks, args, message)
