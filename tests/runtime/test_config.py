"""Settings: one YAML file plus CHANNEL_GATEWAY__A__B environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.contract import registry
from gateway.contract.errors import ConfigError
from gateway.runtime.config import RuntimeSettings, load_config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    settings = load_config(environ={})
    assert settings == RuntimeSettings()
    assert settings.broker.url.startswith("amqp://")
    assert settings.dedup.url == "memory://"


def test_yaml_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
http: {port: 9001, max_body_bytes: 2048}
broker: {url: "amqp://u:p@rabbit:5672/", prefetch: 4}
subscriptions:
  - {queue: crm.inbound, bindings: ["message.received.#"]}
connectors:
  sms.twilio: {enabled: false}
""",
    )
    settings = load_config(path, environ={})
    assert settings.http.port == 9001
    assert settings.http.max_body_bytes == 2048
    assert settings.broker.prefetch == 4
    assert settings.subscriptions[0].bindings == ["message.received.#"]
    assert not settings.connector_enabled("sms.twilio")
    assert not settings.connector_enabled("sms.vonage")


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = _write(tmp_path, "http: {port: 9002}\n")
    assert load_config(environ={"CHANNEL_GATEWAY_CONFIG": str(path)}).http.port == 9002


def test_env_overrides_file_values_with_yaml_scalars(tmp_path: Path) -> None:
    path = _write(tmp_path, "broker: {url: 'amqp://file/', prefetch: 4}\n")
    settings = load_config(
        path,
        environ={
            "CHANNEL_GATEWAY__BROKER__URL": "amqp://guest:guest@env-host:5672/",
            "CHANNEL_GATEWAY__BROKER__PREFETCH": "32",
            "CHANNEL_GATEWAY__HTTP__PUBLIC_BASE_URL": "https://hooks.example.com/sms",
            "CHANNEL_GATEWAY__SEND__MAX_BACKOFF": "1.5",
            "OTHER__BROKER__URL": "ignored",
        },
    )
    assert settings.broker.url == "amqp://guest:guest@env-host:5672/"
    assert settings.broker.prefetch == 32
    assert settings.http.public_base_url == "https://hooks.example.com/sms"
    assert settings.send.max_backoff == 1.5


def test_env_reaches_connector_sections() -> None:
    settings = load_config(
        environ={"CHANNEL_GATEWAY__CONNECTORS__SMS.TWILIO__DEFAULT_ACCOUNT": "main"}
    )
    assert settings.connectors == {"sms.twilio": {"default_account": "main"}}


@pytest.mark.parametrize(
    ("text", "environ", "named"),
    [
        ("broker: {prefetch: 0}\n", {}, "broker.prefetch"),
        ("broker: {urll: x}\n", {}, "broker.urll"),
        ("http: {port: eighty}\n", {}, "http.port"),
        ("subscriptions: [{queue: q, bindings: []}]\n", {}, "subscriptions.0.bindings"),
        ("{}\n", {"CHANNEL_GATEWAY__SEND__MAX_ATTEMPTS": "0"}, "send.max_attempts"),
        ("{}\n", {"CHANNEL_GATEWAY__TELEMETRY__LOG_FORMAT": "xml"}, "telemetry.log_format"),
    ],
)
def test_errors_name_the_bad_key(
    tmp_path: Path, text: str, environ: dict[str, str], named: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ)
    assert named in str(info.value)
    assert str(path) in str(info.value)


def test_env_path_into_a_scalar_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, "broker: {url: amqp://x/}\n")
    with pytest.raises(
        ConfigError, match="CHANNEL_GATEWAY__BROKER__URL__HOST: url is not a section"
    ):
        load_config(path, environ={"CHANNEL_GATEWAY__BROKER__URL__HOST": "h"})


@pytest.mark.parametrize(
    ("text", "message"),
    [("broker: [unclosed\n", "is not valid YAML"), ("- a list\n", "must be a mapping")],
)
def test_unreadable_files(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text), environ={})
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_connector_settings_resolve_secrets_and_name_the_connector(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        f"""
connectors:
  sms.twilio:
    accounts:
      main: {{account_sid: AC{"a" * 32}, auth_token: {{env: TW_TOKEN}}}}
""",
    )
    settings = load_config(path, environ={})
    spec = registry.load("sms.twilio")
    resolved = settings.connector_settings(spec, {"TW_TOKEN": "real-token-123"})
    assert resolved.accounts["main"].auth_token.get_secret_value() == "real-token-123"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError) as info:
        settings.connector_settings(spec, {})
    assert "connectors.sms.twilio" in str(info.value)
    assert "accounts.main.auth_token" in str(info.value)
    assert "TW_TOKEN is not set" in str(info.value)
