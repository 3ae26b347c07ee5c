"""The voice answer benchmark: its webhooks are signed as Twilio signs them, and it refuses
runs that would leave loopback or not end within two minutes."""

from __future__ import annotations

from urllib.parse import parse_qsl

import pytest
from twilio.request_validator import RequestValidator  # type: ignore[import-untyped]

from benchmarks import voice_answer
from connectors.voice.flow import VoiceFlows
from tests.conftest import Refuses

CALLS = voice_answer.CallWebhooks(
    token="f" * 32, account_key="bench1", account_sid="AC" + "1" * 32, run_id="0badcafe"
)


def _split(request: bytes) -> tuple[str, dict[str, str], dict[str, str]]:
    head, body = request.split(b"\r\n\r\n", 1)
    request_line, *header_lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    assert int(headers["Content-Length"]) == len(body)
    return request_line, headers, dict(parse_qsl(body.decode(), keep_blank_values=True))


@pytest.mark.parametrize("route", ["incoming", "status"])
def test_requests_carry_twilio_signatures_and_one_new_call_each(route: str) -> None:
    make = CALLS.factory(8123, route, tag=0x20)
    seen = set()
    for i in (0, 1, 4095):
        request_line, headers, params = _split(make(i))
        path = f"/webhooks/voice/twilio/bench1/{route}"
        assert request_line == f"POST {path} HTTP/1.1"
        url = f"http://127.0.0.1:8123{path}"
        # Twilio's own validator is the oracle for the signature.
        assert RequestValidator(CALLS.token).validate(url, params, headers["X-Twilio-Signature"])
        assert not RequestValidator("0" * 32).validate(url, params, headers["X-Twilio-Signature"])
        sid = params["CallSid"]
        assert len(sid) == 34
        assert sid.startswith("CA")
        int(sid[2:], 16)
        seen.add(sid)
        assert params["AccountSid"] == CALLS.account_sid
        assert params["To"] == voice_answer.OUR_NUMBER
    assert len(seen) == 3
    expected = "ringing" if route == "incoming" else "completed"
    assert params["CallStatus"] == expected


def test_the_benchmark_flow_answers_its_number() -> None:
    flows = VoiceFlows.model_validate(voice_answer.CALL_FLOWS)
    assert flows.flow_for(voice_answer.OUR_NUMBER) == "support"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--broker-url", "amqp://guest:guest@10.0.0.5:5672/"], "local broker"),
        (["--duration", "30"], "at most 90 s"),
        (["--concurrency", "1,2,4,8,16,32", "--duration", "20"], "at most 90 s"),
        (["--concurrency", "0"], "must be >= 1"),
        (["--rate", "0"], "must be positive"),
        (["--answer-publish-wait", "0.03"], "invalid choice"),
    ],
)
def test_refuses_runs_off_loopback_unbounded_or_empty(
    args: list[str], message: str, refuses: Refuses
) -> None:
    refuses(voice_answer, args, message)
