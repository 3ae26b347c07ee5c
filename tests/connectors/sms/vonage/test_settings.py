"""Vonage config: secrets only by reference, complete credentials, clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from connectors.sms.vonage import SPEC
from gateway.contract import ConfigError
from gateway.runtime.config import RuntimeSettings
from gateway.runtime.service import Service

ENV = {"SIG": "0123456789abcdef0123456789abcdef", "API": "fedcba9876543210"}


def account(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "api_key": "abcd1234",
        "api_secret": {"env": "API"},
        "signature_secret": {"env": "SIG"},
        "numbers": ["+447700900000"],
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def validate(section: dict[str, Any]) -> Any:
    settings = RuntimeSettings.model_validate({"connectors": {"sms.vonage": section}})
    return settings.connector_settings(SPEC, ENV)


def test_valid_settings_with_several_accounts() -> None:
    settings = validate({"accounts": {"a": account(), "b": account(api_key="ef567890")}})
    assert settings.accounts["a"].signature_secret.get_secret_value() == ENV["SIG"]
    assert settings.accounts["a"].signature_method == "md5hash"
    assert settings.api_base_url == "https://api.nexmo.com"
    assert "0123456789abcdef" not in repr(settings)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"accounts": {"a": account(signature_secret="a-literal-secret")}}, "never the secret"),
        ({"accounts": {"a": account(api_secret={"env": "MISSING"})}}, "MISSING is not set"),
        ({"accounts": {"a": account(signature_secret=None)}}, "signature_secret"),
        ({"accounts": {"a": account(api_secret=None)}}, "api_secret, or application_id"),
        ({"accounts": {"a": account(application_id="app")}}, "go together"),
        ({"accounts": {"a": account(numbers=["12"])}}, "accounts.a.numbers"),
        ({"accounts": {"a": account(signature_method="md4")}}, "signature_method"),
        ({"accounts": {"a": account(api_key="")}}, "api_key"),
        ({"accounts": {}}, "accounts"),
        ({"accounts": {"a": account()}, "default_account": "b"}, "default_account"),
        ({"accounts": {"a": account()}, "signature_max_age": 0}, "signature_max_age"),
    ],
)
def test_invalid_settings_are_refused_with_the_field_named(
    section: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(section)


async def test_an_unusable_private_key_stops_start_up(tmp_path: Path) -> None:
    key = tmp_path / "private.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    settings = RuntimeSettings.model_validate(
        {
            "http": {"host": "127.0.0.1", "port": 0},
            "broker": {"url": "memory://"},
            "connectors": {
                "sms.vonage": {
                    "accounts": {
                        "a": account(
                            api_secret=None,
                            application_id="aaaaaaaa-bbbb-cccc-dddd-0123456789ab",
                            private_key={"file": str(key)},
                        )
                    }
                }
            },
        }
    )
    service = Service(settings, ["sms.vonage"], environ=ENV)
    try:
        with pytest.raises(ConfigError, match="private key"):
            await service.start()
    finally:
        await service.stop()
