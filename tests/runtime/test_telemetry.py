"""Log lines: JSON, bound to trace ids, with secrets redacted and addresses masked."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from gateway.runtime.telemetry import (
    configure_logging,
    ensure_tracing,
    get_logger,
    inject_trace_headers,
    tracer,
)


@pytest.fixture
def lines(capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    """A reader of the JSON log lines written to the captured stderr.

    Tests call :func:`_configure` first: capsys installs its stream only once
    the test body runs, and the logger binds the stream at configure time.
    """

    def read() -> list[dict[str, Any]]:
        err = capsys.readouterr().err
        return [json.loads(line) for line in err.splitlines() if line.startswith("{")]

    yield read
    structlog.reset_defaults()


def _configure(level: str = "DEBUG") -> None:
    configure_logging(level, "json")


def test_secret_keys_are_redacted(lines: Any) -> None:
    _configure()
    log = get_logger("test.redact")
    log.info(
        "calling provider",
        authorization="Basic QUMxMjM6c2VjcmV0",
        auth_token="tok-123456",
        X_Twilio_Signature="x",
        password="hunter2",
        nested={"token": "tok-999", "ok": "visible"},
    )
    (line,) = lines()
    assert line["authorization"] == "***"
    assert line["auth_token"] == "***"
    assert line["password"] == "***"
    assert line["nested"] == {"token": "***", "ok": "visible"}
    text = json.dumps(line)
    for secret in ("QUMxMjM6c2VjcmV0", "tok-123456", "hunter2", "tok-999"):
        assert secret not in text


def test_phone_numbers_and_emails_are_masked_at_info(lines: Any) -> None:
    _configure()
    log = get_logger("test.mask")
    log.info(
        "message from +14155550100",
        to="+447700900123",
        reason="unparsable phone number +1 (415) 555-0199 for jane.doe@example.com",
        recipients=["+14155550111"],
        sid="SM0123456789",
        count=3,
    )
    (line,) = lines()
    assert line["event"] == "message from +1415*****00"
    assert line["to"] == "+4477******23"
    assert "+1415*****99" in line["reason"]
    assert "j***@example.com" in line["reason"]
    assert line["recipients"] == ["+1415*****11"]
    assert line["sid"] == "SM0123456789"  # ids are not phone numbers
    assert line["count"] == 3
    text = json.dumps(line)
    for raw in ("4155550100", "7700900123", "555-0199", "jane.doe", "4155550111"):
        assert raw not in text


def test_debug_keeps_addresses_but_not_secrets(lines: Any) -> None:
    _configure()
    get_logger("test.debug").debug("raw", to="+14155550100", token="tok-1")
    (line,) = lines()
    assert line["to"] == "+14155550100"
    assert line["token"] == "***"


def test_log_lines_carry_the_trace_id(lines: Any) -> None:
    _configure()
    ensure_tracing("test", otlp_endpoint=None, console=False)
    log = get_logger("test.trace")
    with tracer().start_as_current_span("work") as span:
        log.info("inside")
        ctx = span.get_span_context()
        headers: dict[str, Any] = {}
        inject_trace_headers(headers)
    log.info("outside")
    inside, outside = lines()
    assert inside["trace_id"] == format(ctx.trace_id, "032x")
    assert inside["span_id"] == format(ctx.span_id, "016x")
    assert inside["trace_id"] in headers["traceparent"]  # the id SREs search for
    assert "trace_id" not in outside
    assert inside["level"] == "info"
    assert inside["timestamp"].endswith("Z")


def test_level_filtering(lines: Any) -> None:
    _configure("WARNING")
    log = get_logger("test.level")
    log.info("hidden")
    log.warning("shown")
    assert [line["event"] for line in lines()] == ["shown"]


def test_exception_text_is_masked_too(lines: Any) -> None:
    _configure()
    log = get_logger("test.exc")
    try:
        raise ValueError("twilio rejected +14155550100 for jane@example.com")
    except ValueError:
        log.exception("send failed")
    (line,) = lines()
    assert "ValueError" in line["exception"]
    assert "+1415*****00" in line["exception"]
    assert "4155550100" not in line["exception"]
    assert "jane@" not in line["exception"]
