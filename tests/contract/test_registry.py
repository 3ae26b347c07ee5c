"""Connector lookup through entry points."""

from __future__ import annotations

from importlib.metadata import EntryPoint
from typing import Any

import pytest

from gateway.contract import registry
from gateway.contract.connector import ConnectorSpec
from gateway.contract.errors import ConnectorNotFoundError


def test_twilio_is_installed() -> None:
    assert "sms.twilio" in registry.available()
    assert "sms.twilio" in registry.for_channel("sms")
    assert registry.for_channel("no-such-channel") == []
    spec = registry.load("sms.twilio")
    assert isinstance(spec, ConnectorSpec)
    assert spec.name == "sms.twilio"


def test_misspelled_name_gets_a_hint() -> None:
    with pytest.raises(ConnectorNotFoundError) as info:
        registry.load("sms.twillio")
    message = str(info.value)
    assert "no connector named 'sms.twillio'" in message
    assert "Did you mean 'sms.twilio'?" in message
    assert "misspelled, or its package is not installed" in message
    assert "Installed: " in message
    assert "sms.twilio" in message


def test_unknown_name_without_a_close_match_lists_installed() -> None:
    with pytest.raises(ConnectorNotFoundError) as info:
        registry.load("pigeon.carrier")
    assert "Did you mean" not in str(info.value)
    assert "sms.twilio" in str(info.value)


def _fake_entry_points(*eps: EntryPoint) -> Any:
    def entry_points(*, group: str) -> list[EntryPoint]:
        return [ep for ep in eps if ep.group == group]

    return entry_points


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("connectors.no_such_module:SPEC", "is installed but failed to load"),
        ("connectors.sms.twilio:NO_SUCH_ATTRIBUTE", "is installed but failed to load"),
        ("connectors.sms.twilio:TwilioSettings", "is not a ConnectorSpec"),
        ("connectors.sms.twilio:SPEC", "names connector 'sms.twilio'"),
    ],
)
def test_broken_entry_point_is_wrapped(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    ep = EntryPoint(name="sms.broken", value=value, group=registry.GROUP)
    monkeypatch.setattr(registry, "entry_points", _fake_entry_points(ep))
    with pytest.raises(ConnectorNotFoundError, match=message) as info:
        registry.load("sms.broken")
    assert "sms.broken" in str(info.value)


def test_entry_point_whose_import_raises_is_wrapped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    (tmp_path / "cg_broken_connector.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = EntryPoint(name="sms.boom", value="cg_broken_connector:SPEC", group=registry.GROUP)
    monkeypatch.setattr(registry, "entry_points", _fake_entry_points(ep))
    with pytest.raises(ConnectorNotFoundError, match="failed to load") as info:
        registry.load("sms.boom")
    assert "boom at import" in str(info.value)
